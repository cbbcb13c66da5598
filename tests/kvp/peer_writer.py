"""Other writers of a pool file, for the concurrency tests; independent of kvpfs's code.

    peer_writer.py PATH rewrite-posix PREFIX OPS SEED   hv_kvp_daemon's way: classic
        fcntl write lock, read the whole file, change one record in memory (set in
        place keeping old bytes behind the NUL, append, or delete by shifting), then
        truncate and write the whole file back
    peer_writer.py PATH inplace-ofd PREFIX OPS SEED     OFD write lock, set only:
        pwrite a value field in place or append a record with O_APPEND
    peer_writer.py PATH append-flock PREFIX OPS SEED    cloud-init's way: open for
        append, flock(LOCK_EX), write one record, unlock, close

Each writer pauses a random 0-1 ms between operations (outside its lock), so
that its work spreads over a while and interleaves with the other writers'.
Prints the writer's final key → value model as JSON (keys and values as text).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import struct
import sys
import time

KEY, VALUE = 512, 2048
RECORD = KEY + VALUE
_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
_UNLOCK = struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0)


def pause(rng: random.Random) -> None:
    time.sleep(rng.random() / 1000)


def record(key: bytes, value: bytes) -> bytes:
    return key.ljust(KEY, b"\0") + value.ljust(VALUE, b"\0")


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size + RECORD, 0)


def keys_of(data: bytes) -> list[bytes]:
    return [
        data[i : i + KEY].split(b"\0", 1)[0] for i in range(0, len(data) // RECORD * RECORD, RECORD)
    ]


def rewrite_posix(path: str, prefix: str, ops: int, rng: random.Random) -> dict[str, str]:
    fd = os.open(path, os.O_RDWR)
    model: dict[str, str] = {}
    for n in range(ops):
        pause(rng)
        key = f"{prefix}{rng.randrange(20)}".encode()
        fcntl.fcntl(fd, fcntl.F_SETLKW, _LOCK)
        data = read_all(fd)
        records = [data[i : i + RECORD] for i in range(0, len(data) // RECORD * RECORD, RECORD)]
        keys = [r[:KEY].split(b"\0", 1)[0] for r in records]
        index = keys.index(key) if key in keys else None
        if rng.random() < 0.7:
            value = f"{key.decode()}={n}".encode()
            if index is None:
                records.append(record(key, value))
            else:
                old = records[index]
                # memcpy of the value and its NUL only, like the daemon.
                records[index] = old[:KEY] + value + b"\0" + old[KEY + len(value) + 1 :]
            model[key.decode()] = value.decode()
        elif index is not None:
            del records[index]
            del model[key.decode()]
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"".join(records), 0)
        fcntl.fcntl(fd, fcntl.F_SETLK, _UNLOCK)
    return model


def inplace_ofd(path: str, prefix: str, ops: int, rng: random.Random) -> dict[str, str]:
    fd = os.open(path, os.O_RDWR)
    append_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    model: dict[str, str] = {}
    for n in range(ops):
        pause(rng)
        key = f"{prefix}{rng.randrange(40)}".encode()
        value = f"{key.decode()}={n}".encode()
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _LOCK)
        keys = keys_of(read_all(fd))
        if key in keys:
            os.pwrite(fd, value.ljust(VALUE, b"\0"), keys.index(key) * RECORD + KEY)
        else:
            os.write(append_fd, record(key, value))
        model[key.decode()] = value.decode()
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK)
    return model


def append_flock(path: str, prefix: str, ops: int, rng: random.Random) -> dict[str, str]:
    model: dict[str, str] = {}
    for n in range(ops):
        pause(rng)
        key, value = f"{prefix}{n}", f"{prefix}{n}=appended"
        with open(path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(record(key.encode(), value.encode()))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        model[key] = value
    return model


def main() -> None:
    path, mode, prefix, ops, seed = sys.argv[1:6]
    writer = {"rewrite-posix": rewrite_posix, "inplace-ofd": inplace_ofd,
              "append-flock": append_flock}[mode]
    print(json.dumps(writer(path, prefix, int(ops), random.Random(int(seed)))))


if __name__ == "__main__":
    main()
