"""A guest adapter's IP configuration as the Hyper-V host sees it, as pure functions.

Hyper-V shows and injects a guest adapter's configuration as
``Msvm_GuestNetworkAdapterConfiguration``: ``IPAddresses``, ``Subnets``,
``DefaultGateways``, ``DNSServers`` and ``DHCPEnabled``.  Through KVP these travel
as ``struct hv_kvp_ipaddr_value`` (:class:`kvpfs.peers.hyperv.message.IpValue`),
whose lists are strings separated by ``;``; :func:`to_value` and :func:`from_value`
convert.

The host names the adapter differently for the two requests, as hv_kvp_daemon
expects it:

* GET_IP_INFO by its **MAC address**, upper case with colons (the daemon upper-cases
  ``/sys/class/net/<if>/address`` and compares with ``strcmp``): :func:`host_mac`;
* SET_IP_INFO by its **VMBus device GUID** as ``/sys/class/net/<if>/device/device_id``
  shows it, lower case in braces: :func:`host_guid`.

The text form (:func:`format_config`, :func:`parse_config`) is what ``host/net/<mac>/config``
shows: one ``Name=value`` line per property, lists comma-separated, ``DHCPEnabled``
``true`` or ``false``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from kvpfs.peers.hyperv import message as m

PROPERTIES = ("IPAddresses", "Subnets", "DefaultGateways", "DNSServers", "DHCPEnabled")
_FIELDS = {
    "IPAddresses": "ip_addresses",
    "Subnets": "subnets",
    "DefaultGateways": "default_gateways",
    "DNSServers": "dns_servers",
    "DHCPEnabled": "dhcp_enabled",
}
_VALUE_FIELDS = {
    "ip_addresses": "ip_addr",
    "subnets": "sub_net",
    "default_gateways": "gate_way",
    "dns_servers": "dns_addr",
}
_BOOLEANS = {"true": True, "false": False}
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")
_GUID = re.compile(
    r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$"
)


class ConfigError(ValueError):
    """A configuration the host would not send (EINVAL)."""


@dataclass(frozen=True, slots=True)
class IpConfig:
    """One adapter's ``Msvm_GuestNetworkAdapterConfiguration`` properties."""

    ip_addresses: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()
    default_gateways: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dhcp_enabled: bool = False


# -- adapter names -------------------------------------------------------------------------


def normalize_mac(text: str) -> str:
    """``00:15:5d:0a:00:01`` for a MAC written with colons or dashes in any case."""
    if not _MAC.match(text):
        raise ConfigError(f"{text!r} is not a MAC address (six hex pairs with : or -)")
    return text.replace("-", ":").lower()


def host_mac(text: str) -> str:
    """The adapter id of a GET_IP_INFO: the MAC upper case with colons."""
    return normalize_mac(text).upper()


def normalize_guid(text: str) -> str:
    """The GUID lower case, without braces."""
    found = _GUID.match(text)
    if not found or (text.startswith("{") != text.endswith("}")):
        raise ConfigError(f"{text!r} is not a GUID")
    return found.group(1).lower()


def host_guid(text: str) -> str:
    """The adapter id of a SET_IP_INFO: ``{guid}`` as sysfs's ``device_id`` shows it."""
    return "{" + normalize_guid(text) + "}"


# -- struct hv_kvp_ipaddr_value -------------------------------------------------------------


def _split(text: str) -> tuple[str, ...]:
    # The daemon ends some lists with ";" (one per line of a helper's output).
    return tuple(item.strip() for item in text.split(";") if item.strip())


def address_family(addresses: tuple[str, ...]) -> int:
    """The ``addr_family`` mask for ``addresses`` (what cannot be parsed counts as none)."""
    family = m.ADDR_FAMILY_NONE
    for text in addresses:
        try:
            version = ipaddress.ip_address(text).version
        except ValueError:
            continue
        family |= m.ADDR_FAMILY_IPV4 if version == 4 else m.ADDR_FAMILY_IPV6
    return family


def to_value(adapter_id: str, config: IpConfig) -> m.IpValue:
    """The host's ``struct hv_kvp_ipaddr_value`` for ``config``."""
    return m.IpValue(
        adapter_id=adapter_id,
        addr_family=address_family(config.ip_addresses),
        dhcp_enabled=int(config.dhcp_enabled),
        ip_addr=";".join(config.ip_addresses),
        sub_net=";".join(config.subnets),
        gate_way=";".join(config.default_gateways),
        dns_addr=";".join(config.dns_servers),
    )


def from_value(value: m.IpValue) -> IpConfig:
    """What the host reads from a GET_IP_INFO answer (empty items dropped)."""
    return IpConfig(
        ip_addresses=_split(value.ip_addr),
        subnets=_split(value.sub_net),
        default_gateways=_split(value.gate_way),
        dns_servers=_split(value.dns_addr),
        dhcp_enabled=bool(value.dhcp_enabled),
    )


def check_sizes(config: IpConfig) -> None:
    """ConfigError if a list does not fit the host's field (its units, NUL included)."""
    value = to_value("", config)
    for name in _VALUE_FIELDS.values():
        units = len(m.utf16_units(getattr(value, name)))
        room = m.ip_field_units(name) - 1
        if units > room:
            raise ConfigError(f"{name} is {units} UTF-16 units, the host sends at most {room}")


