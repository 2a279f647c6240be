"""Registry packages fetched as files: the .deb reader, installed copies, and clear failures."""
import io
import subprocess
import tarfile
import zipfile

import pytest

from modelpress.utils import packages as pk


def _deb(files: dict[str, bytes], member="data.tar.gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("control.tar.gz", b"x" * 3), (member, buf.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + (b"\n" if len(body) % 2 else b"")
    return out


def test_deb_reader_finds_the_data_archive():
    with pk.deb_data(_deb({"usr/share/x.txt": b"hello"})) as tar:
        assert tar.extractfile("./usr/share/x.txt").read() == b"hello"
    with pytest.raises(pk.PackageFetchError, match="no ar header"):
        pk.deb_data(b"not a deb")
    with pytest.raises(pk.PackageFetchError, match="zstd"):
        pk.deb_data(_deb({"a": b"b"}, member="data.tar.zst"))


def test_fetch_unpacks_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, cwd, capture_output, text, timeout):
        calls.append(cmd)
        if cmd[0] == "apt-get":
            (cwd / "p_1_all.deb").write_bytes(_deb({"usr/share/doc/p/t.txt": b"text"}))
        else:
            with zipfile.ZipFile(cwd / "p-1-py3-none-any.whl", "w") as z:
                z.writestr("p/data.txt", "wheel text")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pk.subprocess, "run", fake_run)
    monkeypatch.setattr(pk.shutil, "which", lambda n: "/usr/bin/" + n)
    deb = pk.Package("debian", "p", "1")
    assert deb.file("usr/share/doc/p/t.txt").read_text() == "text"
    whl = pk.Package("pypi", "p", "1", import_name="no_such_module_here")
    assert whl.file("p/data.txt").read_text() == "wheel text"
    assert deb.file("usr/share/doc/p/t.txt").is_file() and len(calls) == 2  # cached: fetched once each
    assert calls[0][:2] == ["apt-get", "download"] and "--no-deps" in calls[1]
    with pytest.raises(pk.PackageFetchError, match="has no nothing.txt"):
        whl.file("nothing.txt")


def test_installed_package_is_read_in_place():
    root = pk.Package("pypi", "pytest", "0", import_name="pytest").root()
    assert (root / "pytest").is_dir()


def test_failures_say_how_to_get_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(pk.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "E: no network"))
    monkeypatch.setattr(pk.shutil, "which", lambda n: "/usr/bin/" + n)
    with pytest.raises(pk.PackageFetchError, match=r"no network.*apt-get download p=1.*dpkg-deb -x"):
        pk.Package("debian", "p", "1").root()
    with pytest.raises(pk.PackageFetchError, match=r"no network.*pip download --no-deps q==2"):
        pk.Package("pypi", "q", "2", import_name="no_such_module_here").root()
    monkeypatch.setattr(pk.shutil, "which", lambda n: None)
    with pytest.raises(pk.PackageFetchError, match="has no apt-get"):
        pk.Package("debian", "p", "1").root()
    assert not list(tmp_path.rglob("*.txt"))  # nothing half-made left behind


def test_npm_tarball_is_checked_against_its_pinned_checksum(tmp_path, monkeypatch):
    import base64
    import hashlib

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("npm_config_registry", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/bins/lib.so")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"elf"))
    body = buf.getvalue()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(pk.urllib.request, "urlopen", fake_urlopen)
    good = "sha512-" + base64.b64encode(hashlib.sha512(body).digest()).decode()
    bad = pk.Package("npm", "@scope/pkg", "1.0", integrity="sha512-" + base64.b64encode(b"0" * 64).decode())
    with pytest.raises(pk.PackageFetchError, match="does not match its pinned sha512"):
        bad.root()
    assert not bad.cache_dir.exists() and not list(tmp_path.glob("cache/packages/*"))
    ok = pk.Package("npm", "@scope/pkg", "1.0", integrity=good)
    assert ok.file("package/bins/lib.so").read_bytes() == b"elf"
    assert urls[-1] == "https://registry.npmjs.org/@scope/pkg/-/pkg-1.0.tgz"
    assert "+" in ok.cache_dir.name and "/" not in ok.cache_dir.name
