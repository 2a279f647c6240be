"""llama.cpp itself (through ctypes) runs what modelpress exports: logits, greedy tokens, perplexity,
its own quantizer's presets, and clear errors. Runs wherever a llama.cpp library can be had (on
Linux x86-64 the prebuilt npm build is fetched once); skipped, saying why, elsewhere."""
import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError, ModelLoadError
from modelpress.export import llamacpp
from modelpress.export.ggufio import export_gguf, export_gguf_types, gguf_names
from modelpress.models.arch import Arch, get_weight, set_weight
from modelpress.ops import ggml
from modelpress.ops.ggmlweight import GGMLWeight
from tests.conftest import bpe_tokenizer, tiny_model


@pytest.fixture(scope="module")
def lib():
    try:
        return llamacpp.library()
    except llamacpp.LlamaCppUnavailable as e:
        pytest.skip(f"no llama.cpp library: {e}")


def _f16_tiny(tmp_path):
    tok = bpe_tokenizer()
    m = tiny_model("llama", vocab=len(tok))
    with torch.no_grad():  # hold exactly what an F16 file stores, so only llama.cpp's arithmetic differs
        for p in m.parameters():
            p.copy_(p.half().float())
    return m, tok, export_gguf(m, tmp_path / "t.gguf", default_type="F16", tokenizer=tok)


def test_logits_greedy_tokens_and_perplexity_match_torch(lib, tmp_path):
    m, tok, path = _f16_tiny(tmp_path)
    ids = torch.randint(0, len(tok), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m(ids).logits
    with llamacpp.Session(path, 48) as s:
        first = torch.from_numpy(s.eval(ids[0].tolist()))
        s.reset()
        second = torch.from_numpy(s.eval(ids[1, :20].tolist()))
        rest = torch.from_numpy(s.eval(ids[1, 20:].tolist()))  # continues from the cache
    spread = float(ours.std())
    assert (first - ours[0]).abs().max() < 0.02 * spread
    assert (torch.cat([second, rest]) - ours[1]).abs().max() < 0.02 * spread
    assert (first - ours[1]).abs().max() > spread  # another window's logits: the check can tell them apart
    gen = llamacpp.generate(path, ids[0, :8].tolist(), n_new=8)
    with torch.no_grad():
        assert gen["tokens"] == m.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)[0, 8:].tolist()
    assert abs(llamacpp.perplexity(path, ids)["ppl"] / mp.evaluate(m, ids).ppl - 1) < 0.005
    q = llamacpp.quantize(path, tmp_path / "q.gguf", "Q4_0")
    same, other = llamacpp.perplexity(path, ids, reference=path), llamacpp.perplexity(q, ids, reference=path)
    assert abs(same["kl"]) < 1e-9 and other["kl"] > 1e-4


def test_quantize_presets_and_errors(lib, tmp_path):
    _, _, path = _f16_tiny(tmp_path)
    out = llamacpp.quantize(path, tmp_path / "q.gguf", "Q4_0")
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and out.stat().st_size < path.stat().st_size / 2.5
    with pytest.raises(ModelLoadError, match="requantizing"):  # llama.cpp's own reason is passed on
        llamacpp.quantize(out, tmp_path / "r.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "t.gguf"]  # nothing half-made
    with pytest.raises(ConfigError, match="unknown llama.cpp preset"):
        llamacpp.quantize(path, tmp_path / "x.gguf", "Q7_K")
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        llamacpp.Session(tmp_path / "missing.gguf", 16)


def _same_tensors(a, b) -> list[str]:
    """Names of the tensors whose bytes differ between two GGUF files (or that only one has)."""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: np.asarray(t.data).view(np.uint8) for t in GGUFReader(a).tensors}
    tb = {t.name: np.asarray(t.data).view(np.uint8) for t in GGUFReader(b).tensors}
    return sorted(set(ta) ^ set(tb)) + [n for n in ta if n in tb and not np.array_equal(ta[n], tb[n])]


