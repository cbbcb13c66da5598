"""Finding the pool directory: explicit, Linux, FreeBSD, or the embedded one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvpfs.kvp.location import (
    PoolDirError,
    PoolDirKind,
    embedded_dir,
    find_pool_dir,
    pool_file_name,
)

from .helpers import child_env


def _find(tmp_path: Path, explicit: str | None = None, **env: str) -> tuple[str, PoolDirKind]:
    found = find_pool_dir(
        explicit,
        env={"HOME": str(tmp_path / "home"), **env},
        linux_dir=str(tmp_path / "var/lib/hyperv"),
        freebsd_dir=str(tmp_path / "var/db/hyperv/pool"),
    )
    return found.path, found.kind


def test_pool_file_names() -> None:
    assert [pool_file_name(n) for n in range(5)] == [f".kvp_pool_{n}" for n in range(5)]


def test_embedded_default_is_created_like_the_daemon_does(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path, kind = _find(tmp_path)
    finally:
        os.umask(old_umask)
    assert kind is PoolDirKind.EMBEDDED
    assert path == str(tmp_path / "home/.local/state/kvpfs/kvp")
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    for n in range(5):
        st = os.stat(os.path.join(path, f".kvp_pool_{n}"))
        assert (st.st_size, st.st_mode & 0o777) == (0, 0o644)
    # Existing pools are never truncated.
    Path(path, ".kvp_pool_1").write_bytes(b"x" * 2560)
    assert _find(tmp_path) == (path, PoolDirKind.EMBEDDED)
    assert Path(path, ".kvp_pool_1").stat().st_size == 2560


def test_xdg_state_home(tmp_path: Path) -> None:
    assert embedded_dir({"XDG_STATE_HOME": "/state", "HOME": "/h"}) == "/state/kvpfs/kvp"
    # The XDG spec says relative paths are to be ignored.
    assert embedded_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == "/h/.local/state/kvpfs/kvp"
    path, kind = _find(tmp_path, XDG_STATE_HOME=str(tmp_path / "xdg"))
    assert (path, kind) == (str(tmp_path / "xdg/kvpfs/kvp"), PoolDirKind.EMBEDDED)


def test_linux_directory_with_pools_wins(tmp_path: Path) -> None:
    linux = tmp_path / "var/lib/hyperv"
    linux.mkdir(parents=True)
    # An empty directory (systemd's StateDirectory) is no sign of the daemon.
    assert _find(tmp_path)[1] is PoolDirKind.EMBEDDED
    (linux / ".kvp_pool_3").write_bytes(b"")
    assert _find(tmp_path) == (str(linux), PoolDirKind.LINUX)


def test_freebsd_directory(tmp_path: Path) -> None:
    freebsd = tmp_path / "var/db/hyperv/pool"
    freebsd.mkdir(parents=True)
    (freebsd / ".kvp_pool_0").write_bytes(b"")
    assert _find(tmp_path) == (str(freebsd), PoolDirKind.FREEBSD)


def test_explicit_directory_is_used_as_it_is(tmp_path: Path) -> None:
    explicit = tmp_path / "pools"
    explicit.mkdir()
    assert _find(tmp_path, str(explicit)) == (str(explicit), PoolDirKind.EXPLICIT)
    assert list(explicit.iterdir()) == []


@pytest.mark.parametrize("what", ["missing", "file"])
def test_unusable_explicit_directory(tmp_path: Path, what: str) -> None:
    target = tmp_path / "pools"
    if what == "file":
        target.write_bytes(b"")
    with pytest.raises(PoolDirError) as info:
        _find(tmp_path, str(target))
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_system_directory_is_an_error(tmp_path: Path) -> None:
    # Run as an unprivileged user: root reads any directory.
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing")
        base = Path(tempfile.mkdtemp())
        base.chmod(0o711)
        run_as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        base, run_as = tmp_path, []
    try:
        linux = base / "hyperv"
        linux.mkdir()
        (linux / ".kvp_pool_1").write_bytes(b"")
        linux.chmod(0o700 if run_as else 0)
        code = (
            "import sys; from kvpfs.kvp.location import find_pool_dir, PoolDirError\n"
            "try: find_pool_dir(linux_dir=sys.argv[1], env={'HOME': '/nonexistent'})\n"
            "except PoolDirError as e: print(e)\n"
        )
        out = subprocess.run(
            [*run_as, sys.executable, "-c", code, str(linux)],
            capture_output=True, text=True, env=child_env(), check=True,
        ).stdout
        assert out == f"kvp pool directory {linux} is not readable\n"
    finally:
        linux.chmod(0o755)
        if run_as:
            shutil.rmtree(base)


def test_embedded_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "home").write_bytes(b"")  # a file where the home directory should be
    with pytest.raises(PoolDirError, match="cannot create"):
        _find(tmp_path)
