"""The one exception type that crosses from a backend into the FUSE layer."""

from __future__ import annotations

import errno as _errno
import os


class FsError(Exception):
    """An operation failed with a specific errno.

    Backends raise this (never pyfuse3.FUSEError) so that they stay usable and
    testable without FUSE; the FUSE layer turns it into the reply to the kernel.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(f"[{_errno.errorcode.get(errno, errno)}] {self.message}")


class UsageError(Exception):
    """A one-line message for the user of a command; exit status 2 (usage) or 1."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
