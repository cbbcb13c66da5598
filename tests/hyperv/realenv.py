"""Run scenarios against the real hv_kvp_daemon: ``python -m tests.hyperv.realenv NAME``.

Enters private mount and network namespaces (as ``kvpfs hostsim`` does), builds
the synthetic network adapters (the scenario's ``--nic`` options over the
default eth0), starts the environment (mount, emulated device, daemon) in this
process and runs the
scenario coroutine with direct access to the simulated host, so that it can also
send messages the kernel would never build.  Prints ``PASS NAME`` and exits 0,
or prints the traceback and exits 1.  Root only; the pytest wrapper checks.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

import trio

from kvpfs.peers.hyperv import hostsim
from kvpfs.peers.hyperv.netns import apply_nic_option, default_nics


def main(argv: list[str]) -> int:
    from tests.hyperv import scenarios

    name = argv[0]
    scenario = scenarios.SCENARIOS[name]
    nics = default_nics()
    for option in scenario.nics:
        nics = apply_nic_option(nics, option)
    config = hostsim.Config(
        command=["-"],
        daemon=hostsim.find_daemon(),
        verbose=bool(os.environ.get("KVPFS_TEST_VERBOSE")),
        timeout=scenario.kernel_timeout,
        items=hostsim.default_items(),
        nics=nics,
    )
    hostsim.enter_private_namespace()
    hostsim.prepare_filesystems()
    network = hostsim.prepare_network(config.nics)
    mountpoint = tempfile.mkdtemp(prefix="kvpfs-realenv-")
    print(f"namespace {os.readlink('/proc/self/ns/mnt')}", flush=True)

    daemons: list[int] = []

    async def run() -> None:
        async with hostsim.environment(config, mountpoint, network=network) as env:
            daemons[:] = env.started
            try:
                with trio.fail_after(scenario.time_limit):
                    await scenario.run(env)
            finally:
                daemons[:] = env.started

    started = time.monotonic()
    try:
        trio.run(run)
    except BaseException:
        traceback.print_exc()
        print(f"FAIL {name} after {time.monotonic() - started:.2f} s", flush=True)
        return 1
    finally:
        network.close()
        print(f"mountpoint {mountpoint}", flush=True)
        print(f"daemons {' '.join(map(str, daemons))}", flush=True)
        try:
            os.rmdir(mountpoint)
        except OSError as exc:
            print(f"could not remove {mountpoint}: {exc}", flush=True)
    print(f"PASS {name} in {time.monotonic() - started:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