# -- the text form ---------------------------------------------------------------------------


def format_config(config: IpConfig) -> str:
    lines = [
        f"IPAddresses={','.join(config.ip_addresses)}",
        f"Subnets={','.join(config.subnets)}",
        f"DefaultGateways={','.join(config.default_gateways)}",
        f"DNSServers={','.join(config.dns_servers)}",
        f"DHCPEnabled={'true' if config.dhcp_enabled else 'false'}",
    ]
    return "\n".join(lines) + "\n"


class Inconsistent(ConfigError):
    """Well-formed properties that do not fit together (yet): a subnet per address."""


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ConfigError(f"{what} {text!r} has a scope, which the daemon cannot parse")
    return address


def _is_netmask(text: str) -> bool:
    try:
        mask = int(ipaddress.IPv4Address(text))
    except ValueError:
        return False
    hosts = ~mask & 0xFFFFFFFF
    return hosts & (hosts + 1) == 0


def _prefix(text: str) -> int | None:
    """The prefix length of ``64`` or ``/64`` (0 to 128), else None."""
    digits = text[1:] if text.startswith("/") else text
    if digits.isascii() and digits.isdigit() and len(digits) <= 3 and int(digits) <= 128:
        return int(digits)
    return None


_ITEM_CHECKS = {
    "ip_addresses": "address",
    "default_gateways": "gateway",
    "dns_servers": "DNS server",
}


def _check_items(field: str, items: tuple[str, ...], where: str) -> None:
    what = _ITEM_CHECKS.get(field)
    for item in items:
        if what is not None:
            try:
                _address(item, what)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        elif not _is_netmask(item) and _prefix(item) is None:
            raise ConfigError(
                f"{where}: subnet {item!r} is neither a dotted netmask nor a prefix length"
            )


def parse_properties(text: str) -> dict[str, object]:
    """The properties a text names: ``{field: value}`` (ConfigError if malformed).

    One ``Name=value`` per line; blank lines and lines starting with ``#`` are
    skipped; a name may appear once.  Lists are comma-separated (an empty value is
    an empty list) of IP addresses, or for ``Subnets`` of dotted netmasks and
    prefix lengths (``64`` or ``/64``); IPv6 addresses without a scope (the
    daemon's ``inet_pton`` refuses one).  ``DHCPEnabled`` is ``true`` or
    ``false`` in any case.  How the properties fit together is :func:`validate`'s.
    """
    found: dict[str, object] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not eq:
            raise ConfigError(f"{where}: expected Name=value, got {line!r}")
        field = _FIELDS.get(name)
        if field is None:
            raise ConfigError(
                f"{where}: unknown property {name!r} (known: {', '.join(PROPERTIES)})"
            )
        if field in found:
            raise ConfigError(f"{where}: {name} appears twice")
        if field == "dhcp_enabled":
            flag = _BOOLEANS.get(value.lower())
            if flag is None:
                raise ConfigError(f"{where}: DHCPEnabled is true or false, not {value!r}")
            found[field] = flag
        else:
            items = tuple(item.strip() for item in value.split(",")) if value else ()
            if any(not item for item in items):
                raise ConfigError(f"{where}: an empty item in {name}")
            _check_items(field, items, where)
            found[field] = items
    if not found:
        raise ConfigError("no property given")
    return found


def validate(config: IpConfig) -> None:
    """:class:`Inconsistent` unless the properties fit together: one subnet per
    address, a dotted netmask for an IPv4 address and a prefix length for an IPv6
    one (the daemon files every subnet that is not a dotted IPv4 address as
    ``IPV6NETMASK``, so a prefix length for an IPv4 address would be misfiled),
    and each list fits its field.  The items themselves are assumed well formed.
    """
    addresses = [ipaddress.ip_address(text) for text in config.ip_addresses]
    if len(config.subnets) != len(addresses):
        raise Inconsistent(
            f"{len(config.subnets)} subnets for {len(addresses)} addresses: "
            "Subnets needs one item per address"
        )
    for address, subnet in zip(addresses, config.subnets, strict=True):
        if address.version == 4 and not _is_netmask(subnet):
            raise Inconsistent(f"subnet {subnet!r} of {address}: IPv4 needs a dotted netmask")
        if address.version == 6 and _prefix(subnet) is None:
            raise Inconsistent(f"subnet {subnet!r} of {address}: IPv6 needs a prefix length")
    try:
        check_sizes(config)
    except ConfigError as exc:
        raise Inconsistent(str(exc)) from None


def merge(current: IpConfig, found: dict[str, object]) -> IpConfig:
    """``current`` with the properties ``found`` by :func:`parse_properties`."""
    return replace(current, **found)  # type: ignore[arg-type]


def is_complete(found: dict[str, object]) -> bool:
    """Whether ``found`` holds all five properties (no current configuration needed)."""
    return len(found) == len(PROPERTIES)


def parse_config(text: str, current: IpConfig | None = None) -> IpConfig:
    """The consistent configuration a text asks for: its properties over ``current``
    (which may be None when the text names all five)."""
    found = parse_properties(text)
    if current is None and not is_complete(found):
        missing = [name for name, field in _FIELDS.items() if field not in found]
        raise ConfigError(f"missing {', '.join(missing)} and no current configuration")
    merged = merge(current or IpConfig(), found)
    validate(merged)
    return merged
