"""Other people's XenStore clients against the embedded server.

* Xen's own ``test-xenstore`` (xen-utils-4.17): every test, iterations, random
  mode and two concurrent random runs; the tree it leaves is compared with the
  one cxenstored is left with after the same runs.
* libxenstore (``libxenstore.so.4``) through ctypes, in a subprocess
  (:mod:`tests.xenstore.libxs_scenario`): every observable equal on both servers.
* pyxs, an independent pure-Python client (reference §16): its everyday API.
  pyxs is threaded and blocking; the tests call it from the test's own thread,
  never from the embedded server's (which runs its trio loop in a thread of its
  own, see conftest).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, ServerPath, dump_tree

TEST_XENSTORE = Path("/usr/lib/xen-4.17/bin/test-xenstore")
TEST_NAMES = [
    "read 1", "read 2000", "write 1", "write 2000", "dir", "rm node", "rm dir",
    "ta empty", "ta empty x", "ta rmw", "ta rmw x", "ta err",
]


def _libxenstore_missing() -> str | None:
    try:
        ctypes.CDLL("libxenstore.so.4")
    except OSError as exc:
        return f"libxenstore.so.4 cannot be loaded ({exc}): install libxenstore4"
    return None


needs_test_xenstore = pytest.mark.skipif(
    not TEST_XENSTORE.exists(), reason=f"{TEST_XENSTORE} missing: install xen-utils-4.17"
)
needs_libxenstore = pytest.mark.skipif(
    _libxenstore_missing() is not None, reason=str(_libxenstore_missing())
)


def _env(path: str) -> dict[str, str]:
    env = dict(os.environ, XENSTORED_PATH=path)
    env.pop("XENSTORED_RUNDIR", None)
    return env


# --------------------------------------------------------------------------- test-xenstore


def _start(path: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(TEST_XENSTORE), *args],
        env=_env(path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 60) -> list[str]:
    """Wait for every run; each must exit 0 with nothing on stderr. Their stdouts."""
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, (proc.args, out, err)
            assert err == "", (proc.args, err)
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


def _check_report(out: str, iterations: int) -> None:
    lines = out.splitlines()
    assert [ln.split(":")[0].rstrip() for ln in lines] == TEST_NAMES, out
    if iterations > 1:
        assert all(": avg: " in ln for ln in lines), out


def _deterministic_runs(paths: list[str]) -> None:
    """All tests once, then 20 iterations of each, on every server at once."""
    for args, iterations in [((), 1), (("-i", "20"), 20)]:
        for out in _finish([_start(p, *args) for p in paths]):
            _check_report(out, iterations)


def _random_runs(paths: list[str], seconds: str) -> None:
    """One random run, then two concurrent ones, on every server at once."""
    for runs in (1, 2):
        outs = _finish([_start(p, "-r", seconds) for p in paths for _ in range(runs)])
        assert all(out == "" for out in outs), outs


def _without_generations(tree: list[tuple[bytes, bytes, bytes, bytes]]) -> list[tuple[bytes, ...]]:
    return [(path, value, perms) for path, value, perms, _ in tree]


@needs_test_xenstore
def test_test_xenstore_passes_on_the_embedded_server(xenstored_embedded: ServerPath) -> None:
    before = _without_generations(dump_tree(xenstored_embedded))
    _deterministic_runs([xenstored_embedded])
    _random_runs([xenstored_embedded], "1")
    # Every run removes what it made (its directory under its home, relative
    # "xenstore-test/PID"); the home, made on the way, stays.
    home = [(p, b"", b"n0\0") for p in (b"/local", b"/local/domain", b"/local/domain/0")]
    assert sorted(_without_generations(dump_tree(xenstored_embedded))) == sorted(
        set(before) | set(home)
    )


@needs_test_xenstore
@pytest.mark.realxen
def test_test_xenstore_leaves_the_tree_cxenstored_leaves(
    xenstored_pair: tuple[ServerPath, ServerPath],
) -> None:
    embedded, real = xenstored_pair
    _deterministic_runs([embedded, real])
    # The same requests in the same order: generations included.
    assert dump_tree(embedded) == dump_tree(real)
    _random_runs([embedded, real], "1")
    # Random runs make a different number of requests on each server.
    assert _without_generations(dump_tree(embedded)) == _without_generations(dump_tree(real))


# --------------------------------------------------------------------------- libxenstore


def _libxs_scenario(path: str) -> list[list[Any]]:
    env = _env(path)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.xenstore.libxs_scenario"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: list[list[Any]] = json.loads(proc.stdout)
    return result


def _by_label(observed: list[list[Any]]) -> dict[str, Any]:
    table = dict((label, value) for label, value in observed)
    assert len(table) == len(observed), "labels must be unique"
    return table


@needs_libxenstore
def test_libxenstore_scenario_on_the_embedded_server(xenstored_embedded: ServerPath) -> None:
    got = _by_label(_libxs_scenario(xenstored_embedded))
    # libxenstore got E2BIG for DIRECTORY and fell back to DIRECTORY_PART.
    assert got["big: every name, in order"] is True
    assert got["big: directory inside a transaction"] is True
    assert got["big: aborted child gone"] == 300
    assert bytes.fromhex(got["bytes: read all 256"]) == bytes(range(256))
    assert bytes.fromhex(got["bytes: read NULs"]) == b"\0" * 64
    assert got["bytes: read 4000"] is True
    assert got["bytes: too big for a message"] == ["error", "E2BIG"]
    assert got["tx: commit attempt 0"] == ["error", "EAGAIN"]
    assert got["tx: commit attempt 1"] is None
    assert bytes.fromhex(got["tx: counter after retries"]) == b"11"
    assert got["tx: new siblings second"] == ["error", "EAGAIN"]
    assert got["tx: existing nodes second"] is None
    assert got["watch: events of the removal"] == [["/ws/a/b/c", "tok-c"], ["/ws/a", "tok-a"]]
    assert got["watch: events of the creation"] == [
        ["/nx/y/z/w/v", "tok-nx"], ["/nx/y/z/w/v", "tok-deep"],
    ]
    assert got["watch: events of the relative watch"] == [["relw/k", "tok-rel"]]
    assert got["perm: inherited by the leaf"] == [[0, 0], [5, 1], [6, 2]]
    assert got["perm: inherited from the nearest parent"] == [[7, 1]]
    assert got["special: events of introduce"] == [["@introduceDomain", "intro"]]
    assert got["special: events of release 5"] == [["@releaseDomain", "release"]]
    assert got["special: release 0"] == ["error", "EINVAL"]


@needs_libxenstore
@pytest.mark.realxen
def test_libxenstore_scenario_same_on_both_servers(
    xenstored_pair: tuple[ServerPath, ServerPath],
) -> None:
    embedded, real = xenstored_pair
    got, want = _libxs_scenario(embedded), _libxs_scenario(real)
    assert [label for label, _ in got] == [label for label, _ in want]
    for (label, g), (_, w) in zip(got, want, strict=True):
        assert g == w, label
    assert dump_tree(embedded) == dump_tree(real)


# --------------------------------------------------------------------------- pyxs


@pytest.fixture
def pyxs(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = pytest.importorskip("pyxs")
    # pyxs decides it may RELEASE/RESUME/SET_TARGET from /proc/xen/capabilities,
    # which only a Xen dom0 has (reference §16); the socket is privileged here.
    monkeypatch.setattr(module.Client, "SU", True)
    return module


@pytest.fixture
def pyxs_client(pyxs: Any, xenstored: ServerPath) -> Iterator[Any]:
    with pyxs.Client(unix_socket_path=str(xenstored)) as client:
        yield client


def _events(monitor: Any, count: int) -> list[tuple[bytes, bytes]]:
    got = []
    for _ in range(count):
        try:
            got.append(tuple(monitor.events.get(timeout=5)))
        except queue.Empty:
            break
    assert monitor.events.empty()
    return got


def test_pyxs_reads_writes_and_walks(pyxs: Any, pyxs_client: Any) -> None:
    c = pyxs_client
    c.write(b"/pyxs/a", b"1")
    assert c[b"/pyxs/a"] == b"1"
    c[b"/pyxs/a"] = b"value with spaces"
    assert c.read(b"/pyxs/a") == b"value with spaces"
    assert c.read(b"/pyxs/missing", b"default") == b"default"
    with pytest.raises(pyxs.PyXSError) as info:
        c.read(b"/pyxs/missing")
    assert info.value.args[0] == errno.ENOENT
    c.mkdir(b"/pyxs/d/e")
    assert c.list(b"/pyxs") == [b"a", b"d"]
    assert c.exists(b"/pyxs/d/e")
    assert not c.exists(b"/pyxs/nope")
    assert list(c.walk(b"/pyxs")) == [
        (b"/pyxs", b"", [b"a", b"d"]),
        (b"/pyxs/a", b"value with spaces", []),
        (b"/pyxs/d", b"", [b"e"]),
        (b"/pyxs/d/e", b"", []),
    ]
    c.write(b"relative/x", b"r")
    assert c.read(b"/local/domain/0/relative/x") == b"r"
    del c[b"/pyxs/d"]
    assert c.list(b"/pyxs") == [b"a"]
    c.delete(b"/pyxs/d")  # deleting a missing node whose parent exists is fine
    with pytest.raises(pyxs.PyXSError) as info:
        c.delete(b"/pyxs/no/such")
    assert info.value.args[0] == errno.ENOENT
    with pytest.raises(pyxs.exceptions.InvalidPath):
        c.read(b"/pyxs/bad path")
    with pytest.raises(ValueError):
        c.write(b"/pyxs/bin", b"\xff")  # pyxs refuses what is not 7-bit ASCII


def test_pyxs_permissions(pyxs: Any, pyxs_client: Any) -> None:
    c = pyxs_client
    c.write(b"/pyxs/p", b"v")
    assert c.get_perms(b"/pyxs/p") == [b"n0"]
    c.set_perms(b"/pyxs/p", [b"n1", b"r0", b"w2", b"b3"])
    assert c.get_perms(b"/pyxs/p") == [b"n1", b"r0", b"w2", b"b3"]
    c.write(b"/pyxs/p/child", b"v")
    assert c.get_perms(b"/pyxs/p/child") == [b"n1", b"r0", b"w2", b"b3"]
    with pytest.raises(pyxs.exceptions.InvalidPermission):
        c.set_perms(b"/pyxs/p", [b"x1"])
    with pytest.raises(pyxs.PyXSError) as info:
        c.set_perms(b"/pyxs/none", [b"n0"])
    assert info.value.args[0] == errno.ENOENT


def test_pyxs_transactions(pyxs: Any, pyxs_client: Any, xenstored: ServerPath) -> None:
    c = pyxs_client
    c.write(b"/pyxs/counter", b"0")
    with pyxs.Client(unix_socket_path=str(xenstored)) as other:
        attempts = []
        while True:
            c.transaction()
            value = int(c.read(b"/pyxs/counter"))
            if not attempts:
                other.write(b"/pyxs/counter", b"10")
            c.write(b"/pyxs/counter", str(value + 1).encode())
            attempts.append(c.commit())
            if attempts[-1]:
                break
        assert attempts == [False, True]
        assert other.read(b"/pyxs/counter") == b"11"
        c.transaction()
        c.write(b"/pyxs/rolled-back", b"x")
        assert c.read(b"/pyxs/rolled-back") == b"x"
        assert not other.exists(b"/pyxs/rolled-back")
        c.rollback()
        assert not c.exists(b"/pyxs/rolled-back")
        tx = c.transaction()
        assert tx > 0
        with pytest.raises(pyxs.PyXSError) as info:
            c.transaction()
        assert info.value.args[0] == errno.EALREADY
        c.write(b"/pyxs/committed", b"y")
        assert c.commit() is True
        assert other.read(b"/pyxs/committed") == b"y"


def test_pyxs_watches(pyxs: Any, pyxs_client: Any) -> None:
    c = pyxs_client
    c.write(b"/pyxs/w/old", b"1")
    m = c.monitor()
    m.watch(b"/pyxs/w", b"tok")
    m.watch(b"/pyxs/absent", b"nx")
    assert _events(m, 2) == [(b"/pyxs/w", b"tok"), (b"/pyxs/absent", b"nx")]
    c.write(b"/pyxs/w/new", b"2")
    assert _events(m, 1) == [(b"/pyxs/w/new", b"tok")]
    c.delete(b"/pyxs/w")
    # A watch on the removed node itself: one event, not one per node below it.
    assert _events(m, 1) == [(b"/pyxs/w", b"tok")]
    c.write(b"/pyxs/absent/now", b"3")
    assert _events(m, 1) == [(b"/pyxs/absent/now", b"nx")]
    c.transaction()
    c.write(b"/pyxs/w/in-tx", b"4")
    c.read(b"/pyxs/w/in-tx")  # a round trip: any event would have arrived by now
    assert m.events.empty()
    assert c.commit()
    assert _events(m, 1) == [(b"/pyxs/w/in-tx", b"tok")]
    m.unwatch(b"/pyxs/w", b"tok")
    c.write(b"/pyxs/w/after", b"5")
    c.read(b"/pyxs/w/after")  # a round trip: any event would have arrived by now
    assert m.events.empty()
    with pytest.raises(pyxs.PyXSError) as info:
        m.unwatch(b"/pyxs/w", b"tok")
    assert info.value.args[0] == errno.ENOENT
    m.close()


def test_pyxs_domains_and_special_watches(pyxs: Any, pyxs_client: Any) -> None:
    c = pyxs_client
    assert c.get_domain_path(3) == b"/local/domain/3"
    assert c.is_domain_introduced(0) is True
    assert c.is_domain_introduced(3) is False
    m = c.monitor()
    m.watch(b"@introduceDomain", b"intro")
    m.watch(b"@releaseDomain", b"release")
    assert _events(m, 2) == [(b"@introduceDomain", b"intro"), (b"@releaseDomain", b"release")]
    c.introduce_domain(3, 1234, 7)
    assert c.is_domain_introduced(3) is True
    assert _events(m, 1) == [(b"@introduceDomain", b"intro")]
    c.introduce_domain(4, 99, 8)
    assert _events(m, 1) == [(b"@introduceDomain", b"intro")]
    c.write(b"/local/domain/3/data", b"x")
    c.set_perms(b"/local/domain/3", [b"n3"])
    c.resume_domain(3)
    c.set_target(4, 3)
    with pytest.raises(pyxs.PyXSError) as info:
        c.set_target(9, 3)
    assert info.value.args[0] == errno.ENOENT
    c.release_domain(4)
    assert _events(m, 1) == [(b"@releaseDomain", b"release")]
    c.release_domain(3)
    assert _events(m, 1) == [(b"@releaseDomain", b"release")]
    assert c.is_domain_introduced(3) is False
    assert not c.exists(b"/local/domain/3")
    with pytest.raises(pyxs.PyXSError) as info:
        c.release_domain(3)
    assert info.value.args[0] == errno.ENOENT
    with pytest.raises(ValueError):
        c.introduce_domain(0, 1, 1)
    m.close()
