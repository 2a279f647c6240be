import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelpress.allocate.budget import Budget, make_problem
from modelpress.errors import ConfigError, UnsupportedArchitectureError
from modelpress.ops import ggml
from modelpress.export.ggufio import export_gguf
from modelpress.models.arch import Arch, get_weight, set_weight
from modelpress.ops.ggmlweight import GGMLWeight
from modelpress.search import allocate, materialize, open_database
from tests.conftest import byte_tokenizer, tiny_model
from tests.export.test_checkpoint import windows

@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_types_roundtrip_and_size(t):
    w = torch.randn(8, 64)
    g = GGMLWeight.quantize(w, t)
    block, size = ggml.GGML_QUANT_SIZES[ggml.qtype(t)]
    assert g.data.numel() == 8 * 64 // block * size
    assert (g.dequantize() - w).abs().max() < {"Q8_0": 0.03}.get(t, 0.5)


def test_export_roundtrip_through_transformers(tmp_path):
    m, tok = tiny_model("llama"), byte_tokenizer()
    weights = {}
    for i, (n, mod) in enumerate(Arch(m).all_linears().items()):
        heads = {"q_proj": 4, "k_proj": 2}.get(n.rsplit(".", 1)[-1])
        g = GGMLWeight.quantize(get_weight(mod), ["Q4_0", "Q5_1", "Q8_0"][i % 3], heads=heads)
        weights[n] = g
        set_weight(mod, g.dequantize())
    for name, mod in (("model.embed_tokens", m.model.embed_tokens), ("lm_head", m.lm_head)):  # not tied here
        g = GGMLWeight.quantize(mod.weight.data, "Q8_0")
        weights[name] = g
        mod.weight.data.copy_(g.dequantize())
    export_gguf(m, tmp_path / "t.gguf", weights=weights, tokenizer=tok)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="t.gguf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    t2 = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert t2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_clear_errors(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="Llama family"):
        export_gguf(tiny_model("gpt2"), tmp_path / "x.gguf", tokenizer=byte_tokenizer())
    with pytest.raises(ConfigError, match="unknown GGML type"):
        export_gguf(tiny_model("llama"), tmp_path / "x.gguf", default_type="Q7_K", tokenizer=byte_tokenizer())
    with pytest.raises(ConfigError, match="cannot store rows of 64"):
        GGMLWeight.quantize(torch.randn(4, 64), "Q4_K")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_gguf_search_file_size_matches_prediction(tmp_path):
    w = windows()
    m, tok = tiny_model("llama"), byte_tokenizer()
    db = open_database(m, tok, "gguf", data=w, db=tmp_path / "db", types=("Q4_0", "Q5_0", "Q8_0"))
    p = make_problem(db, Budget("mb", 1.0))
    target = (db.meta["fixed_bytes"] + (p.min_cost() + p.max_cost()) / 2) / 1e6
    res = allocate(m, db, Budget("mb", target), "evolutionary", data=w, generations=4, offspring=4, tokens=(32, 64))
    assert len(set(res.plan.levels.values())) > 1
    c = materialize(m, tok, db, res.plan)
    out = export_gguf(m, tmp_path / "s.gguf", weights=c.units, tokenizer=tok)
    predicted = db.meta["fixed_bytes"] + sum(int(db.level_meta(u, v)["nbytes"]) for u, v in res.plan.levels.items())
    assert out.stat().st_size == predicted
    assert out.stat().st_size <= target * 1e6
    # what modelpress evaluated is what the file holds
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, m2(w.eval).logits)
