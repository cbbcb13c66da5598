"""A pool directory with known bytes, mounted through the kernel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpfs.fs.mount import Session
from kvpfs.fs.operations import FsOptions
from kvpfs.kvp.location import pool_path
from kvpfs.kvp.view import KvpView

POOLS = ("external", "guest", "auto", "auto_external", "auto_internal")


def rec(key: bytes, value: bytes) -> bytes:
    """One record as the daemon lays it out: NUL-padded 512-byte key, 2048-byte value."""
    return key.ljust(512, b"\0") + value.ljust(2048, b"\0")


@dataclass
class Pools:
    directory: Path

    def path(self, pool: str) -> Path:
        return Path(pool_path(str(self.directory), POOLS.index(pool)))

    def bytes(self, pool: str) -> bytes:
        return self.path(pool).read_bytes()

    def set_bytes(self, pool: str, data: bytes) -> None:
        # In place, as the daemon rewrites: same inode, truncate and write.
        with open(self.path(pool), "r+b") as f:
            f.truncate(0)
            f.write(data)

    def snapshot(self) -> dict[str, bytes]:
        return {p: self.bytes(p) for p in POOLS}


async def mount_kvp(
    mount,  # type: ignore[no-untyped-def]
    pools: Pools,
    *,
    options: FsOptions | None = None,
    read_only: bool = False,
    **backend_options: object,
) -> tuple[Session, str]:
    backend = KvpView(str(pools.directory), read_only=read_only, **backend_options)  # type: ignore[arg-type]
    session = await mount([backend], options, read_only=read_only)
    return session, f"{session.mountpoint}/kvp"
