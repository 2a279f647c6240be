"""The compute dtype: detection, the context, and what stays float32."""
import contextlib

import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError
from modelpress.eval.metrics import evaluate
from modelpress.utils import device as dev
from tests.conftest import tiny_model


@pytest.mark.parametrize("fast,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_where_the_device_does_it_fast(monkeypatch, fast, expected):
    monkeypatch.setattr(dev, "fast_bf16", lambda d: fast)
    assert dev.resolve_compute_dtype("auto", "cpu") == expected
    assert dev.forward_dtype(tiny_model("llama", layers=1)) == expected
    with dev.compute_dtype("float16"):  # an explicit choice is not second-guessed
        assert dev.forward_dtype(tiny_model("llama", layers=1)) == torch.float16


def test_unknown_compute_dtype_is_a_clear_error():
    with pytest.raises(ConfigError, match="bfloat16, float16, float32"):
        dev.parse_compute_dtype("int8")


def test_context_nests_and_restores():
    with dev.compute_dtype("float32"):
        with dev.compute_dtype("bfloat16"):
            assert dev.active_compute_dtype("cpu") == torch.bfloat16
            with dev.compute_dtype(None):  # None keeps the caller's setting
                assert dev.active_compute_dtype("cpu") == torch.bfloat16
        assert dev.active_compute_dtype("cpu") == torch.float32


def test_float32_is_exactly_the_plain_forward():
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).sum().item() / ids[:, 1:].numel()
    with dev.compute_dtype("float32"):
        assert evaluate(m, ids, batch_size=3).nll == nll
    with dev.compute_dtype("bfloat16"):
        got = evaluate(m, ids, batch_size=3).nll
    assert got != nll and abs(got - nll) < 0.01 * nll  # really bf16, and close


def test_a_16_bit_model_computes_in_its_own_dtype():
    m = tiny_model("llama").to(torch.bfloat16)
    with dev.compute_dtype("float32"):
        assert dev.forward_dtype(m) == torch.bfloat16
        assert isinstance(dev.forwards(m), contextlib.nullcontext)  # no autocast around a bf16 model


def test_python_api_takes_compute_dtype():
    from tests.export.test_checkpoint import windows

    w = windows()
    r32 = mp.compress(tiny_model("llama"), None, "rtn", data=w, bits=4, compute_dtype="float32")
    r16 = mp.compress(tiny_model("llama"), None, "gptq", data=w, bits=4, compute_dtype="bfloat16")
    assert r32.plan["compute_dtype"] == "float32" and r16.plan["compute_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="unknown compute dtype"):
        mp.compress(tiny_model("llama"), None, "rtn", data=w, bits=4, compute_dtype="fp8")
