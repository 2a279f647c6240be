import pytest
import torch

from modelpress.errors import UnsupportedArchitectureError
from modelpress.models.arch import Arch, Dropped, drop_subblock, get_weight, set_weight
from tests.conftest import ARCHS, tiny_model

EXPECTED_LINEARS = {"llama": 7, "qwen2": 7, "qwen3": 7, "mistral": 7, "gpt2": 4}


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery(arch):
    m = tiny_model(arch)
    a = Arch(m)
    assert len(a) == 3
    for i in range(3):
        lin = a.linears(i)
        assert len(lin) == EXPECTED_LINEARS[arch]
        assert all(n.startswith(a.block_name(i) + ".") for n in lin)
    kinds = [(s.block, s.kind) for s in a.subblocks()]
    assert kinds == [(i, k) for i in range(3) for k in ("attn", "mlp")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_accessors_out_in(arch):
    m = tiny_model(arch)
    for name, mod in Arch(m).all_linears().items():
        w = get_weight(mod)
        x = torch.randn(5, w.shape[1])
        assert torch.allclose(mod(x) - (mod.bias if mod.bias is not None else 0), x @ w.t(), atol=1e-4)
        set_weight(mod, torch.zeros_like(w))
        assert torch.all(get_weight(mod) == 0)


def test_not_a_decoder():
    with pytest.raises(UnsupportedArchitectureError):
        Arch(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_subblock_passes_residual(arch):
    m = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 12))
    drop_subblock(m, Arch(m).subblocks()[1].name)  # block 0 MLP
    drop_subblock(m, Arch(m).subblocks()[0].name)  # block 0 attention
    assert sum(isinstance(c, Dropped) for c in Arch(m).blocks[0].children()) == 2
    captured = {}

    def pre(mod, a, kw):
        captured["in"] = a[0] if a else kw["hidden_states"]

    def post(mod, a, kw, out):
        captured["out"] = out[0] if isinstance(out, tuple) else out

    blk = Arch(m).blocks[0]
    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        m(ids)
    for h in handles:
        h.remove()
    assert torch.equal(captured["in"], captured["out"])  # a fully dropped block is the identity


def test_generate_with_dropped_first_attention():
    m = tiny_model("llama")
    drop_subblock(m, "model.layers.0.self_attn")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        gen = m.generate(ids, max_new_tokens=5, do_sample=False)
        # greedy generation with the cache equals step-by-step recomputation without it
        seq = ids
        for _ in range(5):
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_unknown_subblock():
    with pytest.raises(UnsupportedArchitectureError, match="no attention/MLP sub-block"):
        drop_subblock(tiny_model("llama"), "model.layers.0.nothing")
