"""hostsim's hv_set_ifconfig (parsing the daemon's ifcfg file, the ip commands it runs)
and the synthetic adapters' options and files; no root needed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpfs.peers.hyperv import set_ifconfig as si
from kvpfs.peers.hyperv.netns import NicSpec, apply_nic_option, default_nics, ifcfg_text, nic_guid

#: What hv_kvp_daemon 6.1 wrote for IPAddresses=192.0.2.20,2001:db8::20,
#: Subnets=255.255.255.0,64, DefaultGateways=192.0.2.1,2001:db8::1 and
#: DNSServers=192.0.2.54,2001:db8::53 (seen in the real-daemon scenarios).
DAEMON_IFCFG = (
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


def test_parse_the_daemons_file() -> None:
    config = si.parse_ifcfg(DAEMON_IFCFG)
    assert (config.device, config.hwaddr, config.dhcp) == ("eth0", "00:15:5D:00:0A:01", False)
    assert config.addresses == [("192.0.2.20", 24), ("2001:db8::20", 64)]
    assert config.gateways == ["192.0.2.1", "2001:db8::1"]
    assert config.dns == ["192.0.2.54", "2001:db8::53"]


def test_parse_numbering() -> None:
    text = (
        "DEVICE=eth1\nBOOTPROTO=dhcp\nIPADDR0=192.0.2.1\nIPADDR1=198.51.100.1\n"
        "IPV6ADDR=2001:db8::1\nIPV6ADDR_1=2001:db8:1::1\nNETMASK0=255.255.255.0\n"
        "NETMASK1=255.255.0.0\nIPV6NETMASK=/64\nIPV6NETMASK_1=48\n"
        "GATEWAY=192.0.2.254\nGATEWAY1=198.51.100.254\n"
        + "".join(f"DNS{n}=192.0.2.{n}\n" for n in range(1, 12))
        + "NM_CONTROLLED=no\n"
    )
    config = si.parse_ifcfg(text)
    assert config.dhcp and config.addresses == [
        ("192.0.2.1", 24),
        ("198.51.100.1", 16),
        ("2001:db8::1", 64),
        ("2001:db8:1::1", 48),
    ]
    assert config.gateways == ["192.0.2.254", "198.51.100.254"]
    assert config.dns == [f"192.0.2.{n}" for n in range(1, 12)]  # DNS10 after DNS9


@pytest.mark.parametrize(
    "text",
    [
        "BOOTPROTO=none\n",  # no DEVICE
        "DEVICE=eth0\nIPADDR0=192.0.2.1\n",  # no NETMASK0
        "DEVICE=eth0\nIPADDR0=192.0.2.1\nIPV6NETMASK=24\n",  # a prefix misfiled
        "DEVICE=eth0\nIPADDR0=nope\nNETMASK0=255.0.0.0\n",
        "DEVICE=eth0\nDNS1=nope\n",
        "DEVICE=eth0\nIPV6ADDR=2001:db8::1\nIPV6NETMASK=200\n",
        "DEVICE=eth0\ngarbage\n",
    ],
)
def test_parse_refusals(text: str) -> None:
    with pytest.raises(si.IfcfgError):
        si.parse_ifcfg(text)


def test_plan_static() -> None:
    commands, dns = si.plan(si.parse_ifcfg(DAEMON_IFCFG), None)
    assert commands == [
        ["-4", "addr", "flush", "dev", "eth0"],
        ["-6", "addr", "flush", "dev", "eth0"],
        ["-4", "route", "flush", "exact", "0.0.0.0/0", "dev", "eth0"],
        ["-6", "route", "flush", "exact", "::/0", "dev", "eth0"],
        ["-4", "link", "set", "eth0", "up"],
        ["-4", "addr", "add", "192.0.2.20/24", "dev", "eth0"],
        ["-6", "addr", "add", "2001:db8::20/64", "dev", "eth0", "nodad"],
        ["-4", "route", "replace", "default", "via", "192.0.2.1", "dev", "eth0"],
        ["-6", "route", "replace", "default", "via", "2001:db8::1", "dev", "eth0"],
    ]
    assert dns == ["192.0.2.54", "2001:db8::53"]


LIFETIMES = ["valid_lft", "86400", "preferred_lft", "86400"]
METRIC_1 = ["metric", "1"]


def test_plan_dhcp_and_onlink() -> None:
    lease = si.parse_ifcfg(
        "DEVICE=eth0\nIPADDR0=192.0.2.10\nNETMASK0=255.255.255.0\nGATEWAY=192.0.2.1\n"
        "DNS1=192.0.2.53\n"
    )
    config = si.parse_ifcfg(DAEMON_IFCFG.replace("BOOTPROTO=none", "BOOTPROTO=dhcp"))
    commands, dns = si.plan(config, lease)
    adds = [c for c in commands if c[1:3] == ["addr", "add"]]
    # The lease's IPv4 address (dynamic), the file's IPv6 one; the file's IPv4 one not.
    assert adds == [
        ["-4", "addr", "add", "192.0.2.10/24", "dev", "eth0", *LIFETIMES],
        ["-6", "addr", "add", "2001:db8::20/64", "dev", "eth0", "nodad"],
    ]
    assert dns == ["192.0.2.54", "2001:db8::53"]  # the file's, when it has some
    assert si.plan(si.parse_ifcfg("DEVICE=eth0\nBOOTPROTO=dhcp\n"), lease)[1] == ["192.0.2.53"]
    # No lease: no IPv4 address at all.
    commands, _ = si.plan(config, None)
    assert not any("192.0.2.20/24" in c for c in commands)
    # A gateway outside every subnet is put on the link; the second one gets a metric.
    far = si.parse_ifcfg(
        "DEVICE=eth0\nIPADDR0=192.0.2.10\nNETMASK0=255.255.255.0\n"
        "GATEWAY=198.51.100.1\nGATEWAY1=192.0.2.1\n"
    )
    routes = [c for c in si.plan(far, None)[0] if "default" in c]
    assert routes == [
        ["-4", "route", "replace", "default", "via", "198.51.100.1", "dev", "eth0", "onlink"],
        ["-4", "route", "add", "default", "via", "192.0.2.1", "dev", "eth0", *METRIC_1],
    ]


def test_resolv_conf() -> None:
    old = "# head\noptions timeout:1\nnameserver 10.0.0.1\nsearch example\nnameserver 10.0.0.2\n"
    assert si.resolv_conf(old, ["192.0.2.53", "2001:db8::53"]) == (
        "# head\noptions timeout:1\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
        "search example\n"
    )
    assert si.resolv_conf("options x\n", []) == "options x\n"
    assert si.resolv_conf("", ["192.0.2.1"]) == "nameserver 192.0.2.1\n"


def test_all_servers(tmp_path: Path) -> None:
    for mac, servers in (
        ("00:15:5d:00:0a:02", "192.0.2.2\n192.0.2.1\n"),
        ("00:15:5d:00:0a:01", "192.0.2.1\n"),
    ):
        (tmp_path / mac).mkdir()
        (tmp_path / mac / "dns").write_text(servers)
    (tmp_path / "00:15:5d:00:0a:03").mkdir()
    (tmp_path / "resolv.conf").write_text("not a directory\n")
    assert si.all_servers(str(tmp_path)) == ["192.0.2.1", "192.0.2.2"]


def test_main_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ifcfg-eth0"
    bad.write_text("BOOTPROTO=none\n")
    assert si.main(["--state", str(tmp_path), str(bad)]) == 1
    assert "no DEVICE" in capsys.readouterr().err
    assert si.main(["--state", str(tmp_path), str(tmp_path / "missing")]) == 1
    assert si.main([str(bad)]) == 2 and "usage" in capsys.readouterr().err


def test_batch_words() -> None:
    assert si._batch_word("eth#1") == '"eth#1"' and si._batch_word("eth0") == "eth0"


# -- the synthetic adapters ---------------------------------------------------------------------


def test_default_adapter() -> None:
    (eth0,) = default_nics()
    assert eth0 == NicSpec(
        "eth0",
        "00:15:5d:00:0a:01",
        "4f4460c2-2666-5cbd-afeb-938c9556ef5e",
        ("192.0.2.10/24",),
        ("192.0.2.1",),
        ("192.0.2.53",),
    )
    assert nic_guid("00-15-5D-00-0A-01") == eth0.guid


def test_nic_options() -> None:
    nics = apply_nic_option(default_nics(), "eth0,ip=198.51.100.7/24,ip=2001:db8::7/64,dhcp")
    assert nics[0].addresses == ("198.51.100.7/24", "2001:db8::7/64") and nics[0].dhcp
    assert nics[0].gateways == ("192.0.2.1",)  # not given: kept
    nics = apply_nic_option(nics, "eth0,dhcp=no,gw=198.51.100.1,dns=198.51.100.53,dns=::1")
    assert (nics[0].dhcp, nics[0].gateways, nics[0].dns) == (
        False,
        ("198.51.100.1",),
        ("198.51.100.53", "::1"),
    )
    nics = apply_nic_option(nics, "eth1")
    assert nics[1] == NicSpec("eth1", "00:15:5d:00:0a:02", nic_guid("00:15:5d:00:0a:02"))
    nics = apply_nic_option(nics, "eth1,mac=00:15:5D:AA:BB:CC")
    assert nics[1].guid == nic_guid("00:15:5d:aa:bb:cc")
    nics = apply_nic_option(nics, "eth1,guid={0123ABCD-4567-89EF-0123-456789ABCDEF}")
    assert nics[1].guid == "0123abcd-4567-89ef-0123-456789abcdef"
    for bad in (
        "lo",
        "",
        "a/b",
        "x" * 16,
        "eth1,ip=192.0.2.1",
        "eth1,ip=192.0.2.1/33",
        "eth1,gw=nope",
        "eth1,mac=01:00:5e:00:00:01",
        "eth1,mac=00:15:5d:00:0a:01",  # eth0's
        "eth1,guid=4f4460c2-2666-5cbd-afeb-938c9556ef5e",  # eth0's
        "eth1,dhcp=maybe",
        "eth1,speed=10",
    ):
        with pytest.raises(ValueError):
            apply_nic_option(nics, bad)


nic_addresses = st.lists(
    st.one_of(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
        st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
    ).map(lambda p: str(ipaddress.ip_interface(f"{p[0]}/{p[1]}"))),
    max_size=5,
)
hosts = st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), max_size=4)


@given(nic_addresses, hosts, hosts, st.booleans())
def test_ifcfg_text_reads_back(
    addresses: list[str], gateways: list[str], dns: list[str], dhcp: bool
) -> None:
    """hostsim writes an adapter's start configuration in the daemon's own format."""
    nic = NicSpec(
        "eth3", "00:15:5d:00:0a:04", "g", tuple(addresses), tuple(gateways), tuple(dns), dhcp
    )
    config = si.parse_ifcfg(ifcfg_text(nic))
    assert config.device == "eth3" and config.hwaddr == "00:15:5D:00:0A:04" and config.dhcp == dhcp
    interfaces = [ipaddress.ip_interface(a) for a in addresses]
    ordered = [i for i in interfaces if i.version == 4] + [i for i in interfaces if i.version == 6]
    assert config.addresses == [(str(i.ip), i.network.prefixlen) for i in ordered]
    by_version = [g for g in gateways if ipaddress.ip_address(g).version == 4] + [
        g for g in gateways if ipaddress.ip_address(g).version == 6
    ]
    assert config.gateways == by_version
    assert config.dns == dns
