import torch
from safetensors import safe_open

import modelpress as mp
from modelpress.ops.packed_linear import PackedLinear
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


def _saved(tmp_path, **kw):
    m = tiny_model("llama")
    mp.compress(m, None, data=windows(), compute_dtype="float32", **kw).save(tmp_path / "ck")
    return m


def _bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def test_packed_model_gives_the_same_logits_in_the_checkpoints_memory(tmp_path):
    m = _saved(tmp_path, method="gptq", bits=4, group_size=32)
    packed = mp.load_compressed(tmp_path / "ck")
    dense = mp.load_compressed(tmp_path / "ck", dense=True)
    linears = [mod for mod in packed.modules() if isinstance(mod, PackedLinear)]
    assert len(linears) == 21 and not any(isinstance(mod, PackedLinear) for mod in dense.modules())
    ids = windows().eval[:2]
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
        assert torch.equal(packed(ids).logits, m(ids).logits)
    with safe_open(str(tmp_path / "ck" / "weights.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    unit_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if "::" in k)
    assert sum(mod.nbytes() for mod in linears) == unit_bytes  # the compressed layers: exactly what is stored
    total = sum(t.numel() * t.element_size() for t in stored.values())
    half = mp.load_compressed(tmp_path / "ck", dtype=torch.float16)
    assert _bytes(half) <= 1.05 * total, (_bytes(half), total)  # the whole model, in float16 like the file
    assert _bytes(dense) > 2.5 * total  # what the dequantized float32 model holds


def test_sparse_and_act_order_layers_stay_packed_too(tmp_path):
    for kw in (dict(method="sparsegpt", sparsity=0.5), dict(method="gptq", bits=3, group_size=32, act_order=True)):
        m = _saved(tmp_path / kw["method"], **kw)
        packed = mp.load_compressed(tmp_path / kw["method"] / "ck")
        assert any(isinstance(mod, PackedLinear) for mod in packed.modules())
        ids = windows().eval[:1]
        with torch.no_grad():
            assert torch.equal(packed(ids).logits, m(ids).logits)


def test_int4_kernel_matches_the_exact_decode_within_bfloat16(tmp_path):
    from modelpress.ops.packed_linear import Int4Linear

    for kw in (dict(bits=4, group_size=32, sym=False, act_order=True), dict(bits=4, group_size=32, sym=True)):
        d = tmp_path / str(kw["sym"])
        _saved(d, method="gptq", **kw)
        exact = mp.load_compressed(d / "ck")
        fast = mp.load_compressed(d / "ck", kernel="int4")
        mods = [mod for mod in fast.modules() if isinstance(mod, Int4Linear)]
        assert len(mods) == 21
        for (name, a), b in zip(((n, mod) for n, mod in exact.named_modules() if isinstance(mod, PackedLinear)), mods):
            assert torch.allclose(b.weight, a.weight, atol=1e-2 * a.weight.abs().max().item()), name
        ids = windows().eval[:2]
        with torch.no_grad():
            want, got = exact(ids).logits, fast(ids).logits
        assert (got - want).abs().max() < 0.05 * want.abs().max(), (got - want).abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # 3-bit layers are not for the int4 kernel: they stay exact
    _saved(tmp_path / "w3", method="gptq", bits=3, group_size=32)
    assert not any(isinstance(mod, Int4Linear) for mod in mp.load_compressed(tmp_path / "w3" / "ck", kernel="int4").modules())


def test_tied_embedding_is_one_tensor_after_loading(tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=4096, tie_word_embeddings=True)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    mp.compress(m, None, "rtn", bits=4, group_size=32).save(tmp_path / "ck")
    for dense in (False, True):
        back = mp.load_compressed(tmp_path / "ck", dense=dense)
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    half = mp.load_compressed(tmp_path / "ck", dtype=torch.float16)
    with safe_open(str(tmp_path / "ck" / "weights.safetensors"), "pt") as f:
        total = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert _bytes(half) <= 1.05 * total, (_bytes(half), total)
