"""What the real-daemon tests need: skip reasons, a bounded runner, leftover checks."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvpfs.peers.hyperv import hostsim
from tests.conftest import fuse_usable

ROOT = Path(__file__).resolve().parent.parent.parent
PEERS = ROOT / ".cache" / "peers"
CLOUD_INIT = PEERS / "cloud-init" / "usr" / "lib" / "python3" / "dist-packages"
WAAGENT = PEERS / "waagent" / "usr" / "lib" / "python3" / "dist-packages"


@functools.cache
def real_environment_missing() -> str | None:
    """Why the real daemon cannot run here (None if it can)."""
    reason = fuse_usable()
    if reason:
        return reason
    try:
        hostsim.find_daemon()
    except hostsim.HostsimError as exc:
        return str(exc)
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot try a mount namespace: {exc}"
    if probe.returncode != 0:
        return f"mount namespaces are not allowed here: {probe.stderr.strip()}"
    return None


def require_real_environment() -> None:
    reason = real_environment_missing()
    if reason:
        pytest.skip(f"real hv_kvp_daemon tests: {reason}")


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_bounded(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> Finished:
    """Run ``argv`` from the repository root; on timeout SIGINT (clean teardown), then kill."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")])
    )
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                out, err = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            raise AssertionError(
                f"{argv} did not finish in {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}"
            ) from None
    return Finished(process.returncode, out, err)


def hostsim_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvpfs.peers.hyperv.hostsim", *args]


def _mountinfo() -> str:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return f.read()


_MARKERS = (
    "kvpfs-hostsim",
    "kvpfs-realenv",
    " /dev/vmbus ",
    " /var/lib/hyperv ",
    " /sys/class/net",
    " /usr/libexec/hypervkvpd ",
    " /etc/resolv.conf ",
)
_OUTSIDE = ("/dev/vmbus", hostsim.POOL_DIR, "/usr/libexec/hypervkvpd/hv_set_ifconfig")


def _listing(path: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(path)))
    except OSError:
        return ()


def _text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@dataclass(frozen=True)
class Outside:
    """What a run must leave as it found it, seen from outside its namespaces."""

    mounts: tuple[int, ...]
    exists: tuple[bool, ...]
    #: The host's network: its interfaces (sysfs and the kernel's list) and resolver.
    interfaces: tuple[str, ...] = ()
    links: str = ""
    resolv_conf: str = ""
    scripts: tuple[str, ...] = ()

    @classmethod
    def now(cls) -> Outside:
        mounts = _mountinfo()
        return cls(
            tuple(mounts.count(marker) for marker in _MARKERS),
            tuple(os.path.exists(path) for path in _OUTSIDE),
            _listing("/sys/class/net"),
            _text("/proc/net/dev").split("\n", 2)[-1],
            _text("/etc/resolv.conf"),
            _listing("/usr/libexec/hypervkvpd"),
        )


def assert_nothing_left(
    before: Outside,
    *,
    namespace: str = "",
    pids: Sequence[int] = (),
    paths: Sequence[str] = (),
) -> None:
    """Nothing of a finished run is visible from here: mounts, processes, files."""
    after = Outside.now()
    assert after.mounts == before.mounts, f"mounts left: {_MARKERS} {before} {after}"
    assert after.exists == before.exists, f"files left: {_OUTSIDE} {before} {after}"
    assert after.interfaces == before.interfaces, f"interfaces: {before} {after}"
    assert _names(after.links) == _names(before.links), "the host's interfaces changed"
    assert after.resolv_conf == before.resolv_conf, "the host's /etc/resolv.conf changed"
    assert after.scripts == before.scripts, "the host's hypervkvpd scripts changed"
    for path in paths:
        assert not os.path.exists(path), f"{path} is left"
    for pid in pids:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue  # gone
        assert namespace and ns != namespace, f"process {pid} is still running"


def _names(proc_net_dev: str) -> list[str]:
    return sorted(line.split(":", 1)[0].strip() for line in proc_net_dev.splitlines() if ":" in line)


def parse_markers(stdout: str, marker: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(marker + " ")]
