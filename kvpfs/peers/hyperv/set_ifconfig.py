"""``hv_set_ifconfig`` for ``kvpfs hostsim``: apply the daemon's ifcfg file with ``ip``.

hv_kvp_daemon answers a host's SET_IP_INFO by writing ``/var/lib/hyperv/ifcfg-<if>``
and running ``/usr/libexec/hypervkvpd/hv_set_ifconfig <that file>``; a distribution
provides the script (Debian does not).  Inside hostsim's private namespaces this
one plays the distribution's network configuration:

* ``BOOTPROTO=none``: the interface gets exactly the file's addresses
  (``IPADDR<n>``/``NETMASK<n>``, ``IPV6ADDR[_<n>]``/``IPV6NETMASK[_<n>]``) and
  default routes (``GATEWAY[<n>]``, ``IPV6_DEFAULTGW[_<n>]``; a gateway outside
  the adapter's subnets on-link), nothing else;
* ``BOOTPROTO=dhcp``: hostsim plays the DHCP server too: the IPv4 part is the
  adapter's lease (the configuration hostsim gave it at start, kept in
  ``<state>/<mac>/lease``), marked dynamic; IPv6 entries of the file still apply
  (the daemon passes them on for that case);
* ``DNS<n>`` entries (the lease's, under DHCP, if the file has none) are the
  adapter's name servers; ``/etc/resolv.conf`` (the namespace's own file) gets
  those of every adapter, in the order of their MACs, each once, as
  NetworkManager merges its connections';
* the applied file is kept as ``<state>/<mac>/ifcfg``, which hostsim's
  ``hv_get_dhcp_info`` reads, and one syslog line says what was applied.

Exit status 0 on success; otherwise 1 with the reason on stderr (the daemon then
answers ``HV_E_FAIL``).  It runs as ``python -I -S`` for every SET, so it
imports little (no argparse, subprocess or re: 20 ms instead of 70 ms of start)
and hands all its ``ip`` commands to two ``ip -batch`` processes, one per family.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import syslog
from collections.abc import Sequence

RESOLV_CONF = "/etc/resolv.conf"
#: How long a DHCP lease hostsim hands out lasts (seconds); shown by ``ip addr``.
LEASE_SECONDS = 86400

_KINDS = ("IPV6_DEFAULTGW", "IPV6NETMASK", "IPV6ADDR", "IPADDR", "NETMASK", "GATEWAY", "DNS")


class IfcfgError(ValueError):
    pass


class Ifcfg:
    """The parts of an ifcfg file, in the daemon's numbering."""

    def __init__(self) -> None:
        self.device = ""
        self.hwaddr = ""
        self.bootproto = ""
        #: (address, prefix length) pairs: IPv4 then IPv6, in index order.
        self.addresses: list[tuple[str, int]] = []
        self.gateways: list[str] = []
        self.dns: list[str] = []

    @property
    def dhcp(self) -> bool:
        return self.bootproto.lower() == "dhcp"


def _kind(key: str) -> tuple[str, int] | None:
    """("IPADDR", 0) for ``IPADDR0``, ("IPV6ADDR", -1) for ``IPV6ADDR``, ("IPV6ADDR", 1)
    for ``IPV6ADDR_1``; None for a key that is none of these."""
    for kind in _KINDS:
        if key.startswith(kind):
            suffix = key[len(kind) :]
            if suffix.startswith("_"):
                suffix = suffix[1:]
                if not suffix:
                    return None
            if not suffix:
                return kind, -1
            if suffix.isascii() and suffix.isdigit():
                return kind, int(suffix)
            return None
    return None


def _prefix(netmask: str, version: int, key: str) -> int:
    try:
        if version == 4:
            return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
        prefix = int(netmask.lstrip("/"))
    except ValueError:
        raise IfcfgError(f"{key}={netmask!r} is not a netmask") from None
    if not 0 <= prefix <= 128:
        raise IfcfgError(f"{key}={netmask!r} is not a prefix length")
    return prefix


