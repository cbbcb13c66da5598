"""``kvpfs hostsim -- COMMAND`` end to end: the one-line Hyper-V environment for CI.

Everything runs as a real command (``python -m kvpfs.peers.hyperv.hostsim``) with real
programs inside, including Debian's waagent and cloud-init, unmodified; after
each run nothing may be visible from outside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpfs.peers.hyperv import hostsim
from tests.hyperv.support import (
    CLOUD_INIT,
    ROOT,
    WAAGENT,
    Outside,
    assert_nothing_left,
    hostsim_argv,
    require_real_environment,
    run_bounded,
)

pytestmark = pytest.mark.mount

SHELL_SESSION = r"""
set -eu
M=$KVPFS_MOUNT
echo "mount $M"
echo "daemon $KVPFS_DAEMON_PID"
echo "pools $KVPFS_POOL_DIR"
test -e /dev/vmbus/hv_kvp
# The administrator's Add-VMKvpItem, and the guest seeing it.
echo 142.0 > "$M/host/external/NdDriverVersion"
echo "external $(cat "$M/kvp/external/NdDriverVersion")"
# The guest reporting, and the host enumerating it.
echo "provisioned" > "$M/kvp/guest/GuestStatus"
echo "guest $(cat "$M/host/guest/GuestStatus")"
echo "auto $(ls "$M/host/auto" | tr '\n' ' ')"
echo "vm $(cat "$M/kvp/auto_external/VirtualMachineName")"
# Remove-VMKvpItem.
rm "$M/host/external/NdDriverVersion"
for i in $(seq 50); do
    test -e "$M/kvp/external/NdDriverVersion" || break
    sleep 0.05
