"""kvpfs.xenstore.errnos: the one table from XenStore errors to a file operation's
errno (README, "XenStore errors"), used by ``xenstore/`` and ``vbd/`` alike."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from kvpfs.errors import FsError
from kvpfs.xenstore import errnos
from kvpfs.xenstore.errnos import fs_errno, fs_error
from kvpfs.xenstore.protocol import XenStoreError


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        # kept
        (errno.ENOENT, errno.ENOENT),
        (errno.EACCES, errno.EACCES),
        (errno.EPERM, errno.EPERM),
        (errno.EEXIST, errno.EEXIST),
        (errno.EINVAL, errno.EINVAL),
        (errno.ENOTEMPTY, errno.ENOTEMPTY),
        (errno.EISDIR, errno.EISDIR),
        (errno.EROFS, errno.EROFS),
        (errno.EAGAIN, errno.EAGAIN),
        # renamed
        (errno.E2BIG, errno.EFBIG),
        (errno.ENOSPC, errno.EDQUOT),
        # the server's failures and the connection's: EIO
        (errno.EIO, errno.EIO),
        (errno.ENOMEM, errno.EIO),
        (errno.ENOSYS, errno.EIO),
        (errno.EBUSY, errno.EIO),
        (errno.EISCONN, errno.EIO),
        (errno.ECONNRESET, errno.EIO),
        (errno.ENOTCONN, errno.EIO),
        (errno.ESHUTDOWN, errno.EIO),
        (errno.ETIMEDOUT, errno.EIO),
        (0, errno.EIO),
        (None, errno.EIO),
    ],
)
def test_table(err: int | None, expected: int) -> None:
    assert fs_errno(err) == expected
    if err:
        exc = fs_error(XenStoreError(err))
        assert isinstance(exc, FsError)
        assert exc.errno == expected
        assert exc.message.startswith("xenstore: ")


def test_module_is_pure() -> None:
    tree = ast.parse(Path(errnos.__file__).read_text())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "errno", "kvpfs.errors", "kvpfs.xenstore.protocol"}
