"""Debian's xenstore-utils against both servers: one scripted scenario, identical output.

Each command runs with ``XENSTORED_PATH`` pointing at the server; stdout, stderr and
the exit code of every command must be byte-identical between the embedded server and
cxenstored 4.17.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .conftest import ServerPath

pytestmark = pytest.mark.realxen

TOOLS = [
    "xenstore-read",
    "xenstore-write",
    "xenstore-ls",
    "xenstore-list",
    "xenstore-rm",
    "xenstore-chmod",
    "xenstore-exists",
    "xenstore-watch",
]

SCENARIO: list[list[str]] = [
    ["xenstore-ls"],
    ["xenstore-ls", "-f", "-p"],
    ["xenstore-write", "/local/domain/1/device/vbd/51712/state", "1"],
    ["xenstore-write", "/a/b", "hello", "/a/c", "wor\\x01ld", "/a/d", ""],
    ["xenstore-read", "/a/b"],
    ["xenstore-read", "/a/b", "/a/c"],
    ["xenstore-read", "-R", "/a/c"],
    ["xenstore-read", "/a/missing"],
    ["xenstore-read", "/a b"],
    ["xenstore-exists", "/a/b"],
    ["xenstore-exists", "/a/missing"],
    ["xenstore-list", "/a"],
    ["xenstore-list", "/a/missing"],
    ["xenstore-chmod", "/local/domain/1/device/vbd/51712", "n1", "r0"],
    ["xenstore-chmod", "-r", "/a", "n0", "r5"],
    ["xenstore-chmod", "/a/b", "q5"],
    ["xenstore-ls", "-p", "/a"],
    ["xenstore-ls", "-f", "-p", "/local"],
    ["xenstore-ls", "/nonexistent"],
    ["xenstore-write", "local-rel", "v"],
    ["xenstore-read", "local-rel"],
    ["xenstore-rm", "/a/c"],
    ["xenstore-rm", "/a/none"],
    ["xenstore-rm", "/none/deeper"],
    ["xenstore-rm", "-t", "/local/domain/1/device/vbd/51712/state"],
    ["xenstore-ls", "-f"],
    ["xenstore-rm", "/a"],
    ["xenstore-ls", "-f", "-p"],
]


def _run(path: str, argv: list[str], timeout: float = 10) -> tuple[int, bytes, bytes]:
    env = dict(os.environ, XENSTORED_PATH=path)
    env.pop("XENSTORED_RUNDIR", None)
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _scenario(path: str) -> list[tuple[list[str], tuple[int, bytes, bytes]]]:
    results = []
    for argv in SCENARIO:
        results.append((argv, _run(path, argv)))
    # A watcher that exits after 3 events: the initial one and two writes.
    env = dict(os.environ, XENSTORED_PATH=path)
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/w"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The watch is in place once the initial event has been printed.
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        _run(path, ["xenstore-write", "/w/x", "1"])
        _run(path, ["xenstore-write", "/unwatched", "1"])
        _run(path, ["xenstore-rm", "/w"])
        out, err = watcher.communicate(timeout=10)
        results.append(
            (["xenstore-watch", "-n", "3", "/w"], (watcher.returncode, first + out, err))
        )
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    return results


def test_xenstore_utils_scenario_identical(xenstored_pair: tuple[ServerPath, ServerPath]) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"xenstore-utils missing: {', '.join(missing)}")
    embedded, real = xenstored_pair
    got = _scenario(embedded)
    want = _scenario(real)
    for (argv, g), (_, w) in zip(got, want, strict=True):
        assert g == w, f"{' '.join(argv)}: embedded {g!r} != cxenstored {w!r}"
    # The scenario must exercise real output, not just errors.
    outputs = dict((" ".join(a), r) for a, r in got)
    assert outputs["xenstore-read /a/b"] == (0, b"hello\n", b"")
    assert outputs["xenstore-watch -n 3 /w"][1] == b"/w\n/w/x\n/w\n"