done
test ! -e "$M/kvp/external/NdDriverVersion" && echo "removed"
echo "records $(stat -c %s "$KVPFS_POOL_DIR/.kvp_pool_0")"
exit 3
"""


def lines(stdout: str) -> dict[str, str]:
    return {
        line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else ""
        for line in stdout.splitlines()
    }


def test_shell_session() -> None:
    require_real_environment()
    before = Outside.now()
    result = run_bounded(hostsim_argv("--", "bash", "-c", SHELL_SESSION), timeout=60)
    assert result.returncode == 3, result.report()
    out = lines(result.stdout)
    assert out["external"] == "142.0"
    assert out["guest"] == "provisioned"
    assert out["auto"].split()[:2] == ["FullyQualifiedDomainName", "IntegrationServicesVersion"]
    assert out["vm"] == hostsim.default_items()[3]["VirtualMachineName"]
    assert "removed" in out and out["records"] == "0"
    assert out["pools"] == "/var/lib/hyperv"
    assert_nothing_left(before, pids=[int(out["daemon"])], paths=[out["mount"]])


def test_waagent_reads_what_the_host_set() -> None:
    require_real_environment()
    if not (WAAGENT / "azurelinuxagent").is_dir():
        pytest.skip(f"Debian's waagent is not extracted under {WAAGENT}")
    before = Outside.now()
    script = str(ROOT / "tests" / "hyperv" / "peer_waagent.py")
    result = run_bounded(hostsim_argv("--", sys.executable, script, str(WAAGENT)), timeout=60)
    assert result.returncode == 0, result.report()
    assert json.loads(result.stdout.splitlines()[-1]) == ["142.0", "143.1", None]
    assert_nothing_left(before)


def test_cloud_init_reporting_reaches_the_host() -> None:
    require_real_environment()
    if not (CLOUD_INIT / "cloudinit").is_dir():
        pytest.skip(f"Debian's cloud-init is not extracted under {CLOUD_INIT}")
    pytest.importorskip("yaml", reason="cloud-init needs pyyaml")
    before = Outside.now()
    script = str(ROOT / "tests" / "hyperv" / "peer_cloudinit.py")
    result = run_bounded(hostsim_argv("--", sys.executable, script, str(CLOUD_INIT)), timeout=60)
    assert result.returncode == 0, result.report()
    seen = json.loads(result.stdout.splitlines()[-1])
    host, local = seen["host"], seen["kvp"]
    # 4 parts of the long event, 3 short starts and one finish, all seen by the host.
    assert len(host) == 8 and host == local
    assert all(name.startswith("CLOUD_INIT|") and "%2f" in name for name in host)
    events = [json.loads(value) for value in host.values()]
    assert sorted(e["msg_i"] for e in events if "msg_i" in e) == [0, 1, 2, 3]
    assert "".join(e["msg"] for e in events if "msg_i" in e) == "d" * 3000
    assert [e["type"] for e in events].count("finish") == 1
    # The host enumerates in file order: cloud-init's order of writing.
    assert seen["host_order"][-1].split("|")[2] == "finish"
    assert_nothing_left(before)


def test_host_items_options() -> None:
    require_real_environment()
    script = 'cat "$KVPFS_MOUNT/kvp/external/Greeting"; ls "$KVPFS_MOUNT/kvp/auto_external" | wc -l'
    result = run_bounded(
        hostsim_argv(
            "--no-host-items",
            "--host-item",
            "external:Greeting=hello",
            "--host-item",
            "auto_external:HostName=h",
            "--",
            "sh",
            "-c",
            script,
        ),
        timeout=60,
    )
    assert result.returncode == 0, result.report()
    assert result.stdout.split() == ["hello", "1"]
    bad = run_bounded(hostsim_argv("--host-item", "guest:K=V", "--", "true"), timeout=30)
    assert bad.returncode == 2 and "POOL:KEY=VALUE" in bad.stderr


def _start(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_line(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.split(" ", 1)[1].strip()
        if not line:
            break
    raise AssertionError(f"no {prefix!r} line from {process.args!r}")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True  # a zombie: dead, waiting for its parent
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_ends_everything() -> None:
    require_real_environment()
    before = Outside.now()
    process = _start(
        hostsim_argv("--", "sh", "-c", 'echo "daemon $KVPFS_DAEMON_PID"; exec sleep 30')
    )
    try:
        daemon = int(_wait_line(process, "daemon"))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        _, err = process.communicate()
    # The command got the signal and its status is hostsim's.
    assert process.returncode == 128 + signal.SIGTERM, err
    assert _gone(daemon, 5)
    assert_nothing_left(before)


def test_killed_hostsim_leaves_no_daemon(tmp_path: Path) -> None:
    require_real_environment()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    process = _start(
        hostsim_argv(
            "--mountpoint",
            str(mnt),
            "--",
            "sh",
            "-c",
            'echo "daemon $KVPFS_DAEMON_PID"; echo "command $$"; exec sleep 2',
        )
    )
    try:
        daemon = int(_wait_line(process, "daemon"))
        command = int(_wait_line(process, "command"))
        process.kill()
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
    # Its device gone, the daemon's read fails, its reopen fails, and it exits.
    assert _gone(daemon, 5), "the daemon outlived hostsim"
    # The command is the user's: it finishes, and with it the namespace goes.
    assert _gone(command, 10)
    assert_nothing_left(Outside.now(), paths=[])
    assert os.listdir(mnt) == []


def test_refusals() -> None:
    require_real_environment()
    cases: list[tuple[list[str], int, str]] = [
        (
            hostsim_argv("--daemon", "/nonexistent/hv_kvp_daemon", "--", "true"),
            1,
            "not an executable",
        ),
        (hostsim_argv(), 2, "a COMMAND is required"),
        (hostsim_argv("--", "/nonexistent/command"), 127, "cannot run /nonexistent/command"),
        (hostsim_argv("--mountpoint", "/nonexistent", "--", "true"), 1, "not a directory"),
    ]
    if shutil.which("setpriv"):
        cases += [
            (
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    *hostsim_argv("--", "true"),
                ],
                1,
                "needs root",
            ),
            (
                ["setpriv", "--bounding-set=-sys_admin", *hostsim_argv("--", "true")],
                1,
                "namespaces are not allowed",
            ),
        ]
    before = Outside.now()
    for argv, status, message in cases:
        result = run_bounded(argv, timeout=30)
        assert result.returncode == status, (argv, result.report())
        assert message in result.stderr, (argv, result.report())
        assert "Traceback" not in result.stderr
    assert_nothing_left(before)


def test_daemon_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(hostsim, "DAEMON_DIRS", (str(tmp_path),))
    with pytest.raises(hostsim.HostsimError, match="apt-get install hyperv-daemons"):
        hostsim.find_daemon()
    fake = tmp_path / "hv_kvp_daemon"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert hostsim.find_daemon() == str(fake)


def test_arguments() -> None:
    config = hostsim.parse_args(["--timeout", "5", "--", "cmd", "--flag"])
    assert config.command == ["cmd", "--flag"] and config.timeout == 5.0
    assert 3 in config.items and "VirtualMachineName" in config.items[3]
    config = hostsim.parse_args(["--no-host-items", "--host-item", "0:A=b=c", "x"])
    assert config.items == {0: {"A": "b=c"}} and config.command == ["x"]


# -- network adapters ------------------------------------------------------------------


def test_default_adapter_configuration() -> None:
    require_real_environment()
    before = Outside.now()
    result = run_bounded(
        hostsim_argv("--", "sh", "-c", "cat $KVPFS_MOUNT/host/net/*/config"), timeout=60
    )
    assert result.returncode == 0, result.report()
    assert result.stdout == (
        "IPAddresses=192.0.2.10\n"
        "Subnets=255.255.255.0\n"
        "DefaultGateways=192.0.2.1\n"
        "DNSServers=192.0.2.53\n"
        "DHCPEnabled=false\n"
    )
    assert_nothing_left(before)


NIC_SESSION = r"""
set -eu
N=$KVPFS_MOUNT/host/net
ls "$N" | tr '\n' ' '; echo
cat /sys/class/net/eth1/device/device_id /sys/class/net/eth1/address
cat "$N/00:15:5d:00:0b:02/config"
ip -o addr show dev eth1 | awk '{print $4}'
# A failover injection, line by line as bash writes it.
printf 'IPAddresses=198.51.100.7\nSubnets=255.255.255.0\nDefaultGateways=198.51.100.1\n' > "$N/00:15:5d:00:0a:01/config"
ip -o -4 addr show dev eth0 | awk '{print $4}'
ip route show default
cat /etc/resolv.conf | grep nameserver
ls /sys/class/net | tr '\n' ' '; echo
"""


def test_nic_option_and_injection() -> None:
    require_real_environment()
    before = Outside.now()
    guid = "0123abcd-4567-89ef-0123-456789abcdef"
    result = run_bounded(
        hostsim_argv(
            "--nic",
            f"eth1,mac=00-15-5D-00-0B-02,guid={{{guid.upper()}}},ip=198.51.100.20/24,"
            "ip=2001:db8:1::20/64,dns=198.51.100.53",
            "--",
            "bash",
            "-c",
            NIC_SESSION,
        ),
        timeout=60,
    )
    assert result.returncode == 0, result.report()
    assert result.stdout.splitlines() == [
        "00:15:5d:00:0a:01 00:15:5d:00:0b:02 ",
        "{" + guid + "}",
        "00:15:5d:00:0b:02",
        "IPAddresses=198.51.100.20,2001:db8:1::20",
        "Subnets=255.255.255.0,/64",
        "DefaultGateways=",
        "DNSServers=192.0.2.53,198.51.100.53",
        "DHCPEnabled=false",
        "198.51.100.20/24",
        "2001:db8:1::20/64",
        "198.51.100.7/24",
        "default via 198.51.100.1 dev eth0 ",
        "nameserver 192.0.2.53",
        "nameserver 198.51.100.53",
        "eth0 eth1 lo ",
    ]
    assert_nothing_left(before)


def test_nic_arguments() -> None:
    config = hostsim.parse_args(["--nic", "eth0,ip=198.51.100.7/24,gw=198.51.100.1", "x"])
    (eth0,) = config.nics
    assert eth0.addresses == ("198.51.100.7/24",) and eth0.gateways == ("198.51.100.1",)
    assert eth0.dns == ("192.0.2.53",) and eth0.mac == "00:15:5d:00:0a:01"
    config = hostsim.parse_args(["--nic", "eth1,dhcp", "--nic", "eth2,mac=00:15:5d:aa:bb:cc", "x"])
    assert [n.name for n in config.nics] == ["eth0", "eth1", "eth2"]
    assert config.nics[1].dhcp and config.nics[1].mac == "00:15:5d:00:0a:02"
    assert config.nics[2].mac == "00:15:5d:aa:bb:cc"
    for bad in (
        "lo",
        "eth1,ip=300.1.1.1/24",
        "eth1,mac=01:00:5e:00:00:01",
        "eth1,speed=10",
        "eth1,mac=00:15:5d:00:0a:01",
    ):
        result = run_bounded(hostsim_argv("--nic", bad, "--", "true"), timeout=30)
        assert result.returncode == 2 and "--nic" in result.stderr, (bad, result.report())


def test_no_nics() -> None:
    require_real_environment()
    assert hostsim.parse_args(["--no-nics", "x"]).nics == []
    config = hostsim.parse_args(["--no-nics", "--nic", "eth5", "x"])
    assert [n.name for n in config.nics] == ["eth5"]
    before = Outside.now()
    script = 'ls "$KVPFS_MOUNT/host/net" | wc -l; ls /sys/class/net; ip -o link | wc -l'
    result = run_bounded(hostsim_argv("--no-nics", "--", "sh", "-c", script), timeout=60)
    assert result.returncode == 0, result.report()
    assert result.stdout.split() == ["0", "lo", "1"]
    assert_nothing_left(before)
