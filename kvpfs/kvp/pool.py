"""One pool file: fresh reads, single-record in-place writes, both lock families.

Locking follows the discipline every writer of a pool file should keep: an OFD
lock on the whole file (excludes ``hv_kvp_daemon`` and other fcntl users) and
then ``flock`` on the same descriptor (excludes cloud-init and azure-init), in
that order, shared for reads and exclusive for writes.  OFD locks belong to the
open file description, so unlike classic POSIX locks they survive another task
closing some other descriptor of the file; they do not exclude this process's
own tasks, which is what the per-pool trio lock is for.

The file is changed in place, never replaced: a set is one ``pwrite`` of a value
field (existing key) or of a whole record at the record boundary (new key), a
delete moves the later records up and truncates, as the daemon's own delete does.

Reads are served from the last parse while ``stat`` proves the file unchanged
(same inode, size, mtime and ctime).  A timestamp only proves that once the
clock has moved past it by more than the timestamp granularity: a parse taken
within :data:`RACY_NS` of the file's last change is not trusted, and the next
access reads the file again.  After its own write the pool moves the file's mtime
back by one nanosecond, to a value no later write can give it, so that a burst
of writes does not cost a whole-file read each.  Every read of the file happens under the shared
locks, so a daemon rewrite (truncate, then write) is never seen half done.

Locks are tried without blocking on the trio thread; only when another process
holds them does a worker thread wait, on a fresh open file description so that
a wait abandoned on timeout or cancellation can release its locks by itself
without touching the ones the pool takes later.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import trio

from kvpfs.errors import FsError
from kvpfs.kvp import records as rec
from kvpfs.kvp.records import Edit, Record

log = logging.getLogger(__name__)

#: (st_ino, st_size, st_mtime_ns, st_ctime_ns): what must stay equal for a parse to stay valid.
Stamp = tuple[int, int, int, int]

#: A parse is trusted by its stamp only when taken this long after the file's last change.
RACY_NS = 25_000_000

#: Default limit for waiting on another process's lock.
LOCK_TIMEOUT = 10.0

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padding.  l_pid must be 0 for the OFD commands.
_FLOCK = struct.Struct("hhqqi4x")
_WRITE_LOCK = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_READ_LOCK = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)

_REOPEN_ATTEMPTS = 5

#: Worker threads one pool may have waiting for locks.  A wait abandoned on timeout
#: keeps its thread until the other process lets go; a limiter of its own keeps
#: such threads from using up trio's default one, which the whole mount shares.
LOCK_WAIT_THREADS = 4


@dataclass(frozen=True, slots=True, eq=False)
class PoolState:
    """One parse of the pool file; never changed once made."""

    #: Every whole record in file order, duplicates included.
    records: tuple[Record, ...]
    #: Key → index of its first record (the one that counts), in file order.
    first: Mapping[bytes, int]
    #: File size in bytes, partial tail included.
    size: int
    mtime_ns: int
    #: The file's stamp when parsed; None when the file does not exist.
    stamp: Stamp | None
    #: Whether an unchanged stamp alone proves the file unchanged.
    settled: bool

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` (its first record), or None."""
        index = self.first.get(key)
        return None if index is None else self.records[index].value

    def items(self) -> list[tuple[bytes, bytes]]:
        """Each key once with its value, in file order."""
        records = self.records
        return [(key, records[index].value) for key, index in self.first.items()]


#: The pool file does not exist: an empty pool.
ABSENT = PoolState((), {}, 0, 0, None, True)
#: Nothing read yet (or a write failed half way): the next access reads the file.
_UNREAD = PoolState((), {}, 0, 0, None, False)

#: Called with (old, new) when a re-read finds that someone else changed the pool.
ChangeCallback = Callable[[PoolState, PoolState], None]


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(st: os.stat_result, clock_ns: int) -> bool:
    return clock_ns - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS


def _os_error(exc: OSError, what: str) -> FsError:
    return FsError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}")


