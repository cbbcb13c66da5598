"""Hold a lock on a pool file from another process: PATH ofd|posix|flock ex|sh SECONDS.

Prints "locked" once the lock is held, then holds it for SECONDS (or until killed).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import time


def main() -> None:
    path, kind, mode, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    fd = os.open(path, os.O_RDWR)
    ltype = fcntl.F_WRLCK if mode == "ex" else fcntl.F_RDLCK
    if kind == "ofd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", ltype, 0, 0, 0, 0))
    elif kind == "posix":
        # What hv_kvp_daemon does: a classic whole-file record lock.
        fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi4x", ltype, 0, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_EX if mode == "ex" else fcntl.LOCK_SH)
    print("locked", flush=True)
    time.sleep(seconds)


if __name__ == "__main__":
    main()
