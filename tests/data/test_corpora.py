"""Hub datasets are tested offline: a fake `datasets` module stands in for the hub."""
import sys
import types

import pytest

from modelpress.data import DataConfig, get_windows
from modelpress.data import corpora
from modelpress.errors import DataError


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            word = "train" if split == "train" else "test"
            return {"text": [f" {word} line {i}\n" for i in range(400)]}
        if path == "allenai/c4":
            return {"text": [f"{split} doc {i}" for i in range(300)]}
        raise ValueError("unknown")

    mod = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", mod)
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda n: object() if n == "datasets" else None)
    return calls


def test_wikitext2_uses_train_for_calibration_and_test_for_eval(fake_datasets, tokenizer):
    w = get_windows(tokenizer, DataConfig(corpus="wikitext2", n_samples=4, seq_len=32))
    assert ("wikitext", "wikitext-2-raw-v1", "train", None) in fake_datasets
    cal_text = tokenizer.decode(w.calib[0])
    ev_text = tokenizer.decode(w.eval[0])
    assert "train" in cal_text and "test" not in cal_text
    assert "test" in ev_text and "train" not in ev_text
    assert all(s == 1 for s, _ in w.eval_starts) and all(s == 0 for s, _ in w.calib_starts)


def test_c4(fake_datasets, tokenizer):
    w = get_windows(tokenizer, DataConfig(corpus="c4", n_samples=2, seq_len=16))
    assert "validation" in tokenizer.decode(w.eval[0])


def test_datasets_not_installed(monkeypatch, tokenizer):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda n: None)
    with pytest.raises(DataError, match="pip install datasets"):
        get_windows(tokenizer, DataConfig(corpus="wikitext2"))


def test_hub_unreachable(monkeypatch, tokenizer):
    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=boom))
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda n: object())
    with pytest.raises(DataError, match="could not load dataset 'wikitext'.*offline"):
        get_windows(tokenizer, DataConfig(corpus="wikitext2"))
