import math

import pytest
import torch
from transformers import DynamicCache

import modelpress as mp
from modelpress.errors import ConfigError, UnsupportedArchitectureError
from modelpress.kvcache import KV_METHODS, fit_bases, kv_evaluate, kv_generate, make_cache, use_kv_cache
from modelpress.kvcache.allocate import allocate_kv_bits, kv_problem
from modelpress.models.arch import cache_kwarg
from tests.conftest import tiny_model

# settings under which a method compresses nothing: the result must equal the full cache
LOSSLESS = [("full", {}), ("kivi", dict(bits=4, window=10_000)), ("gear", dict(window=10_000)),
            ("zipcache", dict(window=10_000)), ("streamingllm", dict(budget=10_000)), ("h2o", dict(budget=10_000)),
            ("snapkv", dict(budget=10_000)), ("ems", dict(budget=10_000)), ("channel", dict(rank=16))]
LOSSY = [("kivi", dict(bits=2, window=8, group=8)), ("gear", dict(bits=2, window=8, group=8)),
         ("zipcache", dict(window=8, group=8)), ("streamingllm", dict(budget=16, window=4)),
         ("h2o", dict(budget=16, window=4)), ("snapkv", dict(budget=16, window=4)), ("ems", dict(budget=16, window=4)),
         ("channel", dict(rank=6))]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def bases(model):
    return fit_bases(model, torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(1)))


def _kw(name, kw, bases):
    return dict(kw, bases=bases) if name == "channel" else kw


@pytest.mark.parametrize("name,kw", LOSSLESS)
def test_lossless_setting_generates_what_the_full_cache_does(model, bases, name, kw):
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out, cache = kv_generate(model, ids, name, max_new_tokens=10, **_kw(name, kw, bases))
    assert torch.equal(out, ref)
    if name != "channel":
        assert cache.nbytes() == cache.full_nbytes()  # nothing compressed, nothing lost


def test_unquantized_16_bit_tokens_match(model):
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out, cache = kv_generate(model, ids, "kivi", bits=16, window=4, group=8, max_new_tokens=10)
    assert torch.equal(out, ref) and cache.nbytes() < cache.full_nbytes()


def test_full_method_logits_equal_dynamic_cache(model):
    ids = torch.randint(3, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids, use_cache=True, **{cache_kwarg(model): DynamicCache(config=model.config)}).logits
        cache = make_cache(model, "full")
        with use_kv_cache(model, cache):
            got = model(ids, use_cache=True, **{cache_kwarg(model): cache}).logits
    assert torch.allclose(got, ref, atol=1e-5)


