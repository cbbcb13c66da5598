"""The real hv_kvp_daemon against the emulated device, one scenario per process.

Each scenario (:mod:`tests.hyperv.scenarios`) runs in its own private mount
namespace (:mod:`tests.hyperv.realenv`); afterwards nothing of it may be visible
from here: no mount, no daemon process, no /var/lib/hyperv or /dev/vmbus.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.hyperv.scenarios import SCENARIOS
from tests.hyperv.support import (
    Outside,
    assert_nothing_left,
    parse_markers,
    require_real_environment,
    run_bounded,
)

pytestmark = pytest.mark.mount

#: Host operations of the soak; the default keeps it near 10 s on two cores.
SOAK_OPS = os.environ.get("KVPFS_SOAK_OPS", "3000")


@pytest.mark.parametrize("name", [name for name in SCENARIOS if not name.startswith("failing")])
def test_real_daemon(name: str) -> None:
    require_real_environment()
    before = Outside.now()
    scenario = SCENARIOS[name]
    result = run_bounded(
        [sys.executable, "-m", "tests.hyperv.realenv", name],
        timeout=scenario.time_limit + 20,
        env={"KVPFS_SOAK_OPS": SOAK_OPS},
    )
    if name == "soak":
        print(result.stdout)
    assert result.returncode == 0 and f"PASS {name}" in result.stdout, result.report()
    (namespace,) = parse_markers(result.stdout, "namespace")
    (mountpoint,) = parse_markers(result.stdout, "mountpoint")
    (daemons,) = parse_markers(result.stdout, "daemons")
    assert daemons.strip(), result.report()
    assert_nothing_left(
        before,
        namespace=namespace,
        pids=[int(pid) for pid in daemons.split()],
        paths=[mountpoint],
    )


def test_teardown_after_a_failure() -> None:
    require_real_environment()
    before = Outside.now()
    started = time.monotonic()
    result = run_bounded(
        [sys.executable, "-m", "tests.hyperv.realenv", "failing_mid_request"], timeout=60
    )
    assert result.returncode == 1, result.report()
    assert "FAIL failing_mid_request" in result.stdout
    assert "failing on purpose" in result.stdout + result.stderr
    assert time.monotonic() - started < 20
    (namespace,) = parse_markers(result.stdout, "namespace")
    (mountpoint,) = parse_markers(result.stdout, "mountpoint")
    (daemons,) = parse_markers(result.stdout, "daemons")
    (stray,) = parse_markers(result.stdout, "stray")
    assert_nothing_left(
        before,
        namespace=namespace,
        pids=[int(pid) for pid in (*daemons.split(), stray)],
        paths=[mountpoint],
    )
