"""IP injection against the real hv_kvp_daemon: GET_IP_INFO and SET_IP_INFO.

Registered in :data:`tests.hyperv.scenarios.SCENARIOS`; each runs in hostsim's
private namespaces with the default adapter eth0 (192.0.2.10/24, gateway
192.0.2.1, DNS 192.0.2.53) and, where asked, more.  Commands such as ``ip`` run
inside the same namespaces, so they see and change the synthetic adapters.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess

import trio

from kvpfs.peers.hyperv import message as m
from kvpfs.peers.hyperv.host import HostError
from kvpfs.peers.hyperv.hostsim import POOL_DIR, Environment
from kvpfs.peers.hyperv.ipconfig import IpConfig, host_guid
from kvpfs.peers.hyperv.netns import SCRIPT_DIR, STATE_DIR
from tests.hyperv.scenarios import errno_of, fs, read_text, scenario, write_text

ETH0_MAC = "00:15:5d:00:0a:01"
ETH1_MAC = "00:15:5d:00:0a:02"
DEFAULT_CONFIG = (
    "IPAddresses=192.0.2.10\n"
    "Subnets=255.255.255.0\n"
    "DefaultGateways=192.0.2.1\n"
    "DNSServers=192.0.2.53\n"
    "DHCPEnabled=false\n"
)
IFCFG = f"{POOL_DIR}/ifcfg-eth0"


def config_path(env: Environment, mac: str = ETH0_MAC) -> str:
    return env.path("host", "net", mac, "config")


def write_once(path: str, text: str) -> None:
    """One write(2) (a buffered file would try its data again when closed)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def guid_of(env: Environment, mac: str) -> str:
    return env.host.adapters[mac].guid


async def sh(*argv: str) -> str:
    """Run a command in the namespaces; its stdout (it must succeed)."""
    done = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True)
    return done.stdout.decode()


