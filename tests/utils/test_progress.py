import pytest

from modelpress.utils import progress as P


@pytest.fixture
def lines(monkeypatch):
    """Progress in "lines" mode, every update past the interval; the mode is restored after."""
    before = P._mode
    monkeypatch.setattr(P, "LINE_SECONDS", 0.0)
    monkeypatch.setattr(P, "QUIET_SECONDS", 0.0)
    P.enable_progress("lines")
    yield
    P.enable_progress(before)


def test_lines_mode_reports_counts_and_end_on_stderr(lines, capsys):
    with P.Bar(total=3, desc="evolutionary search") as bar:
        bar.update(1)
        bar.set_postfix(kl="0.12345")
        bar.update(1)
        bar.update(1)
    err = capsys.readouterr().err.splitlines()
    assert "evolutionary search: 1/3, 0:00 elapsed, ~0:00 left" in err[0]
    assert err[1].endswith("(kl 0.12345)") and "2/3" in err[1]
    assert "evolutionary search: done, 3/3, 0:00 elapsed (kl 0.12345)" in err[-1]
    assert len(err) == 3  # the last update is reported by the end line only


def test_quick_bars_say_nothing(capsys, monkeypatch):
    before = P._mode
    P.enable_progress("lines")
    try:
        assert list(P.progress(range(3), desc="eval dense pydoc")) == [0, 1, 2]
        assert capsys.readouterr().err == ""
    finally:
        P.enable_progress(before)


def test_lines_mode_wraps_iterables_and_resumed_bars(lines, capsys):
    assert list(P.progress(range(4), desc="reference top-K")) == [0, 1, 2, 3]
    with P.Bar(total=10, desc="sensitivities", initial=7):
        pass
    err = capsys.readouterr().err
    assert "reference top-K: done, 4/4" in err
    assert "sensitivities: done, 7/10" in err


def test_off_returns_the_iterable_and_prints_nothing(capsys):
    before = P._mode
    P.enable_progress(False)
    try:
        it = range(3)
        assert list(P.progress(it, desc="x")) == [0, 1, 2]
        with P.Bar(total=2, desc="x") as bar:
            bar.update(2)
        assert capsys.readouterr().err == ""
        assert not P.progress_enabled()
    finally:
        P.enable_progress(before)
    with pytest.raises(ValueError, match="progress mode"):
        P.enable_progress("loud")


def test_cli_setup_chooses_lines_when_stderr_is_not_a_terminal(capsys):
    from modelpress.cli.main import _setup

    before = P._mode
    try:
        _setup(False)  # pytest's captured stderr is not a terminal
        assert P._mode == "lines"
    finally:
        P.enable_progress(before)
