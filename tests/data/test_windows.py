import pytest
import torch

from modelpress.data import DataConfig, get_windows
from modelpress.errors import DataError


def _spans(starts, L):
    return [(s, st, st + L) for s, st in starts]


@pytest.mark.parametrize("seq_len", [64, 257])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_samples", [8, 10_000])
def test_calibration_and_evaluation_never_overlap(tokenizer, tmp_path, seq_len, seed, n_samples):
    """One text (a file): the token stream is cut, calibration before the cut, evaluation after."""
    (tmp_path / "t.txt").write_text("".join(f"line {i} of a long text.\n" for i in range(4000)))
    w = get_windows(tokenizer, DataConfig(corpus=str(tmp_path / "t.txt"), n_samples=n_samples, seq_len=seq_len,
                                          seed=seed))
    cal = _spans(w.calib_starts, seq_len)
    ev = _spans(w.eval_starts, seq_len)
    last_cal_end = max(e for _, _, e in cal)
    first_eval = min(s for _, s, _ in ev)
    assert last_cal_end <= first_eval
    for (_, a0, a1), (_, b0, b1) in zip(ev, ev[1:]):
        assert a1 <= b0  # evaluation windows are disjoint too
    assert w.calib.shape == (n_samples, seq_len) and w.eval.shape[1] == seq_len


def test_windows_hold_the_right_tokens(tokenizer):
    from modelpress.data.corpora import Pydoc

    text, held_out = Pydoc().load()
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    held = torch.tensor(tokenizer(held_out, add_special_tokens=False)["input_ids"])
    w = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=4, seq_len=100))
    for row, (k, s) in zip(w.calib, w.calib_starts):
        assert k == 0 and torch.equal(row, stream[s:s + 100])
    for row, (k, s) in zip(w.eval, w.eval_starts):
        assert k == 1 and torch.equal(row, held[s:s + 100])
    assert not set(text.split("\n\n")) & set(held_out.split("\n\n"))  # no paragraph in both


def test_deterministic_and_seeded(tokenizer):
    a = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=6, seq_len=64, seed=3))
    b = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=6, seq_len=64, seed=3))
    c = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=6, seq_len=64, seed=4))
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.calib, c.calib)
    assert torch.equal(a.eval, c.eval)  # evaluation does not depend on the calibration seed


def test_n_eval_cap(tokenizer):
    assert get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=2, seq_len=64, n_eval=3)).eval.shape == (3, 64)


def test_text_file_and_folder(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 300)
    (tmp_path / "b.txt").write_text("other text " * 300)
    w1 = get_windows(tokenizer, DataConfig(corpus=str(tmp_path / "a.txt"), n_samples=2, seq_len=64))
    w2 = get_windows(tokenizer, DataConfig(corpus=str(tmp_path), n_samples=2, seq_len=64))
    assert w1.eval.shape[0] >= 1 and w2.eval.shape[0] > w1.eval.shape[0]


def test_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="unknown corpus"):
        get_windows(tokenizer, DataConfig(corpus="no-such-corpus"))
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(DataError, match="too little held-out text"):
        get_windows(tokenizer, DataConfig(corpus=str(tmp_path / "tiny.txt"), seq_len=64))
    with pytest.raises(DataError):
        DataConfig(seq_len=1)
    with pytest.raises(DataError):
        DataConfig(eval_fraction=1.5)


def test_windows_after_a_draw_of_one_corpus(tokenizer):
    cal = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=5, seq_len=64))
    fit = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=3, seq_len=64), after=5)
    starts = {s for _, s in cal.calib_starts}
    assert not starts & {s for _, s in fit.calib_starts} and fit.calib.shape == (3, 64)
    longer = get_windows(tokenizer, DataConfig(corpus="pydoc", n_samples=8, seq_len=64))
    assert torch.equal(torch.cat([cal.calib, fit.calib]), longer.calib)
