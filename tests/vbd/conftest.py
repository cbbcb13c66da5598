"""Fixtures for the vbd tests: a xenstored (embedded or the real cxenstored 4.17)
holding dom0 and guest domain 1 as domain creation leaves them, image files, and
``xenstore-ls -f -p`` dumps for before/after comparisons."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from kvpfs.vbd.layout import dom0_ops, domain_creation_ops
from kvpfs.xenstore.protocol import Op
from tests.xenstore import conftest as _xs_fixtures
from tests.xenstore.conftest import RawConn, ServerPath

# The XenStore suite's server fixtures, registered here under the same names.
embedded_factory = _xs_fixtures.embedded_factory
fakexen_so = _xs_fixtures.fakexen_so
xenstored_real = _xs_fixtures.xenstored_real

GUEST = 1
GUEST_NAME = "guest1"


def apply_ops(path: str, ops: list) -> None:  # type: ignore[type-arg]
    """Send layout operations over a raw connection (tests' own set-up)."""
    with RawConn(path) as c:
        for op in ops:
            if op.op == "write":
                payload = op.path.encode() + b"\0" + op.value
                code = Op.WRITE
            elif op.op == "mkdir":
                payload, code = op.path.encode() + b"\0", Op.MKDIR
            elif op.op == "set_perms":
                payload = op.path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in op.perms)
                code = Op.SET_PERMS
            else:
                payload, code = op.path.encode() + b"\0", Op.RM
            reply = c.rq(code, payload)
            assert not reply.startswith(b"E:"), (op, reply)


def make_domains(path: str) -> None:
    """What the embedded server's ``initial="domains"`` holds, on any server."""
    apply_ops(path, dom0_ops() + domain_creation_ops(GUEST, GUEST_NAME))


def _embedded(request: pytest.FixtureRequest) -> ServerPath:
    factory: Callable[..., ServerPath] = request.getfixturevalue("embedded_factory")
    return factory(guests=(GUEST,), initial="domains")


@pytest.fixture(params=["embedded", "real"])
def xs(request: pytest.FixtureRequest) -> ServerPath:
    """A xenstored with dom0 and guest 1 (embedded: with guest 1's domain socket)."""
    if request.param == "embedded":
        return _embedded(request)
    path: ServerPath = request.getfixturevalue("xenstored_real")
    make_domains(path)
    return path


@pytest.fixture
def xs_embedded(request: pytest.FixtureRequest) -> ServerPath:
    return _embedded(request)


@pytest.fixture
def xs_real(request: pytest.FixtureRequest) -> ServerPath:
    path: ServerPath = request.getfixturevalue("xenstored_real")
    make_domains(path)
    return path


def xs_ls(path: str, *args: str) -> str:
    """``xenstore-ls -f -p`` (the real tool) against ``path``."""
    env = dict(os.environ, XENSTORED_PATH=path)
    out = subprocess.run(
        ["xenstore-ls", "-f", "-p", *args], env=env, capture_output=True, check=True, timeout=20
    )
    return out.stdout.decode()


async def axs_ls(path: str, *args: str) -> str:
    return await trio.to_thread.run_sync(lambda: xs_ls(path, *args))


def parse_ls(text: str) -> dict[str, tuple[str, str]]:
    """``path -> (value, perms)`` from ``xenstore-ls -f -p`` output."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        path, _, rest = line.partition(" = ")
        value, _, perms = rest.rpartition(" (")
        value = value.rstrip()  # xenstore-ls pads the value to a column
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out[path] = (value, perms.rstrip(")"))
    return out


def ls_order(text: str) -> list[str]:
    return [line.partition(" = ")[0] for line in text.splitlines()]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 4 MiB sparse image file."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
    return p


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    def make(name: str, size: int = 1 << 20) -> Path:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    yield make
