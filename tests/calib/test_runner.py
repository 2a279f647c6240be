import pytest
import torch

from modelpress.calib import LayerwiseRunner, LinearStats
from modelpress.calib.streaming import streaming_block_pass
from modelpress.models.arch import get_weight, set_weight
from tests.conftest import ARCHS, tiny_model


@pytest.fixture
def ids():
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.usefixtures("float32_forwards")
@pytest.mark.parametrize("arch", ARCHS)
def test_block_inputs_and_outputs_match_the_model(arch, ids):
    m = tiny_model(arch)
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    before = _hooks_left(m)  # transformers keeps its own output-capturing hooks
    runner = LayerwiseRunner(m, ids, batch_size=4, sequential=False)
    n = 0
    for step in runner.blocks():
        got = torch.cat(step.inputs)
        assert torch.allclose(got, hs[step.index], atol=1e-5)
        n += 1
    assert n == 3 and _hooks_left(m) == before


@pytest.mark.usefixtures("float32_forwards")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stats_equal_manual_xtx(arch, ids):
    m = tiny_model(arch)
    runner = LayerwiseRunner(m, ids, batch_size=4)
    step = next(runner.blocks())
    name, mod = list(step.linears.items())[-1]
    xs = []
    h = mod.register_forward_hook(lambda mo, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    step.forward()
    h.remove()
    x = torch.cat(xs)
    stats = step.collect("xtx")
    assert stats[name].n == x.shape[0] == 6 * 16
    assert torch.allclose(stats[name].xtx, x.t() @ x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats[name].col_norms, x.norm(dim=0), rtol=1e-4)
    assert _hooks_left(m) == 0


def test_shared_inputs_share_one_accumulator(ids):
    m = tiny_model("llama")
    step = next(LayerwiseRunner(m, ids, batch_size=3).blocks())
    st = step.collect("xtx")
    pre = "model.layers.0"
    assert st[f"{pre}.self_attn.q_proj"] is st[f"{pre}.self_attn.k_proj"] is st[f"{pre}.self_attn.v_proj"]
    assert st[f"{pre}.mlp.gate_proj"] is st[f"{pre}.mlp.up_proj"]
    assert st[f"{pre}.self_attn.o_proj"] is not st[f"{pre}.self_attn.q_proj"]


def test_hooks_removed_on_error(ids):
    m = tiny_model("llama")
    step = next(LayerwiseRunner(m, ids, batch_size=3).blocks())

    def boom(name, st):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step.compress_streaming("xtx", boom)
    assert _hooks_left(m) == 0


@pytest.mark.usefixtures("float32_forwards")
@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_pass_is_true_sequential(arch, ids):
    """Each layer is compressed once all batches reach it, with statistics of inputs that already
    went through the compressed earlier layers; outputs come from the compressed block."""
    m = tiny_model(arch)
    runner = LayerwiseRunner(m, ids, batch_size=2)
    step = next(runner.blocks())
    order, seen = [], {}

    def compress(name, st):
        order.append(name)
        seen[name] = st.xtx.clone()
        mod = step.linears[name]
        set_weight(mod, torch.round(get_weight(mod) * 8) / 8)  # a coarse "compression"

    inputs = list(step.inputs)
    outs = streaming_block_pass(step.module, inputs, runner.kwargs, step.linears,
                                {n: "xtx" for n in step.linears}, compress)
    assert sorted(order) == sorted(step.linears)
    # the outputs are those of the compressed block
    again = step.forward(inputs)
    for a, b in zip(outs, again):
        assert torch.allclose(a, b, atol=1e-5)
    # the last layer's statistics equal its inputs in the fully compressed block
    last = order[-1]
    xs = []
    h = step.linears[last].register_forward_hook(lambda mo, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    step.forward(inputs)
    h.remove()
    x = torch.cat(xs)
    assert torch.allclose(seen[last], x.t() @ x, rtol=1e-4, atol=1e-3)
    assert _hooks_left(m) == 0


def test_linearstats_accumulates():
    st = LinearStats(4, want_xtx=True)
    x = torch.randn(10, 4)
    st.add(x[:3])
    st.add(x[3:])
    assert torch.allclose(st.hessian, x.t() @ x / 10, atol=1e-5)


def test_bf16_forwards_keep_xtx_within_1e_2():
    from modelpress.utils.device import compute_dtype

    m = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))

    def xtx(dt):
        with compute_dtype(dt):
            out = {}
            for step in LayerwiseRunner(m, ids, batch_size=2, sequential=False).blocks():
                out.update({k: v.xtx.clone() for k, v in step.collect("xtx").items()})
        return out

    a, b = xtx("float32"), xtx("bfloat16")
    errs = {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in a}
    assert max(e for k, e in errs.items() if ".layers.0." in k) < 1e-2, errs  # the same inputs
    assert max(errs.values()) < 3e-2, errs  # later blocks: the bf16 forwards' drift adds up
    assert min(errs.values()) > 0  # the forwards really ran in bf16


@pytest.mark.usefixtures("float32_forwards")
def test_layers_fed_one_tensor_are_grouped_and_compressed_together(ids):
    """The layers a block feeds the same input (q/k/v, gate/up) form one group; with `settle`, a
    group is compressed at its first layer's turn and `settle()` runs before the forward goes on
    through it, with the same outputs as one layer at a time."""
    from modelpress.calib.streaming import input_groups

    m = tiny_model("llama")
    runner = LayerwiseRunner(m, ids, batch_size=2)
    step = next(runner.blocks())
    kinds = {n: "xtx" for n in step.linears}
    full = {n.rsplit(".", 1)[1]: n for n in step.linears}

    def groups_of(kinds):
        g = input_groups(step.module, step.inputs[0], runner.kwargs[0], step.linears, kinds)
        return {n.rsplit(".", 1)[1]: tuple(x.rsplit(".", 1)[1] for x in v) for n, v in g.items()}

    short = groups_of(kinds)
    assert short["q_proj"] == short["k_proj"] == short["v_proj"] == ("q_proj", "k_proj", "v_proj")
    assert short["gate_proj"] == short["up_proj"] == ("gate_proj", "up_proj")
    assert short["o_proj"] == ("o_proj",) and short["down_proj"] == ("down_proj",)
    assert groups_of({**kinds, full["k_proj"]: "norms"})["q_proj"] == ("q_proj", "v_proj")  # other statistics

    def run(settle):
        block = tiny_model("llama").model.layers[0]
        block.load_state_dict(step.module.state_dict())
        linears = {n: dict(block.named_modules())[n.split("layers.0.", 1)[1]] for n in step.linears}
        events = []

        def compress(n, st):
            events.append(n.rsplit(".", 1)[1])
            w = get_weight(linears[n])
            set_weight(linears[n], w.round(decimals=1))  # any change the next layers' inputs would show

        outs = streaming_block_pass(block, step.inputs, runner.kwargs, linears, kinds, compress,
                                    settle=(lambda: events.append("|")) if settle else None)
        return events, torch.cat(outs)

    alone, out_alone = run(False)
    grouped, out_grouped = run(True)
    assert alone == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert grouped == ["q_proj", "k_proj", "v_proj", "|", "o_proj", "|", "gate_proj", "up_proj", "|", "down_proj",
                       "|", "|"]
    assert torch.equal(out_alone, out_grouped)
