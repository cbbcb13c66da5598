"""struct hv_kvp_ipaddr_value: the host's layout, the kernel's conversions both ways, and
the host's Msvm_GuestNetworkAdapterConfiguration text (pure, property-tested)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpfs.peers.hyperv import ipconfig as ic
from kvpfs.peers.hyperv import message as m

u8 = st.integers(0, 0xFF)
bmp = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",), exclude_characters="\0")


def host_text(units: int) -> st.SearchStrategy[str]:
    """A host string that fits ``units`` UTF-16 units (BMP: one unit a character)."""
    return st.text(bmp, max_size=units)


ip_values = st.builds(
    m.IpValue,
    adapter_id=host_text(128),
    addr_family=u8,
    dhcp_enabled=u8,
    ip_addr=host_text(1024),
    sub_net=host_text(1024),
    gate_way=host_text(512),
    dns_addr=host_text(1024),
)


# -- the host's struct hv_kvp_ip_msg ----------------------------------------------------------


def test_host_layout() -> None:
    """Offsets of the packed struct hv_kvp_ip_msg (include/uapi/linux/hyperv.h)."""
    value = m.IpValue("A", 3, 1, "I", "S", "G", "D")
    data = m.encode_host_ip(m.HostIpRequest(m.Op.SET_IP_INFO, value, 7))
    assert len(data) == m.HOST_IP_MSG_SIZE == 7428
    assert (data[0], data[1]) == (5, 7)
    assert data[2:4] == "A".encode("utf-16-le") and (data[258], data[259]) == (3, 1)
    for at, char in ((260, "I"), (2308, "S"), (4356, "G"), (5380, "D")):
        assert data[at : at + 2] == char.encode("utf-16-le")


@given(ip_values, st.sampled_from([m.Op.GET_IP_INFO, m.Op.SET_IP_INFO]), u8)
def test_host_round_trip(value: m.IpValue, op: int, pool: int) -> None:
    request = m.HostIpRequest(op, value, pool)
    assert m.decode_host_ip(m.encode_host_ip(request)) == request


def test_host_fields_that_do_not_fit() -> None:
    with pytest.raises(m.MessageError):
        m.encode_host_ip(m.HostIpRequest(m.Op.GET_IP_INFO, m.IpValue(adapter_id="x" * 129)))
    with pytest.raises(m.MessageError):
        m.encode_host_ip(m.HostIpRequest(m.Op.SET_IP_INFO, m.IpValue(gate_way="x" * 513)))
    # A full field has no NUL and still reads back whole.
    full = m.IpValue(gate_way="g" * 512)
    assert m.decode_host_ip(m.encode_host_ip(m.HostIpRequest(5, full))).value == full


# -- host -> daemon (process_ib_ipinfo) ---------------------------------------------------------


def test_get_carries_adapter_and_family_only() -> None:
    value = m.IpValue("00:15:5D:00:0A:01", 3, 1, "192.0.2.1", "255.0.0.0", "g", "d")
    sent = m.decode_request(m.kernel_request(m.HostIpRequest(m.Op.GET_IP_INFO, value)))
    assert sent == m.IpInfoMessage(m.Op.GET_IP_INFO, 0, b"00:15:5D:00:0A:01", 3)


@given(ip_values)
def test_set_converts_every_field(value: m.IpValue) -> None:
    sent = m.delivered_ip(m.HostIpRequest(m.Op.SET_IP_INFO, value))
    for name, cap in (
        ("adapter_id", 128),
        ("ip_addr", 1024),
        ("sub_net", 1024),
        ("gate_way", 512),
        ("dns_addr", 1024),
    ):
        expected = m.utf16_to_utf8(m.utf16_units(getattr(value, name)), cap)
        assert getattr(sent, name) == expected
        assert len(expected) <= cap
    assert (sent.addr_family, sent.dhcp_enabled) == (value.addr_family, value.dhcp_enabled)
    # What the daemon reads is what the message holds.
    assert m.decode_request(m.encode(sent)) == sent


def test_set_caps_in_utf8_bytes() -> None:
    value = m.IpValue("é" * 128, ip_addr="é" * 1024, gate_way="é" * 512)
    sent = m.delivered_ip(m.HostIpRequest(m.Op.SET_IP_INFO, value))
    assert sent.adapter_id == "é".encode() * 64
    assert sent.ip_addr == "é".encode() * 512 and sent.gate_way == "é".encode() * 256
    with pytest.raises(m.MessageError):
        m.delivered_ip(m.HostIpRequest(m.Op.SET, value))


# -- daemon -> host (process_ob_ipinfo) ----------------------------------------------------------


def _reply(**fields: object) -> bytes:
    body = m.IpInfoMessage(m.Op.GET_IP_INFO, **fields)  # type: ignore[arg-type]
    return m.encode(body, error=m.Status.OK)


def test_get_reply() -> None:
    request = m.HostIpRequest(m.Op.GET_IP_INFO, m.IpValue("00:15:5D:00:0A:01"))
    data = _reply(
        adapter_id=b"00:15:5D:00:0A:01",
        addr_family=3,
        dhcp_enabled=1,
        ip_addr=b"192.0.2.10;2001:db8::10",
        sub_net=b"255.255.255.0;/64",
        gate_way=b"192.0.2.1;",
        dns_addr=b"192.0.2.53;",
    )
    reply = m.kernel_reply(m.Op.GET_IP_INFO, data, request=request)
    assert reply == m.HostReply(
        0,
        ip=m.IpValue(
            "00:15:5D:00:0A:01",
            3,
            1,
            "192.0.2.10;2001:db8::10",
            "255.255.255.0;/64",
            "192.0.2.1;",
            "192.0.2.53;",
        ),
    )
    assert ic.from_value(reply.ip) == ic.IpConfig(  # type: ignore[arg-type]
        ("192.0.2.10", "2001:db8::10"),
        ("255.255.255.0", "/64"),
        ("192.0.2.1",),
        ("192.0.2.53",),
        True,
    )
    # A failure carries nothing; a SET's answer is the status alone.
    failed = m.encode(m.IpInfoMessage(m.Op.GET_IP_INFO, ip_addr=b"x"), error=m.Status.E_FAIL)
    assert m.kernel_reply(m.Op.GET_IP_INFO, failed) == m.HostReply(m.Status.E_FAIL)
    done = m.encode(m.IpInfoMessage(m.Op.SET_IP_INFO, ip_addr=b"x"), error=0)
    assert m.kernel_reply(m.Op.SET_IP_INFO, done) == m.HostReply(0)


def test_get_reply_is_written_over_the_request() -> None:
    """No NUL is written: a shorter answer leaves the host's own units behind it."""
    request = m.HostIpRequest(m.Op.GET_IP_INFO, m.IpValue("M", ip_addr="abcdefghij"))
    reply = m.kernel_reply(m.Op.GET_IP_INFO, _reply(ip_addr=b"12"), request=request)
    assert reply.ip is not None and reply.ip.ip_addr == "12cdefghij"
    # An adapter id longer than its 128 units runs on over addr_family and
    # dhcp_enabled (copied afterwards) into the addresses, converted before it.
    long = m.kernel_reply(m.Op.GET_IP_INFO, _reply(adapter_id=b"A" * 200, ip_addr=b"1.2.3.4"))
    assert long.ip is not None and long.ip.adapter_id == "A" * 128
    assert long.ip.ip_addr == "A" * 71


