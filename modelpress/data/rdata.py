"""Read the character vectors of an R package's lazy-load database (data/Rdata.rdx + Rdata.rdb).

R packages keep their data sets in R's serialization format (version 2 or 3, big-endian "X"
encoding): the .rdx index, gzip-compressed, maps each object's name to an (offset, length) in the
.rdb file, where each object is zlib-compressed behind a 4-byte length. Only what text data sets
need is decoded: NULL, character vectors and strings, integer/logical/real vectors, generic
vectors (lists), pairlists (attributes) and back-references. Anything else raises ValueError.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILVALUE, EMPTYENV, REFSXP, PERSISTSXP = 254, 242, 255, 247
LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 2, 9, 10, 13, 14, 16, 19, 20
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
REFERENCED = {1}  # SYMSXP: the objects R writes once and refers back to


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not R serialization in XDR (big-endian) format")
        self.b, self.i, self.refs = data, 2, []
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()  # then the native encoding's name
            self.i += n
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def vector(self, fmt: str, width: int):
        n = self.int()
        v = struct.unpack_from(f">{n}{fmt}", self.b, self.i)
        self.i += width * n
        return list(v)

    def obj(self):
        flags = self.int()
        t = flags & 0xFF
        if t in (NILVALUE, EMPTYENV):
            return None
        if t == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if t in REFERENCED:  # a symbol: its name, remembered for later back-references
            v = self.obj()
            self.refs.append(v)
            return v
        if t == CHARSXP:
            n = self.int()
            if n < 0:
                return None  # NA_character_
            v = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return v
        if t == LISTSXP:  # pairlist: attributes, tag, value, rest
            if flags & HAS_ATTR:
                self.obj()
            tag = self.obj() if flags & HAS_TAG else None
            head, rest = self.obj(), self.obj()
            return {tag: head, **(rest or {})}
        if t in (STRSXP, VECSXP, EXPRSXP):
            value = [self.obj() for _ in range(self.int())]
        elif t in (LGLSXP, INTSXP):
            value = self.vector("i", 4)
        elif t == REALSXP:
            value = self.vector("d", 8)
        else:
            raise ValueError(f"R object type {t} is not supported by this reader")
        attrs = self.obj() if flags & HAS_ATTR else None
        return (value, attrs) if attrs else value


def read_lazyload(folder: str | Path) -> dict[str, object]:
    """{name: object} for every object of `folder`/Rdata.rdx/.rdb (vectors with attributes come
    back as (values, attributes))."""
    folder = Path(folder)
    index = _Reader(gzip.decompress((folder / "Rdata.rdx").read_bytes())).obj()
    entries = index[0] if isinstance(index, tuple) else index  # (variables, references, compressed)
    variables = entries[0]
    offsets, names = variables if isinstance(variables, tuple) else (variables, None)
    if names is None:
        raise ValueError("the R index has no object names")
    rdb = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for (offset, length), name in zip(offsets, names["names"]):
        out[name] = _Reader(zlib.decompress(rdb[offset + 4:offset + length])).obj()
    return out
