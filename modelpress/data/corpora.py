"""Named text corpora. Each is a small registered class returning raw text.

A corpus returns `(text, held_out)`: when `held_out` is None the one text is split into a
calibration region and an evaluation region; otherwise calibration comes from `text` and
evaluation from `held_out` (a dataset's train and test splits).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

from ..errors import DataError
from ..registry import Registry

log = logging.getLogger(__name__)

CORPORA: Registry = Registry("corpus")


@CORPORA.register("pydoc")
@dataclasses.dataclass
class Pydoc:
    """The Python reference manual shipped with CPython (`pydoc_data.topics`, ~465k characters)."""

    def load(self) -> tuple[str, str | None]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # pragma: no cover - part of every CPython
            raise DataError("this Python has no pydoc_data module; use a text file with --data PATH") from None
        return "\n\n".join(topics[k] for k in sorted(topics)), None


@dataclasses.dataclass
class TextFiles:
    """A `.txt` file, or every `.txt` file in a folder (sorted by name)."""

    path: str

    def load(self) -> tuple[str, str | None]:
        p = Path(self.path)
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise DataError(f"no text found at {self.path}: give a .txt file, a folder of .txt files, or "
                            f"a corpus name ({', '.join(CORPORA.names())})")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files), None


def _load_hf(*args, **kwargs):
    if importlib.util.find_spec("datasets") is None:
        raise DataError("this corpus comes from the Hugging Face hub and needs `pip install datasets`; "
                        "or use --data pydoc / a local text file")
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, hub down, renamed dataset ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"could not load dataset {args[0]!r} from the Hugging Face hub ({first}); "
                        "check the network or use --data pydoc / a local text file") from None


@CORPORA.register("wikitext2")
@dataclasses.dataclass
class WikiText2:
    """WikiText-2 (raw): calibration from train, evaluation on test, as in GPTQ."""

    def load(self) -> tuple[str, str | None]:
        train = _load_hf("wikitext", "wikitext-2-raw-v1", split="train")
        test = _load_hf("wikitext", "wikitext-2-raw-v1", split="test")
        return "".join(train["text"]), "\n\n".join(test["text"])


@CORPORA.register("c4")
@dataclasses.dataclass
class C4:
    """C4 (en): calibration from the first train shard, evaluation on the first validation shard."""

    max_docs: int = 20000

    def load(self) -> tuple[str, str | None]:
        train = _load_hf("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        val = _load_hf("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                       split="validation")
        n = self.max_docs
        return "\n\n".join(train["text"][:n]), "\n\n".join(val["text"][: max(1, n // 10)])


def get_corpus(name: str):
    """A registered corpus by name, or text files at a path."""
    if name in CORPORA:
        return CORPORA.build(name)
    if Path(name).exists():
        return TextFiles(name)
    raise DataError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA.names())} or a path to .txt files")