def _run(model, name, kw, n_tokens=41):
    cache = make_cache(model, name, **kw)
    ids = torch.randint(3, 256, (1, n_tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), use_kv_cache(model, cache):
        model(ids[:, :20], use_cache=True, **{cache_kwarg(model): cache})
        for t in range(20, n_tokens):
            model(ids[:, t:t + 1], use_cache=True, **{cache_kwarg(model): cache})
    return cache


def test_bytes_match_the_formulas(model, bases):
    L, H, D, T, e = 2, 2, 16, 41, 4  # layers, kv heads, head dim, tokens, float32 bytes
    full = _run(model, "full", {})
    assert full.nbytes() == full.full_nbytes() == L * 2 * H * D * T * e
    # KIVI: quantized chunks of G tokens, the rest exact
    G, W, b = 8, 8, 4
    q = ((T - W) // G) * G
    kivi = L * (2 * H * (q * D * b // 8) + 2 * 2 * H * (q // G) * D + 2 * 2 * H * q * (D // G)
                + 2 * H * (T - q) * D * e)
    assert _run(model, "kivi", dict(bits=b, group=G, window=W)).nbytes() == kivi
    # keys at 4 bits, values at 2: codes shrink by the value half's 2 bits, scales are unchanged
    k4v2 = kivi - L * H * (q * D * 2 // 8)
    assert _run(model, "kivi", dict(bits=b, value_bits=2, group=G, window=W)).nbytes() == k4v2
    # values grouped over all 16 channels instead of 8: one value scale/zero per token instead of two
    vg = kivi - L * 2 * 2 * H * q * (D // G - 1)
    assert _run(model, "kivi", dict(bits=b, value_group=D, group=G, window=W)).nbytes() == vg
    # GEAR: KIVI + outliers (value + index, 2 bytes each) + rank-r factors per chunk, head, K and V
    r, rho = 2, 0.05
    k = math.ceil(rho * G * D)
    gear = kivi + L * 2 * H * (q // G) * (4 * k + 2 * r * (G + D))
    assert _run(model, "gear", dict(bits=b, group=G, window=W, rank=r, outliers=rho)).nbytes() == gear
    # ZipCache: per token its own bit-width (round(salient * G) high-precision tokens per chunk),
    # per-token scale/zero for keys and values, per-channel mean/range per chunk, 1 bit per token
    hi, lo, s = 4, 2, 0.25
    n_hi = round(s * G) * (q // G)
    codes = 2 * H * (n_hi * D * hi // 8 + (q - n_hi) * D * lo // 8)
    zc = codes + 2 * 4 * H * q + 2 * 2 * H * (q // G) * D + (q + 7) // 8 + 2 * H * (T - q) * D * e
    assert _run(model, "zipcache", dict(hi_bits=hi, lo_bits=lo, salient=s, group=G, window=W)).nbytes() == L * zc
    # eviction: exactly `budget` tokens per head
    for name in ("streamingllm", "h2o", "snapkv", "ems"):
        assert _run(model, name, dict(budget=16, window=4)).nbytes() == L * 2 * H * 16 * D * e
    # channel shrinking: `rank` dimensions per head for keys and values
    assert _run(model, "channel", dict(rank=6, bases=bases)).nbytes() == L * 2 * H * T * 6 * e


def test_value_group_must_divide_head_dim(model):
    with pytest.raises(ConfigError, match="head_dim=16"):
        _run(model, "kivi", dict(bits=4, group=8, value_group=6, window=8))
    with pytest.raises(ConfigError):
        KV_METHODS.get("kivi")(value_group=0)


def test_wider_value_groups_cost_accuracy_not_correctness(model):
    """Coarser value scales: fewer bytes, logits still close to the full cache's, and no closer
    than the finer grouping's (a mixed-up scale layout would be far off)."""
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    full = kv_evaluate(model, ids, "full", prefill=16, step=4, batch_size=1)
    fine = kv_evaluate(model, ids, "kivi", prefill=16, step=4, batch_size=1, bits=4, group=8, window=4,
                       reference=full["logprobs"])
    coarse = kv_evaluate(model, ids, "kivi", prefill=16, step=4, batch_size=1, bits=4, group=8, window=4,
                         value_group=16, reference=full["logprobs"])
    assert coarse["cache_bytes"] < fine["cache_bytes"]
    assert 0 < coarse["kl"] < 0.05 and fine["kl"] <= coarse["kl"] * 1.5


def test_float16_storage_halves_the_kept_entries(model):
    full = _run(model, "full", {})
    half = _run(model, "full", dict(storage="float16"))
    assert half.nbytes() * 2 == full.nbytes()
    ev = _run(model, "streamingllm", dict(budget=16, window=4, storage="float16"))
    assert ev.nbytes() == 2 * 2 * 2 * 16 * 16 * 2  # layers x (K, V) x heads x budget x head dim x 2 bytes
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        cache = make_cache(model, "full", storage="float16")
        with use_kv_cache(model, cache):
            model(ids[:, :20], use_cache=True, **{cache_kwarg(model): cache})
            got = model(ids[:, 20:], use_cache=True, **{cache_kwarg(model): cache}).logits
    assert torch.allclose(got, ref[:, 20:], atol=1e-2) and not torch.equal(got, ref[:, 20:])
    with pytest.raises(ConfigError):
        make_cache(model, "kivi", storage="int8")


@pytest.mark.parametrize("name,kw", LOSSY)
def test_padded_batch_equals_one_by_one(model, bases, name, kw):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 256, (1, 28), generator=g), torch.randint(3, 256, (1, 19), generator=g)
    batch = torch.zeros(2, 28, dtype=torch.long)
    batch[0] = a
    batch[1, 9:] = b
    mask = torch.ones(2, 28, dtype=torch.long)
    mask[1, :9] = 0
    kw = _kw(name, kw, bases)
    out, _ = kv_generate(model, batch, name, attention_mask=mask, max_new_tokens=8, **kw)
    one_a, _ = kv_generate(model, a, name, max_new_tokens=8, **kw)
    one_b, _ = kv_generate(model, b, name, max_new_tokens=8, **kw)
    assert torch.equal(out[0, 28:], one_a[0, 28:])
    assert torch.equal(out[1, 28:], one_b[0, 19:])


def test_context_manager_restores_the_model(model):
    before = model.config._attn_implementation
    hooks = len(model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="inside"):
        with use_kv_cache(model, make_cache(model, "kivi")):
            assert model.config._attn_implementation == "modelpress_kv"
            raise RuntimeError("inside")
    assert model.config._attn_implementation == before and len(model._forward_pre_hooks) == hooks


def test_errors():
    with pytest.raises(UnsupportedArchitectureError):
        with use_kv_cache(torch.nn.Sequential(torch.nn.Linear(2, 2)), None):
            pass
    with pytest.raises(ConfigError):
        KV_METHODS.build("kivi", bits=5)
    with pytest.raises(ConfigError):
        KV_METHODS.build("h2o", budget=8, window=16)
    with pytest.raises(ConfigError, match="unknown kv method"):
        KV_METHODS.build("nope")


def test_per_head_budgets_meet_the_budget(model):
    ids = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(4))
    p = kv_problem(model, ids, 3.0, levels=(2, 3, 4, 8), group=8)
    assert len(p.units) == 4 and all(e[0] > e[-1] for e in p.errors)
    for alloc, kw in (("uniform", {}), ("dp", {}), ("evolutionary", dict(generations=3, offspring=3, tokens=(96,), survivors=(1,)))):
        bits, info = allocate_kv_bits(model, ids, 3.0, alloc, levels=(2, 3, 4, 8), group=8, window=8, **kw)
        assert info["cost"] == info["budget"] == 12
        assert sum(map(sum, bits)) == 12


@pytest.mark.real
def test_4bit_cache_within_2_percent_on_default_model():
    model, tok = mp.load_model("smollm2-135m", device="cpu")
    ids = mp.get_windows(tok, mp.DataConfig(corpus="pydoc", seq_len=1024, n_samples=1, n_eval=1)).eval
    full = kv_evaluate(model, ids, "full", prefill=256, step=1)
    q4 = kv_evaluate(model, ids, "kivi", bits=4, prefill=256, step=1)
    assert q4["ppl"] < 1.02 * full["ppl"], (q4["ppl"], full["ppl"])
    assert q4["ratio"] > 2.5


def _store_roundtrip(name, k, v, **kw):
    """Encode (H, T, D) keys/values with one method's row store, return the decoded pair."""
    method = KV_METHODS.build(name, **kw)
    store = method.store(method, 0, k.shape[0], k.shape[2], torch.float32)
    store.append(k, v, torch.arange(k.shape[1]))
    store.compact()
    return store.decode(), store.nbytes()


def test_gear_outliers_are_the_entries_that_stretch_their_group():
    """Spikes planted in keys (per channel) and values (per token): GEAR keeps them exactly, so the
    rest quantizes on tight ranges; its error is far below KIVI's at the same bits and group."""
    g = torch.Generator().manual_seed(0)
    h, t, d = 2, 64, 16
    k = torch.randn(h, t, d, generator=g) + 4.0 * torch.arange(d)  # channel offsets, as real keys have
    v = torch.randn(h, t, d, generator=g)
    spikes = torch.randint(0, h * t * d, (20,), generator=g)
    k.view(-1)[spikes] += 40.0
    v.view(-1)[spikes] -= 40.0
    (kg, vg), _ = _store_roundtrip("gear", k, v, bits=2, group=32, window=0, rank=0, outliers=0.02)
    (kk, vk), _ = _store_roundtrip("kivi", k, v, bits=2, group=32, window=0)
    err = lambda a, b: float(((a - b) ** 2).sum())
    assert err(kg, k) < 0.2 * err(kk, k) and err(vg, v) < 0.2 * err(vk, v)
