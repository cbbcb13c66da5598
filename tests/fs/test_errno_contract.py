"""The seam's errno contract through a real mount (kvpfs/fs/view.py): only an
FsError's errno reaches the caller; anything else a view raises, an OSError with a
perfectly good errno included, is logged once with its traceback at the view's
logger and answered EIO."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import pytest

from kvpfs.errors import FsError
from kvpfs.fs.view import Path
from tests.fs.memory_view import MemoryView
from tests.mounting import in_thread, read_bytes, write_bytes

pytestmark = pytest.mark.mount


@dataclass
class BrokenView(MemoryView):
    """Raises ``failure`` from read and write while it is set."""

    failure: Exception | None = None

    async def read(self, path: Path) -> bytes:
        if self.failure is not None:
            raise self.failure
        return await super().read(path)

    async def write(self, path: Path, value: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        await super().write(path, value)


@pytest.fixture
def store() -> BrokenView:
    b = BrokenView()
    b.add_dir(("d",))
    b.tree[("d",)]["k"] = b"value"
    return b


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


FAILURES = [
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), errno.EIO, id="OSError-ENOSPC"),
    pytest.param(ConnectionResetError(errno.ECONNRESET, "reset"), errno.EIO, id="ECONNRESET"),
    pytest.param(ValueError("a bug"), errno.EIO, id="ValueError"),
    pytest.param(FsError(errno.ENOSPC), errno.ENOSPC, id="FsError-ENOSPC"),
]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


@pytest.mark.parametrize(("failure", "expected"), FAILURES)
async def test_read_failure(
    mount, store: BrokenView, caplog: pytest.LogCaptureFixture, failure: Exception, expected: int
) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    store.failure = failure
    assert await in_thread(errno_of, read_bytes, k) == expected
    logged = tracebacks(caplog)
    if isinstance(failure, FsError):
        assert logged == []
    else:
        # Once, at the logger of the view's module, with the view's own exception.
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert logged[0].name == __name__
        assert logged[0].levelno == logging.ERROR
        assert logged[0].exc_info is not None and logged[0].exc_info[1] is failure
    store.failure = None
    assert await in_thread(read_bytes, k) == b"value\n"


@pytest.mark.parametrize(("failure", "expected"), FAILURES)
async def test_commit_failure_reaches_close_and_is_dropped(
    mount, store: BrokenView, caplog: pytest.LogCaptureFixture, failure: Exception, expected: int
) -> None:
    s = await mount([store])
    k = f"{s.mountpoint}/mem/d/k"
    store.failure = failure
    assert await in_thread(errno_of, write_bytes, k, b"new\n") == expected
    store.failure = None
    # Refused at flush, so not stored at release either.
    assert store.value(("d", "k")) == b"value"
    assert store.writes() == []
    logged = tracebacks(caplog)
    assert len(logged) == (0 if isinstance(failure, FsError) else 1)
    assert all(r.name == __name__ for r in logged)