def test_get_reply_limits_and_invalid_utf8() -> None:
    reply = m.kernel_reply(
        m.Op.GET_IP_INFO, _reply(ip_addr=b"1" * 2000, gate_way=b"g" * 1000, dns_addr=b"d")
    )
    assert reply.ip is not None
    assert reply.ip.ip_addr == "1" * 1024 and reply.ip.gate_way == "g" * 512
    bad = m.kernel_reply(m.Op.GET_IP_INFO, _reply(dns_addr=b"\xff"))
    assert bad == m.HostReply(m.Status.E_FAIL)


ascii_text = st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=40)


@given(ascii_text, ascii_text, ascii_text, ascii_text, ascii_text, u8, u8)
def test_get_reply_round_trip(
    adapter: str, ip: str, subnet: str, gateway: str, dns: str, family: int, dhcp: int
) -> None:
    """What the daemon answers reaches the host as it was (to a zeroed request)."""
    daemon = m.IpInfoMessage(
        m.Op.GET_IP_INFO,
        0,
        adapter.encode(),
        family,
        dhcp,
        ip.encode(),
        subnet.encode(),
        gateway.encode(),
        dns.encode(),
    )
    reply = m.kernel_reply(m.Op.GET_IP_INFO, m.encode(daemon, error=0))
    assert reply.ip == m.IpValue(adapter, family, dhcp, ip, subnet, gateway, dns)


# -- the host's view: Msvm_GuestNetworkAdapterConfiguration ---------------------------------------


