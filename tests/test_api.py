import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


def test_end_to_end_tiny(tmp_path, tokenizer):
    m = tiny_model("llama")
    ref = tiny_model("llama")
    w = windows()
    c = mp.compress(m, tokenizer, "gptq", data=w, bits=4, group_size=32)
    assert len(c.units) == 21 and c.bits_per_weight() < 5
    c.save(tmp_path / "ck")
    m2, tok = mp.load_compressed(tmp_path / "ck", return_tokenizer=True)
    assert tok("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, m2(w.eval).logits)
    r = mp.evaluate(m2, w.eval, reference=ref)
    dense = mp.evaluate(ref, w.eval)
    assert 0 < r.kl < 0.1 and abs(r.ppl / dense.ppl - 1) < 0.1


def test_sequential_modes_both_work():
    w = windows()
    for seq in (True, False):
        m = tiny_model("qwen3")
        ref = tiny_model("qwen3")
        mp.compress(m, None, "gptq", data=w, bits=3, group_size=16, sequential=seq)
        assert mp.evaluate(m, w.eval, reference=ref).kl < 0.1


def test_drop_by_influence():
    m = tiny_model("llama", layers=4)
    c = mp.compress(m, None, None, data=windows(), drop=3)
    assert len(c.dropped) == 3 and not c.units
    with pytest.raises(ConfigError, match="cannot drop 9"):
        mp.compress(tiny_model("llama"), None, None, data=windows(), drop=9)


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown operator 'gptqq'.*gptq"):
        mp.compress(tiny_model("llama"), None, "gptqq")
