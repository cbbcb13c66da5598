"""Append records to a pool file as cloud-init does: PATH COUNT PREFIX SEED.

O_APPEND, ``flock(LOCK_EX)``, one NUL-padded 512+2048-byte record, unlock, close;
a pause of up to 2 ms between records.  Values are JSON objects of 100 to 1000
bytes.  Prints the appended (key, value) pairs as JSON, in order.  Independent
of kvpfs's code.
"""

from __future__ import annotations

import fcntl
import json
import random
import sys
import time


def main() -> None:
    path, count, prefix, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    done = []
    for i in range(count):
        key = f"{prefix}{i}|{rng.getrandbits(32):08x}"
        value = json.dumps({"name": key, "i": i, "msg": "m" * rng.randrange(60, 900)})
        with open(path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(key.encode().ljust(512, b"\0") + value.encode().ljust(2048, b"\0"))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        done.append((key, value))
        time.sleep(rng.random() / 500)
    print(json.dumps(done))


if __name__ == "__main__":
    main()