def _try_lock(fd: int, exclusive: bool) -> bool:
    """Take both locks without blocking; False (holding neither) if either is busy."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRITE_LOCK if exclusive else _READ_LOCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BaseException as exc:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK)
        if isinstance(exc, OSError) and exc.errno == errno.EWOULDBLOCK:
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK)


class _LockWaiter:
    """Blocks in a worker thread for both locks on its own open file description.

    The descriptor is closed, releasing whatever it holds, by the thread if the
    trio side gave up while it was blocked, and otherwise by whoever owns the
    outcome: the caller after a success, :meth:`abandon` in every other case.
    """

    def __init__(self, fd: int, exclusive: bool) -> None:
        self.fd = fd
        self._exclusive = exclusive
        self._guard = threading.Lock()
        self._state = "waiting"  # → blocking → locked | failed; abandoned from any

    def wait(self) -> None:
        with self._guard:
            if self._state == "abandoned":
                return  # given up before the thread ran: the descriptor is already closed
            self._state = "blocking"
        try:
            fcntl.fcntl(
                self.fd, fcntl.F_OFD_SETLKW, _WRITE_LOCK if self._exclusive else _READ_LOCK
            )
            fcntl.flock(self.fd, fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH)
        except BaseException:
            self._finish("failed")
            raise
        self._finish("locked")

    def _finish(self, outcome: str) -> None:
        with self._guard:
            abandoned = self._state == "abandoned"
            self._state = outcome
        if abandoned:
            os.close(self.fd)

    def abandon(self) -> None:
        """The trio side gives up (timeout, cancellation, failure)."""
        with self._guard:
            blocking = self._state == "blocking"
            self._state = "abandoned"
        if not blocking:
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class _Held:
    fd: int
    #: A descriptor of its own (from a blocking wait), closed to release.
    own: bool


class PoolFile:
    """A pool file, read and changed as ``hv_kvp_daemon`` and its peers expect.

    All methods run on the trio thread.  Refusals by content (limits, writability)
    are the caller's business; this class raises FsError only for a missing key
    (ENOENT), an existing rename target (EEXIST), a lock another process holds
    for longer than ``lock_timeout`` (``timeout_errno``, ETIMEDOUT unless the
    owner says otherwise) and I/O errors.
    """

    def __init__(
        self,
        path: str,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        timeout_errno: int = errno.ETIMEDOUT,
    ) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self.timeout_errno = timeout_errno
        #: Set by the owner to hear about changes made by others.
        self.on_change: ChangeCallback | None = None
        self._state = _UNREAD
        #: The file's bytes as of ``_state`` (kept to skip re-parsing unchanged contents).
        self._raw = bytearray()
        self._fd: int | None = None
        self._fd_id: tuple[int, int] = (0, 0)
        self._fd_writable = False
        self._mutex = trio.Lock()
        self._waiters = trio.CapacityLimiter(LOCK_WAIT_THREADS)

    # -- reading ---------------------------------------------------------------------------

    async def state(self) -> PoolState:
        """The pool as the file holds it now."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._absent()
        except OSError as exc:
            raise _os_error(exc, self.path) from exc
        current = self._state
        if current.settled and current.stamp == _stamp(st):
            return current
        async with self._locked(exclusive=False, create=False) as fd:
            return self._absent() if fd is None else self._reload(fd)

    def _absent(self) -> PoolState:
        old = self._state
        if old is not ABSENT:
            self._close()
            self._state = ABSENT
            self._raw = bytearray()
            self._notify(old, ABSENT)
        return ABSENT

    def _notify(self, old: PoolState, new: PoolState) -> None:
        if self.on_change is None or old is _UNREAD or old.records == new.records:
            return
        try:
            self.on_change(old, new)
        except Exception:
            # A faulty listener must not fail the read that noticed the change.
            log.exception("kvp: change listener failed for %s", self.path)

    def _reload(self, fd: int) -> PoolState:
        """Bring the parse up to date; the caller holds the locks."""
        clock = time.time_ns()
        st = os.fstat(fd)
        stamp = _stamp(st)
        current = self._state
        if current.settled and current.stamp == stamp:
            return current
        data = _read_all(fd, st.st_size)
        if current.stamp is not None and data == self._raw:
            records, first = current.records, current.first
        else:
            records = tuple(rec.parse(data))
            first = rec.first_indexes(record.key for record in records)
            self._raw = bytearray(data)
        # The stamp is from before the read: a change racing with the read shows up
        # as a stamp mismatch at the next access, never as a stale parse.
        new = PoolState(records, first, len(data), st.st_mtime_ns, stamp, _settled(st, clock))
        self._state = new
        self._notify(current, new)
        return new

    # -- writing ---------------------------------------------------------------------------

    async def set(self, key: bytes, value: bytes) -> None:
        """Give ``key`` the value ``value``: one record written, nothing else touched."""
        async with self._locked(exclusive=True, create=True) as fd:
            assert fd is not None
            state = self._reload(fd)
            index = state.first.get(key)
            edit = rec.plan_set(state.first, state.size, key, value)
            first: Mapping[bytes, int]
            if index is None:
                self._execute(fd, edit, restore_size=edit.offset)
                records = (*state.records, Record(key, value))
                first = {**state.first, key: len(state.records)}
            else:
                self._execute(fd, edit)
                records = _replaced(state.records, index, Record(key, value))
                first = state.first  # same keys at the same places; never mutated
            self._commit(fd, records, first)

    async def delete(self, key: bytes) -> None:
        """Remove the first record of ``key``; ENOENT if there is none."""
        async with self._locked(exclusive=True, create=False) as fd:
            if fd is None:
                raise FsError(errno.ENOENT)
            state = self._reload(fd)
            index = state.first.get(key)
            if index is None:
                raise FsError(errno.ENOENT)
            records = self._remove(fd, state.records, index)
            self._commit(fd, records, rec.first_indexes(r.key for r in records))

    async def rename(self, old: bytes, new: bytes, *, replace: bool) -> None:
        """Move ``old``'s value to ``new`` in one locked update.

        Without an existing ``new``, ``old``'s record gets the new key in place.
        Otherwise (only with ``replace``, else EEXIST) the value goes into ``new``'s
        record and ``old``'s record is removed.
        """
        async with self._locked(exclusive=True, create=False) as fd:
            if fd is None:
                raise FsError(errno.ENOENT)
            state = self._reload(fd)
            index = state.first.get(old)
            if index is None:
                raise FsError(errno.ENOENT)
            if old == new:
                return
            value = state.records[index].value
            target = state.first.get(new)
            if target is None:
                self._execute(fd, rec.plan_rename_key(index, new))
                records = _replaced(state.records, index, Record(new, value))
            elif not replace:
                raise FsError(errno.EEXIST)
            else:
                # Value first: a failure in between leaves both keys, never neither.
                self._execute(fd, rec.plan_set(state.first, state.size, new, value))
                records = self._remove(
                    fd, _replaced(state.records, target, Record(new, value)), index
                )
            self._commit(fd, records, rec.first_indexes(r.key for r in records))

    def _remove(self, fd: int, records: tuple[Record, ...], index: int) -> tuple[Record, ...]:
        following = bytes(self._raw[rec.record_offset(index + 1) :])
        self._execute(fd, rec.plan_delete(index, len(self._raw), following))
        return records[:index] + records[index + 1 :]

    def _execute(self, fd: int, edit: Edit, *, restore_size: int | None = None) -> None:
        try:
            view = memoryview(edit.data)
            offset = edit.offset
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
            if edit.truncate_to is not None:
                os.ftruncate(fd, edit.truncate_to)
        except OSError as exc:
            self._state = _UNREAD
            if restore_size is not None:
                # Drop a half-written new record; readers ignore a partial one anyway.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, restore_size)
            raise _os_error(exc, self.path) from exc
        rec.apply_edit_in_place(self._raw, edit)

    def _commit(self, fd: int, records: tuple[Record, ...], first: Mapping[bytes, int]) -> None:
        """Record the pool as this process just wrote it; the caller still holds the locks."""
        clock = time.time_ns()
        st = os.fstat(fd)
        settled = _settled(st, clock)
        if not settled:
            # Our write's mtime is from the current clock tick, so another writer in the
            # same tick could leave the stamp as it is.  One nanosecond back, our mtime is
            # one that no later write can produce, and the parse stays trusted without
            # reading the whole file again at the next access.
            try:
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns - 1))
                st = os.fstat(fd)
                settled = True
            except OSError:
                pass  # not the file's owner: the next access re-reads instead
        self._state = PoolState(
            records, first, len(self._raw), st.st_mtime_ns, _stamp(st), settled
        )

    # -- descriptor and locks --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, *, exclusive: bool, create: bool) -> AsyncIterator[int | None]:
        """Hold both locks (shared or exclusive); yields None if the file is absent.

        ``create`` makes a missing file, as the daemon creates its pools at startup.
        """
        try:
            # Uncontended, skip the scheduling round trip of a full acquire: this is
            # on the path of every write and of every read that finds the file changed.
            self._mutex.acquire_nowait()
        except trio.WouldBlock:
            await self._mutex.acquire()
        try:
            held = await self._acquire(exclusive, create)
            try:
                yield None if held is None else held.fd
            finally:
                if held is not None:
                    self._release(held)
        finally:
            self._mutex.release()

    async def _acquire(self, exclusive: bool, create: bool) -> _Held | None:
        held: _Held | None = None
        for attempt in range(_REOPEN_ATTEMPTS):
            fd = self._open(write=exclusive, create=create)
            if fd is None:
                return None
            if _try_lock(fd, exclusive):
                held = _Held(fd, own=False)
            else:
                held = _Held(await self._wait_for_lock(fd, exclusive), own=True)
            if attempt == _REOPEN_ATTEMPTS - 1 or self._is_current(held.fd):
                break
            # Replaced or removed while we waited for the lock: start over on the new file.
            self._release(held)
            self._close()
        return held

    def _release(self, held: _Held) -> None:
        if held.own:
            os.close(held.fd)
        else:
            _unlock(held.fd)

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _open(self, *, write: bool, create: bool) -> int | None:
        """The pool's descriptor on the file now at ``path``; None if absent."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:
            raise _os_error(exc, self.path) from exc
        else:
            if (
                self._fd is not None
                and self._fd_id == (st.st_dev, st.st_ino)
                and (self._fd_writable or not write)
            ):
                return self._fd
        self._close()
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | (os.O_CREAT if create else 0), 0o644)
            writable = True
        except FileNotFoundError:
            return None
        except OSError as exc:
            if write or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _os_error(exc, self.path) from exc
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as exc2:
                raise _os_error(exc2, self.path) from exc2
            writable = False
        own = os.fstat(fd)
        self._fd, self._fd_id, self._fd_writable = fd, (own.st_dev, own.st_ino), writable
        return fd

    async def _wait_for_lock(self, fd: int, exclusive: bool) -> int:
        flags = (os.O_RDWR if self._fd_writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fresh = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError:
            try:
                fresh = os.open(self.path, flags)
            except OSError as exc:
                raise _os_error(exc, self.path) from exc
        waiter = _LockWaiter(fresh, exclusive)
        try:
            with trio.move_on_after(self.lock_timeout):
                await trio.to_thread.run_sync(
                    waiter.wait, abandon_on_cancel=True, limiter=self._waiters
                )
                return fresh
        except BaseException:
            waiter.abandon()
            raise
        waiter.abandon()
        raise FsError(
            self.timeout_errno,
            f"{self.path} stayed locked by another process for {self.lock_timeout:g} s",
        )

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        """Release the descriptor; the pool reopens the file if used again."""
        self._close()
        self._state = _UNREAD


def _replaced(records: tuple[Record, ...], index: int, record: Record) -> tuple[Record, ...]:
    changed = list(records)
    changed[index] = record
    return tuple(changed)


def _read_all(fd: int, size_hint: int) -> bytes:
    # One pread normally: a short read of a regular file means end of file.
    chunks: list[bytes] = []
    offset = 0
    want = size_hint + 1
    while True:
        chunk = os.pread(fd, want, offset)
        chunks.append(chunk)
        offset += len(chunk)
        if len(chunk) < want:
            return b"".join(chunks)
        want = max(want, 1 << 20)