def addresses(dev: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", dev], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[3] for line in out.splitlines()]


async def raw_get(env: Environment, adapter_id: str) -> tuple[int, m.Message | None]:
    """GET_IP_INFO as sent: the status and the daemon's own reply (UTF-8 fields)."""
    request = m.HostIpRequest(m.Op.GET_IP_INFO, m.IpValue(adapter_id=adapter_id))
    exchange = await env.host.exchange(request)
    assert exchange.daemon_reply is not None, exchange.failure
    reply = m.decode_reply(exchange.daemon_reply, m.Op.GET_IP_INFO)
    return reply.status, reply.body


def syslog_has(env: Environment, text: str) -> bool:
    return any(text in line for line in env.syslog.lines)


# -- GET ------------------------------------------------------------------------------------


@scenario(nics=("eth1",))
async def ip_get(env: Environment) -> None:
    # Exactly the default adapter's configuration, through the mount.
    text = await fs(read_text, config_path(env))
    assert text == DEFAULT_CONFIG, text
    assert sorted(await fs(os.listdir, env.path("host", "net"))) == [ETH0_MAC, ETH1_MAC]
    assert await fs(os.listdir, env.path("host", "net", ETH0_MAC)) == ["config"]
    # What the daemon itself answers: lists end in ";" where a helper's output
    # lines were joined (gateways, DNS), addr_family is a mask, MAC upper case.
    status, body = await raw_get(env, ETH0_MAC.upper())
    assert status == m.Status.OK and isinstance(body, m.IpInfoMessage)
    assert (body.ip_addr, body.sub_net) == (b"192.0.2.10", b"255.255.255.0")
    assert (body.gate_way, body.dns_addr) == (b"192.0.2.1;", b"192.0.2.53;")
    assert (body.addr_family, body.dhcp_enabled) == (m.ADDR_FAMILY_IPV4, 0)
    assert body.adapter_id == ETH0_MAC.upper().encode()
    # The daemon upper-cases only its own side: a lower-case MAC finds nothing.
    status, _ = await raw_get(env, ETH0_MAC)
    assert status == m.Status.E_FAIL
    # An IPv6 address and gateway added inside the guest appear (subnet as /64).
    await sh("ip", "addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad")
    await sh("ip", "-6", "route", "add", "default", "via", "2001:db8::1", "dev", "eth0")
    config = await env.host.get_ip_info(ETH0_MAC)
    assert config == IpConfig(
        ("192.0.2.10", "2001:db8::10"),
        ("255.255.255.0", "/64"),
        ("192.0.2.1", "2001:db8::1"),
        ("192.0.2.53",),
        False,
    )
    status, body = await raw_get(env, ETH0_MAC.upper())
    assert isinstance(body, m.IpInfoMessage)
    assert body.addr_family == m.ADDR_FAMILY_IPV4 | m.ADDR_FAMILY_IPV6
    assert body.gate_way == b"192.0.2.1;2001:db8::1;"
    text = await fs(read_text, config_path(env))
    assert "IPAddresses=192.0.2.10,2001:db8::10\nSubnets=255.255.255.0,/64\n" in text
    # eth1 has no address: the daemon runs no helper at all for it, so it answers
    # no gateway, no DNS server (the namespace's, shown for every adapter that has
    # an address) and DHCP off.
    assert await env.host.get_ip_info(ETH1_MAC) == IpConfig()
    # The daemon matches interface names by prefix (strncmp over the length of
    # the name): eth10's addresses show up for eth1.
    await sh("ip", "link", "add", "eth10", "type", "veth", "peer", "name", "eth10p")
    await sh("ip", "link", "set", "eth10", "up")
    await sh("ip", "addr", "add", "198.51.100.99/24", "dev", "eth10")
    eth1 = await env.host.get_ip_info(ETH1_MAC)
    assert eth1.ip_addresses == ("198.51.100.99",) and eth1.dns_servers == ("192.0.2.53",)
    await sh("ip", "link", "del", "eth10")
    assert await env.host.get_ip_info(ETH1_MAC) == IpConfig()
    # /sys/class/net follows the namespace's interfaces.
    assert sorted(os.listdir("/sys/class/net")) == ["eth0", "eth1", "lo"]
    print(f"ip_get: {env.host.requests} requests", flush=True)


# -- SET --------------------------------------------------------------------------------------


STATIC = (
    "IPAddresses=192.0.2.20,2001:db8::20\n"
    "Subnets=255.255.255.0,64\n"
    "DefaultGateways=192.0.2.1,2001:db8::1\n"
    "DNSServers=192.0.2.54,2001:db8::53\n"
    "DHCPEnabled=false\n"
)
STATIC_IFCFG = (
    "HWADDR=00:15:5D:00:0A:01\n"
    "DEVICE=eth0\n"
    "BOOTPROTO=none\n"
    "IPADDR0=192.0.2.20\n"
    "IPV6ADDR=2001:0db8:0000:0000:0000:0000:0000:0020\n"
    "NETMASK0=255.255.255.0\n"
    "IPV6NETMASK=64\n"
    "GATEWAY=192.0.2.1\n"
    "IPV6_DEFAULTGW=2001:0db8:0000:0000:0000:0000:0000:0001\n"
    "DNS1=192.0.2.54\n"
    "DNS2=2001:0db8:0000:0000:0000:0000:0000:0053\n"
)


@scenario()
async def ip_set_static(env: Environment) -> None:
    before = env.host.requests
    await fs(write_text, config_path(env), STATIC)
    # All five properties in one write: one SET, no GET.
    assert env.host.requests == before + 1
    # The daemon's file, in its own format and numbering (IPv6 written out in full).
    assert read_text(IFCFG) == STATIC_IFCFG
    # hv_set_ifconfig ran on it: it logged, kept the applied copy, changed the adapter.
    assert syslog_has(env, "hv_set_ifconfig: eth0: applied ifcfg-eth0")
    assert read_text(f"{STATE_DIR}/{ETH0_MAC}/ifcfg") == STATIC_IFCFG
    assert addresses("eth0") == ["192.0.2.20/24", "2001:db8::20/64"]
    assert "default via 192.0.2.1" in await sh("ip", "route", "show", "dev", "eth0")
    resolv = read_text("/etc/resolv.conf")
    assert "nameserver 192.0.2.54\nnameserver 2001:db8::53\n" in resolv
    assert "options timeout:1 attempts:1" in resolv
    # A following GET returns it (IPv6 subnet as the daemon shows it).
    assert await fs(read_text, config_path(env)) == STATIC.replace(",64\n", ",/64\n")
    # A failover to another subnet, written line by line as bash's printf does
    # (one write(2) per line): each line is sent as the configuration grows.
    script = (
        'printf "IPAddresses=198.51.100.7\\nSubnets=255.255.255.0\\n'
        'DefaultGateways=198.51.100.1\\nDNSServers=198.51.100.53\\nDHCPEnabled=false\\n"'
        f' > "{config_path(env)}"'
    )
    done = await fs(
        functools.partial(subprocess.run, capture_output=True, text=True), ["bash", "-c", script]
    )
    assert done.returncode == 0, done.stderr
    assert addresses("eth0") == ["198.51.100.7/24"]
    assert await env.host.get_ip_info(ETH0_MAC) == IpConfig(
        ("198.51.100.7",), ("255.255.255.0",), ("198.51.100.1",), ("198.51.100.53",), False
    )
    # A single line changes one property; the others keep their values.
    await fs(write_text, config_path(env), "DNSServers=192.0.2.53,192.0.2.153\n")
    config = await env.host.get_ip_info(ETH0_MAC)
    assert config.dns_servers == ("192.0.2.53", "192.0.2.153")
    assert config.ip_addresses == ("198.51.100.7",)
    # Through the host API, by device GUID.
    await env.host.set_ip_info(
        guid_of(env, ETH0_MAC),
        IpConfig(("192.0.2.10",), ("255.255.255.0",), ("192.0.2.1",), ("192.0.2.53",)),
    )
    assert await fs(read_text, config_path(env)) == DEFAULT_CONFIG


@scenario(nics=("eth1",))
async def ip_set_dhcp(env: Environment) -> None:
    await fs(write_text, config_path(env), "DHCPEnabled=true\n")
    ifcfg = read_text(IFCFG)
    # The daemon writes BOOTPROTO=dhcp and still every address it was given.
    assert "BOOTPROTO=dhcp\nIPADDR0=192.0.2.10\n" in ifcfg
    # hostsim's DHCP server gives eth0 its lease, marked dynamic.
    out = await sh("ip", "-o", "addr", "show", "dev", "eth0")
    assert "192.0.2.10/24" in out and "dynamic" in out
    config = await env.host.get_ip_info(ETH0_MAC)
    assert config.dhcp_enabled and config.ip_addresses == ("192.0.2.10",)
    # Back to static.
    await fs(write_text, config_path(env), "DHCPEnabled=false\n")
    assert "dynamic" not in await sh("ip", "-o", "addr", "show", "dev", "eth0")
    assert not (await env.host.get_ip_info(ETH0_MAC)).dhcp_enabled
    # eth1 started without an address: no lease, so DHCP leaves it bare, and
    # then the daemon reports DHCP off (it asks hv_get_dhcp_info only per address).
    await fs(write_text, config_path(env, ETH1_MAC), "DHCPEnabled=true\n")
    assert read_text(f"{POOL_DIR}/ifcfg-eth1").splitlines()[2] == "BOOTPROTO=dhcp"
    assert addresses("eth1") == []
    assert await env.host.get_ip_info(ETH1_MAC) == IpConfig()
    # With an IPv6 address (which the daemon passes on under DHCP too) it says on.
    # (DHCPEnabled is written again: the GET that fills in what a write leaves
    # out has just said "false".)
    await fs(
        write_text,
        config_path(env, ETH1_MAC),
        "IPAddresses=2001:db8::11\nSubnets=64\nDHCPEnabled=true\n",
    )
    eth1 = await env.host.get_ip_info(ETH1_MAC)
    assert eth1.dhcp_enabled and eth1.ip_addresses == ("2001:db8::11",)


# -- failures ---------------------------------------------------------------------------------


@scenario(nics=("eth1",))
async def ip_unknown_adapter(env: Environment) -> None:
    host = env.host
    for call, err in (
        (host.get_ip_info("00:15:5d:99:99:99"), errno.EIO),  # HV_E_FAIL
        (host.set_ip_info("12345678-1234-1234-1234-123456789abc", IpConfig()), errno.ENODEV),
    ):
        try:
            await call
        except HostError as exc:
            assert exc.errno == err, exc
        else:
            raise AssertionError("an unknown adapter answered")
    # The GUID is compared as sysfs shows it: braces and lower case.
    bare = m.HostIpRequest(
        m.Op.SET_IP_INFO, m.IpValue(adapter_id=guid_of(env, ETH1_MAC), dhcp_enabled=1)
    )
    assert (await host.exchange(bare)).reply.status == m.Status.GUID_NOTFOUND
    upper = m.HostIpRequest(
        m.Op.SET_IP_INFO,
        m.IpValue(adapter_id=host_guid(guid_of(env, ETH1_MAC)).upper(), dhcp_enabled=1),
    )
    assert (await host.exchange(upper)).reply.status == m.Status.GUID_NOTFOUND
    # An adapter the host knows but the guest lost: GET EIO, SET ENODEV.
    await sh("ip", "link", "del", "eth1")
    eth1 = config_path(env, ETH1_MAC)
    assert await fs(errno_of, read_text, eth1) == errno.EIO
    assert await fs(errno_of, write_text, eth1, DEFAULT_CONFIG) == errno.ENODEV
    assert not os.path.exists(f"{POOL_DIR}/ifcfg-eth1")
    # Not even the daemon's file: the GUID lookup comes first.
    assert await fs(read_text, config_path(env)) == DEFAULT_CONFIG


@scenario()
async def ip_malformed(env: Environment) -> None:
    path = config_path(env)
    for text in (
        "IPAddresses=bogus\n",
        "Nonsense=1\n",
        "DHCPEnabled=maybe\n",
        "IPAddresses=192.0.2.20\nIPAddresses=192.0.2.21\n",
        "IPAddresses=fe80::1%eth0\nSubnets=64\n",
        "Subnets=24x\n",
        "no equals sign\n",
        "\n",
    ):
        before = env.host.requests
        assert await fs(errno_of, write_text, path, text) == errno.EINVAL, text
        assert env.host.requests == before, f"{text!r} sent something"
    assert not os.path.exists(IFCFG)
    # Well formed but inconsistent in one write: EINVAL, and no SET (only the GET
    # that supplied the missing properties).
    before = env.host.requests
    bad = "IPAddresses=192.0.2.20,192.0.2.21\nSubnets=255.255.255.0\n"
    assert await fs(errno_of, write_once, path, bad) == errno.EINVAL
    assert env.host.requests == before + 1, env.host.requests - before
    assert not os.path.exists(IFCFG)
    # The daemon's own check, reached through the host API (which does not judge
    # items): HV_INVALIDARG, EINVAL; its file stops where the bad item was, and
    # hv_set_ifconfig does not run.
    try:
        await env.host.set_ip_info(
            guid_of(env, ETH0_MAC), IpConfig(("not-an-address",), ("255.255.255.0",))
        )
    except HostError as exc:
        assert exc.errno == errno.EINVAL and exc.status == m.Status.INVALIDARG
    else:
        raise AssertionError("the daemon took a bad address")
    assert read_text(IFCFG) == "HWADDR=00:15:5D:00:0A:01\nDEVICE=eth0\nBOOTPROTO=none\n"
    assert "not-an-address" not in read_text(f"{STATE_DIR}/{ETH0_MAC}/ifcfg")
    assert addresses("eth0") == ["192.0.2.10/24"]
    # A failing hv_set_ifconfig is HV_E_FAIL (EIO), after the daemon wrote its file.
    script = f"{SCRIPT_DIR}/hv_set_ifconfig"
    shutil.copyfile(script, f"{STATE_DIR}/saved")
    try:
        write_text(script, "#!/bin/sh\nexit 3\n")
        assert await fs(errno_of, write_text, path, STATIC) == errno.EIO
        assert read_text(IFCFG) == STATIC_IFCFG
        # As on Debian, which ships no hv_set_ifconfig at all: every SET fails.
        os.unlink(script)
        assert await fs(errno_of, write_text, path, STATIC) == errno.EIO
        assert syslog_has(env, "Failed to execute cmd '/usr/libexec/hypervkvpd/hv_set_ifconfig")
    finally:
        shutil.copyfile(f"{STATE_DIR}/saved", script)
        os.chmod(script, 0o755)
    assert addresses("eth0") == ["192.0.2.10/24"]


@scenario()
async def ip_no_daemon(env: Environment) -> None:
    env.host.connect_timeout = 0.5
    await env.stop_daemon()
    await env.device.wait_closed()
    path = config_path(env)
    assert await fs(errno_of, read_text, path) == errno.ENOTCONN
    assert await fs(errno_of, write_text, path, STATIC) == errno.ENOTCONN
    assert await fs(errno_of, write_text, path, "DHCPEnabled=true\n") == errno.ENOTCONN
    assert not os.path.exists(IFCFG)
    await env.start_daemon()
    await env.wait_ready(2)
    assert await fs(read_text, path) == DEFAULT_CONFIG
