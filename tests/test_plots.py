import matplotlib.image as mpimg
import numpy as np

from modelpress.plots import plot_levels


def _units(n_blocks=6):
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    units = [f"model.layers.{b}.{t}" for b in range(n_blocks) for t in types]
    return units, [u.rsplit(".", 1)[1] for u in units], [int(u.split(".")[2]) for u in units]


def test_level_heat_map_shows_every_plan_and_level(tmp_path):
    units, groups, blocks = _units()
    rng = np.random.default_rng(0)
    plans = {"uniform": {u: 3 for u in units}, "evolutionary": {u: int(rng.integers(2, 5)) for u in units}}
    plot_levels(tmp_path / "two.png", plans, units, groups, blocks, ylabel="bits")
    plot_levels(tmp_path / "one.png", {"uniform": plans["uniform"]}, units, groups, blocks, ylabel="bits")
    two, one = mpimg.imread(tmp_path / "two.png"), mpimg.imread(tmp_path / "one.png")
    assert two.shape[0] > 1.5 * one.shape[0]  # one heat map per plan
    assert len(np.unique(two.reshape(-1, two.shape[-1]), axis=0)) > len(np.unique(one.reshape(-1, one.shape[-1]), axis=0))


def test_level_heat_map_takes_named_levels(tmp_path):
    units, groups, blocks = _units(3)
    names = ["Q4_K", "Q6_K", "Q8_0"]
    plot_levels(tmp_path / "g.png", {"evolutionary": {u: names[i % 3] for i, u in enumerate(units)}}, units, groups,
                blocks, ylabel="GGML type")
    assert mpimg.imread(tmp_path / "g.png").shape[0] > 50
