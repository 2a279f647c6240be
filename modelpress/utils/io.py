"""Atomic, durable writes and checked reads.

Everything is written to a temporary sibling, fsynced and renamed into place, and the folder
holding it is fsynced, so a crash (kill -9, power loss) leaves either the old file or the new one.
JSON files modelpress writes for itself carry a checksum of their content (`write_json(...,
checksum=True)`); `read_json` refuses a damaged one with one line instead of using wrong numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from ..errors import CheckpointError

log = logging.getLogger(__name__)

CHECKSUM = "sha256"  # the key of a JSON file's own checksum


class CorruptFileError(CheckpointError):
    """A file modelpress wrote is truncated, damaged or not what its name says."""


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f, contextlib.suppress(OSError):
                os.fsync(f.fileno())  # some filesystems refuse fsync (EINVAL): nothing more to do there
        _fsync_dir(Path(folder))


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tag() -> str:
    """What temporary names carry so a later run can tell whether their writer is gone: this
    process's id and this machine's (a shared folder may be written from several machines)."""
    return f"{os.getpid()}x{_host()}"


_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)x(?P<host>[0-9a-f]{8})-", re.ASCII)
_recovered: set[str] = set()  # folders this process has looked through already


def _writer_gone(pid: int, host: str) -> bool:
    if host != _host() or os.name == "nt" or pid == os.getpid():  # another machine's: leave it
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def recover_interrupted(target: str | os.PathLike, *, again: bool = False) -> None:
    """Undo what crashed writers left in the folder of `target`: a previous version moved aside
    while a new one was being put in place goes back (if nothing took its place); temporary files
    and folders of processes of this machine that are gone are removed. Runs once per folder and
    process (`again` forces it: before reading a checkpoint); a folder it cannot change (read-only)
    is left as it is."""
    folder = Path(target).parent
    key = str(folder.resolve()) if folder.is_dir() else None
    if key is None or (key in _recovered and not again):
        return
    _recovered.add(key)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _LEFTOVER.match(name)
        if m is None or not _writer_gone(int(m["pid"]), m["host"]):
            continue
        p, dest = folder / name, folder / m["target"]
        try:
            if m["kind"] == "old" and not dest.exists():
                log.warning("%s: restoring the previous version, moved aside by a run that was killed", dest)
                os.replace(p, dest)
                _fsync_dir(folder)
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            log.warning("could not clean up %s (%s)", p, e)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success its files are fsynced and it
    replaces `target` by rename. On failure the temporary directory is removed and an existing
    `target` is left untouched. A previous `target` is moved aside for the instant between the two
    renames; a crash right there is undone by `recover_interrupted` (the previous version returns)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_tag()}-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.parent / f".{target.name}.old-{_tag()}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to `target`, fsync it and rename it over `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_tag()}-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_path(target: str | os.PathLike) -> Path:
    """A new empty temporary file next to `target` for writers that open files by name (GGUF);
    `commit_file` puts it in place. Named so `recover_interrupted` can tell whose it is."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_tag()}-", dir=target.parent)
    os.close(fd)
    return Path(tmp)


def commit_file(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """fsync `tmp`, rename it over `target` and make the rename durable."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(Path(target).parent)


def json_checksum(obj: dict) -> str:
    """sha256 of `obj` without its own checksum, as JSON reads it back (integer keys become strings)
    in a canonical form (sorted keys, no spaces), so the checksum depends on the content only."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != CHECKSUM}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_checksum(obj: dict) -> dict:
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    return {**body, CHECKSUM: json_checksum(body)}


def write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False, indent: int = 2) -> None:
    """Write `obj` atomically; `checksum=True` adds its checksum, which `read_json` verifies."""
    with atomic_file(path) as f:
        json.dump(with_checksum(obj) if checksum else obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str, remedy: str) -> dict:
    """A JSON object from `path`; a file that is not valid UTF-8 JSON, not an object, or whose
    checksum does not match raises CorruptFileError: "<path>: <what> is corrupt (why); <remedy>".
    A file without a checksum (written by an older modelpress, or by hand) is taken as it is: one
    damaged byte cannot both remove the checksum's key and change the rest."""
    path = Path(path)

    def damaged(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: {what} is corrupt ({why}); {remedy}")

    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise damaged("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise damaged(f"not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(obj, dict):
        raise damaged("not a JSON object")
    if CHECKSUM in obj and obj[CHECKSUM] != json_checksum(obj):
        raise damaged("its content does not match its checksum")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cache_root() -> Path:
    """modelpress's cache folder: $MODELPRESS_CACHE, else ~/.cache/modelpress."""
    env = os.environ.get("MODELPRESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "modelpress"


def slug(s: str) -> str:
    """A file-name-safe lower-case form of `s` (default output folder names)."""
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()
