"""The R lazy-load reader, on a database written here in R's XDR format, and on janeaustenr's."""
import gzip
import struct
import zlib

import pytest

from modelpress.data import corpora
from modelpress.data.rdata import read_lazyload
from modelpress.errors import DataError


def _i(v):
    return struct.pack(">i", v)


def _chars(s):
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b  # CHARSXP (gp bit set, as R writes UTF-8 strings)


def _strsxp(items):
    out = _i(16) + _i(len(items))
    for x in items:
        out += _i(9) + _i(-1) if x is None else _chars(x)
    return out


def _header():
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8"


def _names_attr(names):
    # pairlist (attr tag) -> symbol "names" -> STRSXP; then NILVALUE
    return _i(2 | (1 << 10)) + _i(1) + _chars("names") + _strsxp(names) + _i(254)


def test_reads_what_r_writes(tmp_path):
    objs = {"alpha": ["first line", None, "third"], "beta": ["x"]}
    rdb, entries = b"", []
    for name, lines in objs.items():
        blob = zlib.compress(_header() + _strsxp(lines))
        entries.append((len(rdb), len(blob) + 4))
        rdb += _i(len(blob)) + blob
    offsets = b"".join(_i(13) + _i(2) + _i(o) + _i(n) for o, n in entries)  # INTSXP pairs
    variables = _i(19 | (1 << 9)) + _i(len(objs)) + offsets + _names_attr(list(objs))
    index = _header() + _i(19) + _i(3) + variables + _i(254) + _i(254)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert read_lazyload(tmp_path) == objs


def test_rejects_what_it_does_not_know(tmp_path):
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(b"A\nnot xdr"))
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(ValueError, match="XDR"):
        read_lazyload(tmp_path)


def test_janeaustenr():
    try:
        folder = corpora.Austen.package.file("usr/lib/R/site-library/janeaustenr/data")
    except Exception as e:  # no apt-get or no network: nothing to read here
        pytest.skip(f"janeaustenr cannot be fetched on this machine: {e}")
    novels = read_lazyload(folder)
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                              "sensesensibility"]
    assert novels["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert sum(len(x or "") for v in novels.values() for x in v) > 3_900_000


def test_corpus_error_is_a_data_error(monkeypatch):
    def boom(self, rel):
        raise corpora.PackageFetchError("no apt-get")

    monkeypatch.setattr(corpora.Package, "file", boom)
    with pytest.raises(DataError, match="no apt-get"):
        corpora.get_corpus("austen").load()
