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


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, with every exception group flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def one_line(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on, or None for a bug.

    A :class:`UsageError` says it itself; an OSError (a socket that refuses, a
    directory that is missing, a XenStore error) or an :class:`FsError` is its
    errno's text and the file it concerns.  Anything else is a bug in kvpfs and
    keeps its traceback.
    """
    found = leaves(exc)
    for leaf in found:
        if isinstance(leaf, UsageError):
            return str(leaf)
    for leaf in found:
        if isinstance(leaf, FsError):
            return leaf.message
        if isinstance(leaf, OSError):
            text = leaf.strerror or str(leaf)
            return f"{leaf.filename}: {text}" if leaf.filename else text
    return None
