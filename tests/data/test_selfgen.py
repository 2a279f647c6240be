"""Text sampled from the model: deterministic for a seed, cached on disk, a prefix for fewer windows."""
import pytest
import torch

from modelpress.data import DataConfig, get_windows
from modelpress.data import selfgen
from modelpress.errors import DataError
from tests.conftest import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    return tmp_path


def test_deterministic_cached_and_a_prefix(cache, tokenizer, monkeypatch):
    m = tiny_model("llama")
    a = selfgen.self_windows(m, tokenizer, 5, 24, seed=1)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert len(list((cache / "selfgen").glob("*.pt"))) == 1
    calls = []
    real = selfgen._generate_batch
    monkeypatch.setattr(selfgen, "_generate_batch", lambda *x, **k: calls.append(1) or real(*x, **k))
    b = selfgen.self_windows(m, tokenizer, 3, 24, seed=1)
    assert not calls and torch.equal(b, a[:3])  # from the cache, the first windows of the same set
    c = selfgen.self_windows(m, tokenizer, 5, 24, seed=2)
    assert not torch.equal(c, a) and calls  # another seed is another sample
    (cache / "selfgen").joinpath("x").write_text("")  # unrelated files are ignored
    for f in (cache / "selfgen").glob("*.pt"):
        f.write_bytes(b"garbage")  # a damaged cache is regenerated, never trusted
    assert torch.equal(selfgen.self_windows(m, tokenizer, 5, 24, seed=1), a)


def test_other_weights_other_text(cache, tokenizer):
    a = selfgen.self_windows(tiny_model("llama", seed=0), tokenizer, 2, 16)
    b = selfgen.self_windows(tiny_model("llama", seed=1), tokenizer, 2, 16)
    assert not torch.equal(a, b)
    assert selfgen.model_fingerprint(tiny_model("llama", seed=0)) != selfgen.model_fingerprint(tiny_model("llama", seed=1))


def test_samples_follow_the_model(cache, tokenizer):
    """A model that puts almost all mass on one next token yields text made of that token."""
    m = tiny_model("llama")
    head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[65] = 30.0
    m.lm_head = head
    w = selfgen.self_windows(m, tokenizer, 2, 20)
    assert (w[:, 1:] == 65).float().mean() > 0.95


def test_chat_start_from_the_template(tokenizer):
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(0)
    assert selfgen._starts(tokenizer) == [[0]]
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    starts = selfgen._starts(tokenizer)
    assert len(starts) == 2 and tokenizer.decode(starts[1]) == "<user>"


def test_mixture_with_self(cache, tokenizer):
    m = tiny_model("llama")
    w = get_windows(tokenizer, DataConfig(corpus="pydoc+self", n_samples=6, seq_len=32), model=m)
    parts = [p for p, _ in w.calib_starts]
    assert parts == [0, 1, 0, 1, 0, 1]  # interleaved: every prefix is half and half
    assert torch.equal(w.calib[1::2], selfgen.self_windows(m, tokenizer, 3, 32))
    with pytest.raises(DataError, match="pass the model"):
        get_windows(tokenizer, DataConfig(corpus="self", n_samples=2, seq_len=32))


def test_windows_after_a_draw_are_disjoint_from_it(cache, tokenizer):
    """The search's fitness windows (`after=`): same source and proportions, none of the calibration
    windows, the same windows whatever else is drawn."""
    m = tiny_model("llama")
    cfg = DataConfig(corpus="pydoc+sotu+self", n_samples=9, seq_len=32)
    cal = get_windows(tokenizer, cfg, model=m)
    fit = get_windows(tokenizer, DataConfig(corpus=cfg.corpus, n_samples=6, seq_len=32), model=m, after=9)
    both = get_windows(tokenizer, DataConfig(corpus=cfg.corpus, n_samples=15, seq_len=32), model=m)
    assert sorted(p for p, _ in fit.calib_starts) == [0, 0, 1, 1, 2, 2]
    assert not any((row == cal.calib).all(-1).any() for row in fit.calib)
    # per part, calibration then fitness windows are the first windows of one longer draw
    for part in range(3):
        rows = lambda w: [r for r, (p, _) in zip(w.calib, w.calib_starts) if p == part]
        assert all(torch.equal(a, b) for a, b in zip(rows(cal) + rows(fit), rows(both)))
    again = get_windows(tokenizer, DataConfig(corpus=cfg.corpus, n_samples=6, seq_len=32), model=m, after=9)
    assert torch.equal(fit.calib, again.calib)
