"""``kvpfs xenstored`` as a command: seeding from a dom0's dump, dumping back,
extra domains, one-line errors, and a socket that is already served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.xenstore.conftest import ServerPath

KVPFS = [sys.executable, "-m", "kvpfs"]


def xs(server: str, *argv: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        list(argv), env={**os.environ, "XENSTORED_PATH": server}, input=stdin,
        capture_output=True, check=True, timeout=30,
    )
    return done.stdout


@contextmanager
def xenstored(*args: str, stdin: bytes | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*KVPFS, "xenstored", *args],
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    if proc.stdin is not None:
        proc.stdin.write(stdin or b"")
        proc.stdin.close()
        proc.stdin = None
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def ready_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    return proc.stdout.readline()


def stop(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out, err


def build_production_tree(server: str) -> None:
    """A small dom0 tree with the awkward parts: escapes, empty values, guest
    ownership, several permissions, deep paths."""
    xs(server, "xenstore-write", "/local/domain/0/name", "Domain-0", "/local/domain/7/name", "web")
    xs(server, "xenstore-write", "/local/domain/7/data/escapes", r"tab\there\nnew\\back\x01\xff")
    xs(server, "xenstore-write", "/local/domain/7/data/empty", "")
    xs(server, "xenstore-write", "/local/domain/0/backend/vbd/7/51712/params", "/srv/web.img")
    xs(server, "xenstore-chmod", "/local/domain/7", "n0", "r7")
    xs(server, "xenstore-chmod", "/local/domain/7/data", "n7", "r0", "b3")
    xs(server, "xenstore-chmod", "/local/domain/0/backend/vbd/7/51712", "n0", "r7")


def test_dump_from_cxenstored_loads_and_dumps_back_identically(
    xenstored_real: ServerPath, tmp_path: Path
) -> None:
    build_production_tree(xenstored_real)
    dump = xs(xenstored_real, "xenstore-ls", "-f", "-p", "/")
    assert b'escapes = "tab\\there\\nnew\\\\back\\001\\xff"' in dump
    (tmp_path / "dom0.txt").write_bytes(dump)
    sock = str(tmp_path / "xs.sock")
    out_file = tmp_path / "again.txt"
    with xenstored("--socket", sock, "--load", str(tmp_path / "dom0.txt"), "--dump", str(out_file)) as proc:
        assert ready_line(proc) == f"XENSTORED_PATH={sock}\n".encode()
        # The real tool reads the seeded tree exactly as it read the real one.
        assert xs(sock, "xenstore-ls", "-f", "-p", "/") == dump
        assert xs(sock, "xenstore-read", "/local/domain/7/data/escapes") == xs(
            xenstored_real, "xenstore-read", "/local/domain/7/data/escapes"
        )
        stop(proc)
    assert out_file.read_bytes() == dump


def test_load_from_stdin_and_dump_to_stdout(tmp_path: Path) -> None:
    text = b'/a = ""   (n0)\n/a/b = "v\\n"   (n0,r1)\n'
    sock = str(tmp_path / "xs.sock")
    with xenstored("--socket", sock, "--load", "-", "--dump", "-", stdin=text) as proc:
        assert ready_line(proc) == f"XENSTORED_PATH={sock}\n".encode()
        assert xs(sock, "xenstore-read", "/a/b") == b"v\\n\n"
        xs(sock, "xenstore-write", "/a/c", "new")
        out, _ = stop(proc)
    assert out == text + b'/a/c = "new"   (n0)\n'


def test_extra_domains_laid_out_as_domain_creation(tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    guest_sock = str(tmp_path / "dom3.sock")
    with xenstored(
        "--socket", sock, "--domain", "3:web", "--domain", "4:db", "--domain-socket", f"3:{guest_sock}"
    ) as proc:
        assert ready_line(proc) == f"XENSTORED_PATH={sock}\n".encode()
        assert ready_line(proc) == f"XENSTORED_DOMAIN_PATH_3={guest_sock}\n".encode()
        assert xs(sock, "xenstore-read", "/local/domain/3/name", "/local/domain/4/name") == b"web\ndb\n"
        assert xs(sock, "xenstore-read", "/local/domain/0/name") == b"Domain-0\n"
        assert xs(sock, "xenstore-read", "/local/domain/3/domid") == b"3\n"
        # The guest reads its home and owns what it must write, as libxl leaves it.
        listing = xs(sock, "xenstore-ls", "-f", "-p", "/local/domain/3").decode()
        assert '/local/domain/3/name = "web"   (n0,r3)' in listing
        assert '/local/domain/3/data = ""   (n3)' in listing
        assert '/local/domain/3/control/shutdown = ""   (n3)' in listing
        # The guest's agent writes its data/ as on a real dom0, and may not write
        # the name dom0 gave it.
        assert xs(guest_sock, "xenstore-write", "data/agent-version", "1.0") == b""
        assert xs(sock, "xenstore-read", "/local/domain/3/data/agent-version") == b"1.0\n"
        refused = subprocess.run(
            ["xenstore-write", "name", "evil"], env={**os.environ, "XENSTORED_PATH": guest_sock},
            capture_output=True, check=False,
        )
        assert refused.returncode != 0
        stop(proc)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a dump\n", "line 1: not 'PATH = \"VALUE\"   (PERMS)' (xenstore-ls -f -p)"),
        (b'/ok = ""   (n0)\n/bad path = ""   (n0)\n', "line 2: not 'PATH = \"VALUE\"   (PERMS)' (xenstore-ls -f -p)"),
        (b'/a = "\\q"   (n0)\n', "line 1: unknown escape \\q"),
        (b'/a = ""   (x0)\n', "line 1: invalid permission b'x0'"),
    ],
)
def test_a_bad_dump_is_one_line_and_nothing_runs(tmp_path: Path, content: bytes, message: str) -> None:
    dump = tmp_path / "bad.txt"
    dump.write_bytes(content)
    sock = tmp_path / "xs.sock"
    done = subprocess.run(
        [*KVPFS, "xenstored", "--socket", str(sock), "--load", str(dump)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 1
    assert done.stderr == f"kvpfs: {dump}: {message}\n"
    assert not sock.exists()


def test_a_served_socket_is_not_taken_over(tmp_path: Path) -> None:
    sock = str(tmp_path / "xs.sock")
    with xenstored("--socket", sock) as first:
        assert ready_line(first) == f"XENSTORED_PATH={sock}\n".encode()
        xs(sock, "xenstore-write", "/mine", "first")
        second = subprocess.run(
            [*KVPFS, "xenstored", "--socket", sock], capture_output=True, text=True, timeout=30, check=False
        )
        assert second.returncode == 1
        assert second.stderr == f"kvpfs: cannot serve on {sock}: Address already in use\n"
        assert xs(sock, "xenstore-read", "/mine") == b"first\n"
        stop(first)
    assert not os.path.exists(sock)