def test_preset_remade_here_is_llama_cpps_file_and_imatrix_changes_it(lib, tmp_path):
    m, tok, path = _f16_tiny(tmp_path)
    preset = llamacpp.quantize(path, tmp_path / "p.gguf", "Q4_1")
    types = llamacpp.tensor_types(preset)
    assert "Q4_1" in set(types.values())
    assert _same_tensors(preset, export_gguf_types(m, tmp_path / "r.gguf", types, tokenizer=tok)) == []
    im = {n: torch.rand(mod.in_features) + 0.01 for n, mod in m.named_modules()
          if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    with_im = export_gguf_types(m, tmp_path / "i.gguf", types, imatrix=im, tokenizer=tok)
    changed = _same_tensors(preset, with_im)
    assert len(changed) == len(im) and all(n.startswith("blk.") for n in changed)


def test_llama_cpps_quantizer_with_tensor_types_and_imatrix_writes_our_bytes(lib, tmp_path):
    """llama_model_quantize given an importance matrix and per-tensor types (llama-quantize
    --imatrix --tensor-type) writes the tensors modelpress writes for them."""
    import gguf

    tok = bpe_tokenizer()
    m = tiny_model("llama", vocab=len(tok))
    f32 = export_gguf(m, tmp_path / "f32.gguf", default_type="F32", tokenizer=tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    im = {n: torch.rand(mod.in_features, generator=torch.Generator().manual_seed(i)) + 0.01
          for i, (n, mod) in enumerate(m.named_modules()) if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    gguf_im = {names.get_name(n + ".weight", try_suffixes=(".weight",)): v.numpy() for n, v in im.items()}
    types = {k: ("Q5_0", "Q4_1", "Q8_0")[i % 3] for i, k in enumerate(gguf_im)} | {"token_embd.weight": "Q8_0"}
    theirs = llamacpp.quantize(f32, tmp_path / "a.gguf", "Q4_0", imatrix=gguf_im, tensor_types=types)
    got = llamacpp.tensor_types(theirs)
    assert all(got[k] == t for k, t in types.items()) and got["output.weight"] != "F32"
    assert _same_tensors(theirs, export_gguf_types(m, tmp_path / "b.gguf", got, imatrix=im, tokenizer=tok)) == []
    plain = export_gguf_types(m, tmp_path / "c.gguf", got, tokenizer=tok)
    # the importance matrix changed every matrix it covers, except Q8_0's (its quantizer takes none)
    assert sorted(_same_tensors(theirs, plain)) == sorted(k for k in gguf_im if got[k] != "Q8_0")


def test_importance_matrix_from_llama_cpps_forward_is_torchs(lib, tmp_path):
    """llama.cpp's own forward, watched as llama-imatrix watches it, gives every decoder weight the
    mean x² per input column that the torch pass measures (one matrix per GGUF tensor name)."""
    from modelpress.calib.imatrix import importance

    tok = bpe_tokenizer()
    m = tiny_model("llama", vocab=len(tok))
    f32 = export_gguf(m, tmp_path / "f32.gguf", default_type="F32", tokenizer=tok)
    ids = torch.randint(0, len(tok), (3, 40), generator=torch.Generator().manual_seed(1))
    theirs = llamacpp.imatrix(f32, ids)
    names = gguf_names(m)
    ours = {names[u]: v.numpy() for u, v in importance(m, ids).items()}
    assert sorted(theirs) == sorted(ours) and all(n.startswith("blk.") for n in theirs)
    for n, v in ours.items():
        assert theirs[n].shape == v.shape
        assert abs(theirs[n] - v).max() < 0.02 * v.max(), n
    # what it tells apart: the inputs of two blocks' layers, and another text's
    assert abs(theirs["blk.0.ffn_down.weight"] - ours["blk.1.ffn_down.weight"]).max() > 0.1 * ours["blk.1.ffn_down.weight"].max()
    other = llamacpp.imatrix(f32, torch.randint(0, len(tok), (3, 40), generator=torch.Generator().manual_seed(2)))
    assert abs(other["blk.0.attn_q.weight"] - theirs["blk.0.attn_q.weight"]).max() > 1e-3 * theirs["blk.0.attn_q.weight"].max()
    with pytest.raises(ModelLoadError, match="16 or more tokens"):
        llamacpp.imatrix(f32, ids[:, :8])


def test_importance_and_types_are_refused_to_a_library_of_another_layout(lib, tmp_path, monkeypatch):
    _, _, path = _f16_tiny(tmp_path)
    monkeypatch.setattr(lib, "quantize_pointers", False)
    with pytest.raises(ConfigError, match="not llama.cpp 0.5 or later"):
        llamacpp.quantize(path, tmp_path / "q.gguf", "Q4_0", tensor_types={"blk.0.attn_q.weight": "Q8_0"})
    assert not (tmp_path / "q.gguf").exists()
    llamacpp.quantize(path, tmp_path / "q.gguf", "Q4_0")  # plain presets need neither
    monkeypatch.setattr(lib, "cb_eval_offset", None)  # context parameters laid out another way
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="cannot watch its forward"):
        llamacpp.imatrix(path, torch.zeros(1, 32, dtype=torch.long))


def test_where_cb_eval_sits_is_read_off_the_defaults():
    import numpy as np

    raw = np.zeros(64, np.uint32)
    raw[10:12] = np.array([0, -1.0], np.float32).view(np.uint32)  # yarn_orig_ctx, defrag_thold
    raw[16:18] = 1  # type_k, type_v F16, after the null cb_eval / user data at byte 48
    assert llamacpp._cb_eval_offset(raw.tobytes()) == 48
    raw[16] = 0  # no longer recognisable
    assert llamacpp._cb_eval_offset(raw.tobytes()) is None


def test_where_the_library_comes_from(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPRESS_LLAMA_CPP_LIB", "none")
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="turned off"):
        next(llamacpp._candidate_dirs())
    monkeypatch.setenv("MODELPRESS_LLAMA_CPP_LIB", str(tmp_path))
    err = llamacpp._load()
    assert isinstance(err, llamacpp.LlamaCppUnavailable) and "holds no libllama" in str(err)


def test_kquants_come_from_the_same_library(lib):
    w = torch.randn(4, 256)
    g = GGMLWeight.quantize(w, "Q4_K")
    assert g.data.numel() == 4 * 144 and ggml.backend().startswith("llama.cpp")
    assert (g.dequantize() - w).abs().max() < 0.5


@pytest.mark.real
def test_llama_cpp_runs_export_and_agrees_on_default_model(lib, tmp_path):
    model, tok = mp.load_model("smollm2-135m", device="cpu")
    w = mp.get_windows(tok, mp.DataConfig(corpus="pydoc", n_samples=4, n_eval=6))
    weights = {}
    for n, mod in Arch(model).all_linears().items():
        g = GGMLWeight.quantize(get_weight(mod), "Q4_K" if mod.in_features % 256 == 0 else "Q5_0",
                                heads={"q_proj": 9, "k_proj": 3}.get(n.rsplit(".", 1)[-1]))
        weights[n] = g
        set_weight(mod, g.dequantize())
    out = export_gguf(model, tmp_path / "m.gguf", weights=weights, tokenizer=tok)
    gen = llamacpp.generate(out, w.eval[0, :16].tolist(), n_new=12)
    assert len(gen["tokens"]) == 12 and gen["tokens_per_s"] > 0
    with torch.no_grad():
        torch_greedy = model.generate(w.eval[:1, :16], max_new_tokens=12, do_sample=False)[0, 16:].tolist()
    assert gen["tokens"][:4] == torch_greedy[:4]
    ours = mp.evaluate(model, w.eval).ppl
    theirs = llamacpp.perplexity(out, w.eval)["ppl"]
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)
    # llama.cpp's Q4_K_M preset (K-quants, Q6_K, fallbacks for 576-wide rows) remade here, byte for byte
    dense, _ = mp.load_model("smollm2-135m", device="cpu")
    preset = llamacpp.quantize(export_gguf(dense, tmp_path / "f32.gguf", default_type="F32", tokenizer=tok),
                               tmp_path / "q4km.gguf", "Q4_K_M")
    types = llamacpp.tensor_types(preset)
    assert {"Q4_K", "Q6_K", "Q5_0"} <= set(types.values())
    assert _same_tensors(preset, export_gguf_types(dense, tmp_path / "r.gguf", types, tokenizer=tok)) == []


def test_gptq_codes_on_k_quant_grids_run_in_llama_cpp_as_modelpress_evaluated_them(lib, tmp_path):
    """A model whose Linear layers hold GPTQ's codes on Q2_K / Q3_K grids (rows of 256 and 512):
    llama.cpp reads back exactly the bytes modelpress evaluated, and its logits are as close to
    the torch model holding their decoded weights as those of llama.cpp's own quantization of the
    same types are to theirs (K-quant matmuls round the activations to 8 bits in llama.cpp), and
    far closer than the two quantizations are to each other."""
    import transformers as tf
    from gguf import GGUFReader

    from modelpress.allocate.plan import Plan
    from modelpress.data import DataConfig, Windows
    from modelpress.search import materialize, open_database

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=64, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float() * (4.0 if p.dim() == 2 else 1.0))
    ids = torch.randint(0, len(tok), (10, 48), generator=torch.Generator().manual_seed(1))
    w = Windows(ids[:8], ids[8:], [], [], DataConfig(n_samples=8, seq_len=48))
    names = gguf_names(m)

    def run(suffix):  # a database of GPTQ's levels keeps only them: llama.cpp's own are dominated
        db = open_database(m, tok, "gguf", data=w, db=tmp_path / f"db{suffix}", types=("Q2_K", "Q3_K"),
                           gptq=bool(suffix))
        levels = {u: "Q3_K" if db.units[u].group in ("embedding", "output") else ("Q2_K", "Q3_K")[i % 2] + suffix
                  for i, u in enumerate(db.units)}
        units = materialize(m, tok, db, Plan(kind="gguf", levels=levels)).units
        path = export_gguf(m, tmp_path / f"k{suffix}.gguf", weights=units, tokenizer=tok)
        stored = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(path).tensors}
        for n, u in units.items():
            assert stored[names[n]] == (u.type, u.data.numpy().tobytes())
        with torch.no_grad():
            ours = m(ids[8:9]).logits[0]
        with llamacpp.Session(path, 48) as s:
            return ours, torch.from_numpy(s.eval(ids[8].tolist()))

    ours, theirs = run("+gptq")
    ours_plain, theirs_plain = run("")
    rms = lambda a, b: float((a - b).pow(2).mean().sqrt())
    assert rms(theirs, ours) < 1.25 * rms(theirs_plain, ours_plain)  # llama.cpp's arithmetic, nothing more
    assert rms(theirs, ours) < 0.25 * rms(theirs, ours_plain)  # the check tells the two quantizations apart
