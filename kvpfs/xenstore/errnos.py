"""The errno a file operation gets for a XenStore error: one table for every view
that reads XenStore (``xenstore/`` and ``vbd/``).  Pure.

README, "XenStore errors": connection trouble (ECONNRESET, ENOTCONN, ESHUTDOWN,
ETIMEDOUT: no answer in time) and the server's EIO, ENOMEM, ENOSYS, EBUSY and
EISCONN are all EIO; E2BIG (a value that does not fit one message) is EFBIG and
ENOSPC (a guest's quotas) is EDQUOT; the rest keep their errno.
"""

from __future__ import annotations

import errno

from kvpfs.errors import FsError
from kvpfs.xenstore.protocol import XenStoreError

_ERRNO = {
    errno.ENOENT: errno.ENOENT,
    errno.EACCES: errno.EACCES,
    errno.EPERM: errno.EPERM,
    errno.EEXIST: errno.EEXIST,
    errno.EINVAL: errno.EINVAL,
    errno.ENOTEMPTY: errno.ENOTEMPTY,
    errno.EISDIR: errno.EISDIR,
    errno.EROFS: errno.EROFS,
    errno.EAGAIN: errno.EAGAIN,
    # A value that does not fit one 4096-byte message.
    errno.E2BIG: errno.EFBIG,
    # A guest's quotas: nodes owned, node size, permission entries, transactions.
    errno.ENOSPC: errno.EDQUOT,
}


def fs_errno(err: int | None) -> int:
    """The errno a file operation gets for the XenStore error ``err``."""
    return _ERRNO.get(err or errno.EIO, errno.EIO)


def fs_error(exc: XenStoreError) -> FsError:
    """``exc`` as the FsError a view raises."""
    return FsError(fs_errno(exc.errno), f"xenstore: {exc}")
