"""Running a downstream project's tests with the kvpfs plugin, and checking that
they leave nothing behind: no mount, no kvpfs process, no socket directory."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

#: What the fixtures create in the temporary directory (sockets need short paths).
TEMP_PREFIXES = ("kvpfs-xs-", "kvpfs-run-")


def can_mount() -> str | None:
    """Why this machine cannot run the mount fixtures' tests (they need root)."""
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc}"
    if os.geteuid() != 0:
        return "mount tests need root"
    return None


def temp_entries(*directories: Path) -> set[Path]:
    found = set()
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found.update(directory / n for n in names if n.startswith(TEMP_PREFIXES))
    return found


def kvpfs_processes(under: Path) -> list[str]:
    """Command lines of live processes that run kvpfs on something below ``under``."""
    found = []
    marker = os.fsencode(str(under))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"kvpfs" in cmdline and marker in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def mounts_under(under: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text(errors="replace")
    return [line for line in text.splitlines() if str(under) in line]


class Downstream:
    """A temporary downstream project (``pytester``) whose tests use the plugin."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pytester = pytester
        self.path = pytester.path
        # The fixtures' socket directories go here, to be found again afterwards.
        self.tmp = pytester.path / "t"
        self.tmp.mkdir()
        monkeypatch.setenv("TMPDIR", str(self.tmp))
        for name in ("XENSTORED_PATH", "XENSTORED_RUNDIR", "PYTEST_ADDOPTS"):
            monkeypatch.delenv(name, raising=False)
        self._before = temp_entries(Path("/tmp"))

    def run(self, *args: str, prefix: tuple[str, ...] = ()) -> pytest.RunResult:
        """pytest in a subprocess (under ``prefix``, e.g. ``unshare ...``)."""
        argv = ["-p", "no:cacheprovider", "-rsw", *args]
        if not prefix:
            result = self.pytester.runpytest_subprocess(*argv, timeout=150)
        else:
            basetemp = self.path / "basetemp"
            result = self.pytester.run(
                *prefix, sys.executable, "-m", "pytest", f"--basetemp={basetemp}", *argv,
                timeout=150,
            )
        self.assert_nothing_left()
        return result

    def assert_nothing_left(self) -> None:
        assert mounts_under(self.path) == []
        assert kvpfs_processes(self.path) == []
        assert temp_entries(self.tmp) == set()
        assert temp_entries(Path("/tmp")) - self._before == set()