def parse_ifcfg(text: str) -> Ifcfg:
    """An ifcfg file as hv_kvp_daemon writes it (``KEY=value`` lines).

    IPv4 addresses pair with the netmask of the same number (``IPADDR0`` and
    ``NETMASK0``), IPv6 ones likewise (``IPV6ADDR`` and ``IPV6NETMASK``,
    ``IPV6ADDR_1`` and ``IPV6NETMASK_1``).  Gateways and DNS servers keep their
    order; an IPv4 gateway list starts unnumbered (``GATEWAY``, ``GATEWAY1``).
    """
    result = Ifcfg()
    found: dict[tuple[str, int], str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise IfcfgError(f"line {number}: {line!r} is not KEY=value")
        if key == "DEVICE":
            result.device = value
        elif key == "HWADDR":
            result.hwaddr = value
        elif key == "BOOTPROTO":
            result.bootproto = value
        else:
            numbered = _kind(key)
            if numbered is None:
                continue  # not ours to judge (a distribution file may hold more)
            found[numbered] = value
    for family, mask_key, version in (("IPADDR", "NETMASK", 4), ("IPV6ADDR", "IPV6NETMASK", 6)):
        for kind, index in sorted(k for k in found if k[0] == family):
            address = found[kind, index]
            mask = found.get((mask_key, index))
            name = f"{kind}{'' if index < 0 else index}"
            if mask is None:
                raise IfcfgError(f"{name} has no {mask_key}")
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                raise IfcfgError(f"{name}={address!r} is not an IP address") from None
            result.addresses.append((str(parsed), _prefix(mask, version, mask_key)))
    for family in ("GATEWAY", "IPV6_DEFAULTGW", "DNS"):
        for kind, index in sorted(k for k in found if k[0] == family):
            try:
                parsed = ipaddress.ip_address(found[kind, index])
            except ValueError:
                raise IfcfgError(f"{kind}={found[kind, index]!r} is not an IP address") from None
            (result.dns if family == "DNS" else result.gateways).append(str(parsed))
    if not result.device:
        raise IfcfgError("no DEVICE")
    return result


def _version(address: str) -> int:
    return ipaddress.ip_address(address).version


def plan(config: Ifcfg, lease: Ifcfg | None) -> tuple[list[list[str]], list[str]]:
    """The ``ip`` commands that apply ``config``, and the DNS servers it asks for.

    Each command starts with its family option (``-4`` or ``-6``): they run as
    two ``ip -batch`` lists, whose lines take no options.
    """
    dev = config.device
    addresses = list(config.addresses)
    gateways = list(config.gateways)
    dns = list(config.dns)
    dynamic: list[tuple[str, int]] = []
    if config.dhcp:
        addresses = [a for a in addresses if _version(a[0]) == 6]
        gateways = [g for g in gateways if _version(g) == 6]
        if lease is not None:
            dynamic = [a for a in lease.addresses if _version(a[0]) == 4]
            gateways = [g for g in lease.gateways if _version(g) == 4] + gateways
            if not dns:
                dns = list(lease.dns)
    commands = [
        ["-4", "addr", "flush", "dev", dev],
        ["-6", "addr", "flush", "dev", dev],
        ["-4", "route", "flush", "exact", "0.0.0.0/0", "dev", dev],
        ["-6", "route", "flush", "exact", "::/0", "dev", dev],
        ["-4", "link", "set", dev, "up"],
    ]
    lifetimes = ["valid_lft", str(LEASE_SECONDS), "preferred_lft", str(LEASE_SECONDS)]
    for address, prefix in dynamic:
        commands.append(["-4", "addr", "add", f"{address}/{prefix}", "dev", dev, *lifetimes])
    for address, prefix in addresses:
        version = _version(address)
        extra = ["nodad"] if version == 6 else []
        commands.append([f"-{version}", "addr", "add", f"{address}/{prefix}", "dev", dev, *extra])
    networks = [ipaddress.ip_interface(f"{a}/{p}").network for a, p in [*dynamic, *addresses]]
    metrics = {4: 0, 6: 0}
    for gateway in gateways:
        version = _version(gateway)
        route = ["default", "via", gateway, "dev", dev]
        if not any(ipaddress.ip_address(gateway) in network for network in networks):
            # Outside every subnet of the adapter: a route to it on the link, as
            # NetworkManager adds, instead of "Nexthop has invalid gateway".
            route.append("onlink")
        if metrics[version] == 0:
            commands.append([f"-{version}", "route", "replace", *route])
        else:
            metric = ["metric", str(metrics[version])]
            commands.append([f"-{version}", "route", "add", *route, *metric])
        metrics[version] += 1
    return commands, dns


def resolv_conf(old: str, servers: Sequence[str]) -> str:
    """``old`` with its ``nameserver`` lines replaced by ``servers`` (where the first was)."""
    lines = old.splitlines()
    new = [f"nameserver {server}" for server in servers]
    out: list[str] = []
    placed = False
    for line in lines:
        if line.split()[:1] == ["nameserver"]:
            if not placed:
                out += new
                placed = True
            continue
        out.append(line)
    if not placed:
        out += new
    return "".join(line + "\n" for line in out)


def all_servers(state: str) -> list[str]:
    """The name servers of every adapter (``<state>/<mac>/dns``), MAC order, each once."""
    servers: list[str] = []
    for mac in sorted(os.listdir(state)):
        try:
            lines = _read(os.path.join(state, mac, "dns")).split()
        except OSError:
            continue
        servers += [server for server in lines if server not in servers]
    return servers


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _mac_of(device: str) -> str:
    try:
        return _read(f"/sys/class/net/{device}/address").strip().lower()
    except OSError:
        raise IfcfgError(f"there is no interface {device}") from None


def _batch_word(word: str) -> str:
    # ip -batch splits lines at blanks and takes "#" for a comment; an interface
    # name may hold neither blanks nor quotes, but it may hold "#".
    return f'"{word}"' if "#" in word else word


def run_ip(commands: Sequence[list[str]]) -> None:
    """Run family-tagged ``ip`` commands, one ``ip -batch`` per family, in order."""
    for family in ("-4", "-6"):
        lines = [" ".join(map(_batch_word, c[1:])) for c in commands if c[0] == family]
        if not lines:
            continue
        stdin_r, stdin_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = os.posix_spawnp(
                "ip",
                ["ip", family, "-batch", "-"],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                    (os.POSIX_SPAWN_CLOSE, stdin_w),
                    (os.POSIX_SPAWN_CLOSE, err_r),
                ],
            )
        finally:
            os.close(stdin_r)
            os.close(err_w)
        with os.fdopen(stdin_w, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        with os.fdopen(err_r) as f:
            errors = f.read().strip()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise IfcfgError(f"ip {family} -batch: {errors or status}")


def apply(path: str, state: str) -> str:
    """Apply the ifcfg file at ``path``; returns a one-line summary."""
    config = parse_ifcfg(_read(path))
    mac = _mac_of(config.device)
    if config.hwaddr and config.hwaddr.lower() != mac:
        raise IfcfgError(f"HWADDR={config.hwaddr} but {config.device} has {mac}")
    lease_path = os.path.join(state, mac, "lease")
    lease = parse_ifcfg(_read(lease_path)) if os.path.exists(lease_path) else None
    commands, dns = plan(config, lease)
    run_ip(commands)
    os.makedirs(os.path.join(state, mac), exist_ok=True)
    with open(os.path.join(state, mac, "dns"), "w", encoding="utf-8") as f:
        f.write("".join(server + "\n" for server in dns))
    with open(RESOLV_CONF, "r+", encoding="utf-8") as f:
        # In place: hostsim's resolv.conf is a file bound over the real one.
        text = resolv_conf(f.read(), all_servers(state))
        f.seek(0)
        f.write(text)
        f.truncate()
    with open(os.path.join(state, mac, "ifcfg"), "w", encoding="utf-8") as f:
        f.write(_read(path))
    shown = [f"{a}/{p}" for a, p in config.addresses] if not config.dhcp else ["dhcp"]
    return (
        f"{config.device}: applied {os.path.basename(path)}: {' '.join(shown) or 'no address'}"
        f"; gateways {' '.join(config.gateways) or '-'}; DNS {' '.join(dns) or '-'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``hv_set_ifconfig --state DIR IFCFG``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "--state":
        print("usage: hv_set_ifconfig --state DIR IFCFG", file=sys.stderr)
        return 2
    _, state, ifcfg = args
    syslog.openlog("hv_set_ifconfig", 0, syslog.LOG_USER)
    try:
        summary = apply(ifcfg, state)
    except (IfcfgError, OSError) as exc:
        message = f"{ifcfg}: {exc}"
        syslog.syslog(syslog.LOG_ERR, message)
        print(f"hv_set_ifconfig: {message}", file=sys.stderr)
        return 1
    syslog.syslog(syslog.LOG_INFO, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
