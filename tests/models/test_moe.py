import copy

import pytest
import torch

import modelpress as mp
from modelpress.models.arch import Arch
from modelpress.models.moe import ExpertLinears, expert_of, unfuse_experts
from tests.export.test_checkpoint import windows

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe(kind: str, seed: int = 0, experts: int = 4):
    import transformers as tf

    torch.manual_seed(seed)
    cls = {"mixtral": tf.MixtralConfig, "qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig,
           "olmoe": tf.OlmoeConfig}[kind]
    cfg = cls(hidden_size=64, intermediate_size=96, moe_intermediate_size=64, shared_expert_intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
              num_local_experts=experts, num_experts=experts, num_experts_per_tok=2, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, mlp_only_layers=[], decoder_sparse_step=1)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # spread the tiny random init so compression errors show
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in n:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("kind", MOE)
def test_unfused_experts_compute_what_transformers_does(kind):
    fused = tiny_moe(kind)
    m = copy.deepcopy(fused)
    assert unfuse_experts(m) == 2
    ids = windows().eval
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)
    units = list(Arch(m).linears(0))
    experts = [u for u in units if expert_of(u)]
    assert len(experts) == 4 * 3 and "model.layers.0.mlp.experts.3.down_proj" in experts
    assert not any("gate.weight" in u or u.endswith("mlp.gate") for u in units)  # the router stays dense
    if kind == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in units


@pytest.mark.parametrize("kind", MOE)
def test_moe_compress_roundtrip_and_hf_export(kind, tmp_path):
    import transformers as tf

    m = tiny_moe(kind)
    w = windows()
    c = mp.compress(m, None, "gptq", data=w, bits=4, group_size=32)
    assert sum(expert_of(u) for u in c.units) == 2 * 4 * 3
    c.save(tmp_path / "ck")
    again = mp.load_compressed(tmp_path / "ck", dense=True)
    assert isinstance(again.model.layers[0].mlp.experts, ExpertLinears)
    with torch.no_grad():
        assert torch.equal(again(w.eval).logits, m(w.eval).logits)
        ref = tiny_moe(kind)
        assert mp.evaluate(m, w.eval, reference=ref).kl < 0.2
    c.export("hf", tmp_path / "hf")
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():  # the fused layout again, weights as compressed; float16 on disk can flip a
        d = (plain(w.eval).logits - m(w.eval).logits).abs()  # near-tied routing choice for a few tokens
    assert d.median() < 1e-3 and (d > 0.05).float().mean() < 0.02
    assert isinstance(m.model.layers[0].mlp.experts, ExpertLinears)  # the export left the model as it was


def test_unrouted_experts_get_isotropic_statistics():
    """Experts the router never picks get no XᵀX; they are compressed with isotropic statistics,
    i.e. round to nearest on GPTQ's grid (weight error as RTN's), and the plan lists them."""
    from modelpress.ops import OPERATORS

    m = tiny_moe("mixtral", experts=8)
    unfuse_experts(m)
    with torch.no_grad():  # a router that never picks experts 4..7
        for blk in m.model.layers:
            blk.mlp.gate.weight[4:] = 0.0
            blk.mlp.gate.weight[:4] += 0.5
    dense = {n: mod.weight.detach().clone() for n, mod in Arch(m).all_linears().items()}
    w = windows()
    c = mp.compress(m, None, "gptq", data=w, bits=4, group_size=32)
    starved = c.plan["isotropic_experts"]
    assert {u for u in starved if ".experts." in u} == set(starved)
    assert any(".experts.7." in u for u in starved) and all(t < 64 // 4 for t in starved.values())
    assert not any(f".experts.{e}." in u for u in starved for e in range(4))
    rtn = OPERATORS.build("rtn", bits=4, group_size=32)
    for u in starved:
        got = (c.units[u].dequantize() - dense[u]).norm()
        assert got <= 1.05 * (rtn.compress(dense[u], None).dequantize() - dense[u]).norm(), u
    sparse = mp.compress(m, None, "wanda", data=w, sparsity=0.5)  # m: the router still skips 4..7
    assert sparse.plan["isotropic_experts"]
    for u in sparse.plan["isotropic_experts"]:  # Wanda on isotropic inputs: magnitude pruning per row
        a, keep = c.units[u].dequantize().abs(), sparse.units[u].mask
        assert (a.masked_fill(~keep, float("inf")).amin(1) >= a.masked_fill(keep, -1.0).amax(1)).all(), u


def test_moe_search_gives_experts_their_own_levels(tmp_path):
    """The budget search on a tiny Mixtral: every expert projection is a unit with its own level
    (expert 3, which the router never picks, too: isotropic statistics in the database); the plan
    keeps the budget and its checkpoint reloads."""
    import json

    from typer.testing import CliRunner

    from modelpress.cli.main import app
    from tests.conftest import byte_tokenizer

    moe = tiny_moe("mixtral")
    with torch.no_grad():
        for blk in moe.model.layers:
            blk.mlp.gate.weight[3] = 0.0
            blk.mlp.gate.weight[:3] += 0.5
    moe.save_pretrained(tmp_path / "moe")
    byte_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "t.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 80 + "\n") * 6)
    small = ["--data", str(tmp_path / "t.txt"), "--eval-suite", str(tmp_path / "t.txt"), "--n-samples", "4",
             "--seq-len", "64", "--n-eval", "2"]
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "search", str(tmp_path / "moe"), "--kind", "quant", "--levels", "2,3,4", "--group-size", "32",
        "--target-bits", "3", "--generations", "3", "--offspring", "4", "--tokens", "64,128", "--survivors", "2,1",
        "--fitness-windows", "2", "--db", str(tmp_path / "db"), "--out", str(tmp_path / "out"), *small])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    levels = plan["levels"]
    experts = [u for u in levels if expert_of(u)]
    assert len(experts) == 2 * 4 * 3
    assert plan["info"]["cost"] <= plan["info"]["budget_cost"]
    again = mp.load_compressed(tmp_path / "out")
    assert isinstance(again.model.layers[1].mlp.experts, ExpertLinears)


def test_experts_of_another_layout_stay_fused():
    """A model whose experts gate differently (a clamp inside `_apply_gate`) is left as it is:
    ExpertLinears would compute something else."""
    m = tiny_moe("mixtral")
    experts = m.model.layers[0].mlp.experts
    cls = type("ClampedExperts", (type(experts),), {"_apply_gate": lambda self, x: x.clamp(-1, 1)})
    for blk in m.model.layers:
        blk.mlp.experts.__class__ = cls
    assert unfuse_experts(m) == 0 and type(m.model.layers[0].mlp.experts) is cls
