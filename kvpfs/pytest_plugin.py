"""The kvpfs pytest plugin (entry point ``pytest11``): a XenStore, KVP pools and an
attachable disk for a test, in a container without a hypervisor.

Fixtures (see the README, "Testing other projects with kvpfs"):

``kvpfs_xenstored``
    An :class:`~kvpfs.testing.EmbeddedXenstored` on a private socket for one test;
    options through ``@pytest.mark.kvpfs_xenstored(domains=..., load=...)``.
``kvpfs_xenstored_session``
    The same, shared by the whole session (default options).
``kvpfs_xenstored_factory``
    ``kvpfs_xenstored_factory(**options)`` starts more; all stop after the test.
``kvpfs_mount``
    A :class:`~kvpfs.testing.KvpfsMount`: ``python -m kvpfs embedded`` on temporary
    pools, with its own embedded xenstored and simulated block backend; options
    through ``@pytest.mark.kvpfs(raw=True, attr_timeout=0, ...)``.
``kvpfs_mount_factory``
    ``kvpfs_mount_factory(**options)`` mounts more; all unmount after the test.

Nothing is exported to the environment: ``xs.setenv(monkeypatch)`` does that for
one test.  The mount fixtures skip (with the reason) where /dev/fuse or the right
to mount is missing, and fail on any other error.  This module is a composition
root; it imports :mod:`kvpfs.testing` only when a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvpfs.testing import EmbeddedXenstored, KvpfsMount

XenstoredFactory = Callable[..., "EmbeddedXenstored"]
MountFactory = Callable[..., "KvpfsMount"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kvpfs(**options): mount options for the kvpfs_mount fixture "
        "(raw=True, attr_timeout=0, kvp_writable='all', xenstore='off', kvp_dir=...)",
    )
    config.addinivalue_line(
        "markers",
        "kvpfs_xenstored(domains=None, load=None, initial='xenstored'): options for the "
        "kvpfs_xenstored fixture",
    )


def _marker_options(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    """The keyword arguments of the test's ``name`` markers, the closest winning."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(name))):
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{name} takes keyword arguments only")
        options.update(marker.kwargs)
    return options


@pytest.fixture
def kvpfs_xenstored_factory() -> Iterator[XenstoredFactory]:
    """``kvpfs_xenstored_factory(domains=..., load=..., initial=...)`` -> a started
    :class:`~kvpfs.testing.EmbeddedXenstored`; every one stops after the test."""
    from kvpfs.testing import EmbeddedXenstored

    started: list[EmbeddedXenstored] = []

    def factory(**options: Any) -> EmbeddedXenstored:
        server = EmbeddedXenstored(**options)
        server.start()
        started.append(server)
        return server

    try:
        yield factory
    finally:
        errors = []
        for server in reversed(started):
            try:
                server.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def kvpfs_xenstored(
    request: pytest.FixtureRequest, kvpfs_xenstored_factory: XenstoredFactory
) -> EmbeddedXenstored:
    """An embedded xenstored for this test (``@pytest.mark.kvpfs_xenstored(...)``)."""
    return kvpfs_xenstored_factory(**_marker_options(request, "kvpfs_xenstored"))


@pytest.fixture(scope="session")
def kvpfs_xenstored_session() -> Iterator[EmbeddedXenstored]:
    """An embedded xenstored shared by every test of the session that asks for it."""
    from kvpfs.testing import EmbeddedXenstored

    with EmbeddedXenstored() as server:
        yield server


@pytest.fixture
def kvpfs_mount_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """``kvpfs_mount_factory(**options)`` -> a mounted :class:`~kvpfs.testing.KvpfsMount`,
    each on directories of its own; every one is unmounted after the test, and its
    process waited for, also when the test failed."""
    from kvpfs.testing import KvpfsMount, MountUnavailable

    mounts: list[KvpfsMount] = []

    def factory(**options: Any) -> KvpfsMount:
        mount = KvpfsMount(tmp_path_factory.mktemp("kvpfs"), **options)
        try:
            mount.start()
        except MountUnavailable as exc:
            pytest.skip(str(exc))
        mounts.append(mount)
        return mount

    try:
        yield factory
    finally:
        errors = []
        for mount in reversed(mounts):
            try:
                mount.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def kvpfs_mount(request: pytest.FixtureRequest, kvpfs_mount_factory: MountFactory) -> KvpfsMount:
    """A mounted kvpfs for this test (options: ``@pytest.mark.kvpfs(...)``)."""
    return kvpfs_mount_factory(**_marker_options(request, "kvpfs"))
