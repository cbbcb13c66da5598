"""Run Debian's unmodified cloud-init KVP reporting handler: PATH COUNT PAUSE_MS.

Publishes COUNT events named ``init-local/search-<i>`` (every fifth with a
3000-character description, which cloud-init splits into several records),
pausing up to PAUSE_MS between events and flushing every ten, then flushes.
cloud-init must be importable (PYTHONPATH).
"""

from __future__ import annotations

import random
import sys
import time

from cloudinit.reporting import events  # type: ignore[import-not-found]
from cloudinit.reporting.handlers import (  # type: ignore[import-not-found]
    HyperVKvpReportingHandler,
)


def main() -> None:
    path, count, pause_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    handler = HyperVKvpReportingHandler(kvp_file_path=path)
    rng = random.Random(0)
    for i in range(count):
        description = "d" * 3000 if i % 5 == 0 else f"event {i}"
        handler.publish_event(events.ReportingEvent("start", f"init-local/search-{i}", description))
        if i % 10 == 9:
            handler.flush()
        time.sleep(rng.random() * pause_ms / 1000)
    handler.flush()
    print("done", flush=True)


if __name__ == "__main__":
    main()
