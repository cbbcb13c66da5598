"""Inside ``kvpfs hostsim``: Debian's cloud-init reports to pool 1, the host enumerates.

Argument: the directory holding Debian's ``cloudinit`` package.  cloud-init's
``HyperVKvpReportingHandler`` writes ``/var/lib/hyperv/.kvp_pool_1`` itself,
unmodified (its default path); the host's view is ``$KVPFS_MOUNT/host/guest``,
each file an ENUMERATE through the real daemon.  Prints, as JSON on the last
line, what the host saw and what the guest's ``kvp/guest`` lists.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, sys.argv[1])

from cloudinit.reporting import events  # type: ignore[import-not-found]
from cloudinit.reporting.handlers import (  # type: ignore[import-not-found]
    HyperVKvpReportingHandler,
)

MOUNT = os.environ["KVPFS_MOUNT"]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def main() -> None:
    handler = HyperVKvpReportingHandler()
    for i in range(4):
        description = "d" * 3000 if i == 0 else f"event {i}"
        handler.publish_event(events.ReportingEvent("start", f"init-local/search-{i}", description))
    handler.publish_event(events.FinishReportingEvent("init-local/search-1", "done"))
    handler.flush()
    guest = os.path.join(MOUNT, "host", "guest")
    host = {name: read(os.path.join(guest, name))[:-1] for name in os.listdir(guest)}
    kvp = os.path.join(MOUNT, "kvp", "guest")
    local = {name: read(os.path.join(kvp, name))[:-1] for name in os.listdir(kvp)}
    print(json.dumps({"host": host, "host_order": os.listdir(guest), "kvp": local}), flush=True)


if __name__ == "__main__":
    main()