def test_adapter_names() -> None:
    assert ic.normalize_mac("00-15-5D-0A-00-01") == "00:15:5d:0a:00:01"
    assert ic.host_mac("00:15:5d:0a:00:01") == "00:15:5D:0A:00:01"
    guid = "4F4460C2-2666-5CBD-AFEB-938C9556EF5E"
    assert ic.normalize_guid("{" + guid + "}") == guid.lower()
    assert ic.host_guid(guid) == "{" + guid.lower() + "}"
    for bad in ("00:15:5d:0a:00", "00:15-5d:0a:00:01", "zz:15:5d:0a:00:01"):
        with pytest.raises(ic.ConfigError):
            ic.normalize_mac(bad)
    for bad in ("{" + guid, guid + "}", guid[:-1], "x" * 36):
        with pytest.raises(ic.ConfigError):
            ic.normalize_guid(bad)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
netmasks = st.integers(0, 32).map(lambda n: str(ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask))
prefixes = (
    st.integers(0, 128).map(lambda n: st.sampled_from([str(n), f"/{n}"])).flatmap(lambda s: s)
)


@st.composite
def configs(draw: st.DrawFn) -> ic.IpConfig:
    pairs = draw(
        st.lists(st.one_of(st.tuples(ipv4, netmasks), st.tuples(ipv6, prefixes)), max_size=6)
    )
    return ic.IpConfig(
        tuple(a for a, _ in pairs),
        tuple(s for _, s in pairs),
        tuple(draw(st.lists(st.one_of(ipv4, ipv6), max_size=3))),
        tuple(draw(st.lists(st.one_of(ipv4, ipv6), max_size=3))),
        draw(st.booleans()),
    )


@given(configs())
def test_text_round_trip(config: ic.IpConfig) -> None:
    text = ic.format_config(config)
    assert ic.parse_config(text) == config
    # Every line alone, over anything: that property, the rest kept.
    for line in text.splitlines():
        found = ic.parse_properties(line)
        merged = ic.merge(ic.IpConfig(), found)
        assert ic.format_config(merged).count(line) == 1


@given(configs())
def test_value_round_trip(config: ic.IpConfig) -> None:
    value = ic.to_value("{guid}", config)
    assert value.adapter_id == "{guid}"
    assert ic.from_value(value) == config
    v4 = any(ipaddress.ip_address(a).version == 4 for a in config.ip_addresses)
    v6 = any(ipaddress.ip_address(a).version == 6 for a in config.ip_addresses)
    assert value.addr_family == (1 if v4 else 0) | (2 if v6 else 0)
    # The daemon's lists may end in ";": empty items are dropped.
    assert ic.from_value(m.IpValue(gate_way="192.0.2.1;;", dns_addr=";")).default_gateways == (
        "192.0.2.1",
    )


@pytest.mark.parametrize(
    "text",
    [
        "IPAddresses=bogus",
        "IPAddresses=192.0.2.1,",
        "IPAddresses=fe80::1%eth0",
        "Subnets=255.0.255.0",
        "Subnets=/129",
        "Subnets=64x",
        "DefaultGateways=gw",
        "DNSServers=1.2.3.4.5",
        "DHCPEnabled=yes",
        "Unknown=1",
        "IPAddresses",
        "DHCPEnabled=true\nDHCPEnabled=false",
        "# only a comment\n\n",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(ic.ConfigError) as info:
        ic.parse_properties(text)
    assert not isinstance(info.value, ic.Inconsistent)


@pytest.mark.parametrize(
    "config",
    [
        ic.IpConfig(("192.0.2.1", "192.0.2.2"), ("255.255.255.0",)),
        ic.IpConfig((), ("255.255.255.0",)),
        ic.IpConfig(("192.0.2.1",), ("24",)),
        ic.IpConfig(("192.0.2.1",), ("/24",)),
        ic.IpConfig(("2001:db8::1",), ("255.255.255.0",)),
        ic.IpConfig(dns_servers=("192.0.2.1",) * 200),
    ],
)
def test_inconsistent(config: ic.IpConfig) -> None:
    with pytest.raises(ic.Inconsistent):
        ic.validate(config)


def test_parse_config_needs_everything_without_current() -> None:
    with pytest.raises(ic.ConfigError, match="missing"):
        ic.parse_config("DHCPEnabled=true\n")
    current = ic.IpConfig(("192.0.2.1",), ("255.255.255.0",))
    assert ic.parse_config(" DHCPEnabled = TRUE \n# note\n", current).dhcp_enabled
    assert ic.parse_config("IPAddresses=\nSubnets=\n", current) == ic.IpConfig()


def test_struct_sizes_agree_with_the_header() -> None:
    # 2 + 2*128 + 1 + 1 + 2*(1024 + 1024 + 512 + 1024) bytes, packed.
    assert struct.calcsize("<BB128HBB1024H1024H512H1024H") == m.HOST_IP_MSG_SIZE
