"""Synthetic Hyper-V network adapters for ``kvpfs hostsim``.

For IP requests hv_kvp_daemon looks at the guest's network the way it looks on
Hyper-V, where each adapter is a netvsc NIC:

* GET_IP_INFO: the interface whose ``/sys/class/net/<if>/address`` (upper-cased)
  is the host's MAC; then ``getifaddrs`` for its addresses and netmasks,
  ``ip route show dev <if>`` for the default gateways (IPv4, then IPv6), and the
  scripts ``hv_get_dns_info`` and ``hv_get_dhcp_info <if>`` from
  ``/usr/libexec/hypervkvpd/``;
* SET_IP_INFO: the interface whose ``/sys/class/net/<if>/device/device_id`` is
  the host's ``{guid}``; then it writes ``/var/lib/hyperv/ifcfg-<if>`` and runs
  ``/usr/libexec/hypervkvpd/hv_set_ifconfig`` on it.

:class:`SyntheticNetwork` builds that, in hostsim's private mount and network
namespaces (nothing of it exists outside them):

* one interface per adapter (:class:`NicSpec`), with the adapter's MAC and no
  IPv6 link-local address (so that a GET shows exactly what was configured),
  configured by the same ``hv_set_ifconfig`` the daemon runs.  It is one end of
  a veth pair (not a ``dummy``: not every kernel has that driver); the other end,
  ``sw<n>``, sits in a third network namespace, the virtual switch, which only
  hostsim holds (by a descriptor), so the guest sees ``lo`` and its adapters and
  nothing else, with carrier;
* ``/sys/class/net``: a tmpfs over the real directory in which each interface of
  the namespace is the real sysfs directory (from a sysfs mounted in the new
  network namespace, which shows its interfaces and no others), bound in.  A
  synthetic adapter's directory is a tmpfs holding every real entry bound back
  plus ``device/device_id`` and ``device/class_id`` (netvsc's class GUID), which
  a veth lacks.  :meth:`SyntheticNetwork.sync` keeps the directory
  in step with the real interfaces (created, deleted, renamed): hostsim runs it
  on every rtnetlink link event and before every IP request;
* ``/usr/libexec/hypervkvpd``: a tmpfs with the real scripts bound back, plus
  hostsim's ``hv_set_ifconfig`` (:mod:`kvpfs.peers.hyperv.set_ifconfig`) and
  ``hv_get_dhcp_info``.  Debian's ``hv_get_dhcp_info`` asks NetworkManager,
  systemd-networkd and ifupdown about the interface *by name*; those serve the
  host's network namespace and would answer for the host's own interface of the
  same name, so hostsim's reports what its ``hv_set_ifconfig`` applied last;
  Debian's ``hv_get_dns_info`` (the ``nameserver`` lines of ``/etc/resolv.conf``)
  stays;
* ``/etc/resolv.conf``: a private file bound over the real one, with
  ``options timeout:1 attempts:1`` (a query to a documentation address goes
  nowhere; the daemon resolves its host name once at start).

A DHCP request (``BOOTPROTO=dhcp``) is answered from the adapter's lease: the
IPv4 addresses, gateways and DNS servers it was started with (none: no lease).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import trio

from kvpfs.peers.hyperv import mounts, set_ifconfig
from kvpfs.peers.hyperv.ipconfig import ConfigError, normalize_guid, normalize_mac

log = logging.getLogger("kvpfs.hostsim")

SCRIPT_DIR = "/usr/libexec/hypervkvpd"
#: hostsim's per-adapter state (lease, applied ifcfg) and its resolv.conf.
STATE_DIR = f"{SCRIPT_DIR}/hostsim"
SYS_NET = "/sys/class/net"
RESOLV_CONF = "/etc/resolv.conf"
#: The VMBus class of a synthetic network adapter (netvsc).
NETVSC_CLASS_ID = "{f8615163-df3e-46c5-913f-f2d2f965ed0e}"
#: Microsoft's OUI, which Hyper-V's dynamic MAC addresses use.
HYPERV_OUI = "00:15:5d"
_GUID_NAMESPACE = uuid.UUID("8f5c0a4e-6d1b-4c1e-9a57-2f3d9b1e7c40")

_NETLINK_ROUTE = 0
_RTMGRP_LINK = 1


@dataclass(frozen=True)
class NicSpec:
    """One synthetic adapter: guest interface name, MAC, VMBus GUID, configuration."""

    name: str
    mac: str
    guid: str
    #: Interface addresses with prefix ("192.0.2.10/24", "2001:db8::10/64").
    addresses: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    #: Whether the adapter starts with BOOTPROTO=dhcp (its addresses are the lease).
    dhcp: bool = False


def nic_mac(index: int) -> str:
    """The MAC of the ``index``-th adapter (0: the default eth0)."""
    return f"{HYPERV_OUI}:00:0a:{index + 1:02x}"


def nic_guid(mac: str) -> str:
    """An adapter's VMBus device GUID, derived from its MAC (fixed for a MAC)."""
    return str(uuid.uuid5(_GUID_NAMESPACE, normalize_mac(mac)))


def default_nics() -> list[NicSpec]:
    mac = nic_mac(0)
    return [
        NicSpec(
            "eth0",
            mac,
            nic_guid(mac),
            addresses=("192.0.2.10/24",),
            gateways=("192.0.2.1",),
            dns=("192.0.2.53",),
        )
    ]


# -- --nic ------------------------------------------------------------------------------------


def _valid_name(name: str) -> bool:
    return (
        0 < len(name.encode()) < 16
        and name not in (".", "..", "lo")
        and not any(c in name for c in "/:,=")
        and not any(c.isspace() for c in name)
    )


def _interface(text: str) -> str:
    try:
        return str(ipaddress.ip_interface(text)) if "/" in text else ""
    except ValueError:
        return ""


def apply_nic_option(nics: Sequence[NicSpec], text: str) -> list[NicSpec]:
    """``--nic NAME[,mac=MAC][,guid=GUID][,ip=ADDR/PREFIX]...[,gw=ADDR]...[,dns=ADDR]...[,dhcp]``.

    An existing NAME is reconfigured (each kind of setting given replaces that
    kind), a new one is added (MAC and GUID by default from its position).
    ValueError with a message if the text is not that.
    """
    name, *settings = text.split(",")
    if not _valid_name(name):
        raise ValueError(f"{name!r} is not an interface name for a synthetic adapter")
    result = list(nics)
    index = next((i for i, nic in enumerate(result) if nic.name == name), None)
    if index is None:
        default_mac = nic_mac(len(result))
        nic = NicSpec(name, default_mac, nic_guid(default_mac))
    else:
        nic = result[index]
    mac: str | None = None
    guid: str | None = None
    dhcp: bool | None = None
    lists: dict[str, list[str]] = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        try:
            if key == "dhcp" and (not eq or value in ("yes", "no")):
                dhcp = value != "no"
            elif key == "mac" and eq:
                mac = normalize_mac(value)
                if int(mac[:2], 16) & 1:
                    raise ValueError(f"{value} is a multicast MAC address")
            elif key == "guid" and eq:
                guid = normalize_guid(value)
            elif key == "ip" and eq and _interface(value):
                lists.setdefault("addresses", []).append(_interface(value))
            elif key in ("gw", "dns") and eq:
                address = str(ipaddress.ip_address(value))
                lists.setdefault("gateways" if key == "gw" else "dns", []).append(address)
            else:
                raise ValueError(
                    f"{setting!r}: expected mac=MAC, guid=GUID, ip=ADDR/PREFIX, gw=ADDR, "
                    "dns=ADDR or dhcp"
                )
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        except ValueError as exc:
            if key in ("gw", "dns"):
                raise ValueError(f"{key}={value!r} is not an IP address") from None
            raise exc from None
    if mac is not None:
        # A new MAC without a GUID gets the GUID derived from it.
        nic = replace(nic, mac=mac, guid=guid or nic_guid(mac))
    elif guid is not None:
        nic = replace(nic, guid=guid)
    if dhcp is not None:
        nic = replace(nic, dhcp=dhcp)
    nic = replace(
        nic,
        addresses=tuple(lists.get("addresses", nic.addresses)),
        gateways=tuple(lists.get("gateways", nic.gateways)),
        dns=tuple(lists.get("dns", nic.dns)),
    )
    if index is None:
        result.append(nic)
    else:
        result[index] = nic
    for field in ("mac", "guid"):
        values = [getattr(n, field) for n in result]
        if len(set(values)) != len(values):
            raise ValueError(f"two adapters have the same {field}")
    return result


# -- ifcfg files, as the daemon writes them ---------------------------------------------------


def ifcfg_text(nic: NicSpec) -> str:
    """The adapter's configuration in hv_kvp_daemon's ifcfg format and numbering."""
    lines = [f"HWADDR={nic.mac.upper()}", f"DEVICE={nic.name}"]
    lines.append(f"BOOTPROTO={'dhcp' if nic.dhcp else 'none'}")
    interfaces = [ipaddress.ip_interface(a) for a in nic.addresses]
    v4 = [i for i in interfaces if i.version == 4]
    v6 = [i for i in interfaces if i.version == 6]
    lines += [f"IPADDR{n}={i.ip}" for n, i in enumerate(v4)]
    lines += [f"IPV6ADDR{'' if n == 0 else f'_{n}'}={i.ip.exploded}" for n, i in enumerate(v6)]
    lines += [f"NETMASK{n}={i.netmask}" for n, i in enumerate(v4)]
    lines += [
        f"IPV6NETMASK{'' if n == 0 else f'_{n}'}={i.network.prefixlen}" for n, i in enumerate(v6)
    ]
    gw4 = [g for g in nic.gateways if ipaddress.ip_address(g).version == 4]
    gw6 = [ipaddress.ip_address(g) for g in nic.gateways if ipaddress.ip_address(g).version == 6]
    lines += [f"GATEWAY{'' if n == 0 else n}={g}" for n, g in enumerate(gw4)]
    lines += [f"IPV6_DEFAULTGW{'' if n == 0 else f'_{n}'}={g.exploded}" for n, g in enumerate(gw6)]
    lines += [f"DNS{n}={ipaddress.ip_address(d).exploded}" for n, d in enumerate(nic.dns, 1)]
    return "".join(line + "\n" for line in lines)


_DHCP_INFO = """#!/bin/sh
# kvpfs hostsim: "Enabled" if the configuration hv_set_ifconfig last applied to
# interface $1 has BOOTPROTO=dhcp, else "Disabled".  (Debian's script asks
# NetworkManager, systemd-networkd and ifupdown by interface name; in hostsim's
# private network namespace they would answer for the host's interfaces.)
mac=$(cat "/sys/class/net/$1/address" 2>/dev/null)
if [ -n "$mac" ] && grep -qsx 'BOOTPROTO=dhcp' "{state}/$mac/ifcfg"; then
    echo Enabled
else
    echo Disabled
fi
"""

_DNS_INFO = """#!/bin/sh
# kvpfs hostsim: the name servers of /etc/resolv.conf (as Debian's hv_get_dns_info).
awk '/^nameserver/ {{ print $2 }}' /etc/resolv.conf 2>/dev/null
"""

_SET_IFCONFIG = """#!/bin/sh
# kvpfs hostsim: apply the ifcfg file hv_kvp_daemon wrote to the synthetic interface.
exec {python} -I -S {program} --state {state} "$@"
"""


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


# -- the network ------------------------------------------------------------------------------


class NetworkError(Exception):
    """The synthetic network could not be built (a one-line reason)."""


class SyntheticNetwork:
    """The adapters of hostsim's private network namespace and what the daemon reads.

    :meth:`setup` runs once, single-threaded, inside the private mount and network
    namespaces; :meth:`sync` and :meth:`watch` then run on the trio thread.
    """

    def __init__(self, nics: Sequence[NicSpec], *, python: str = sys.executable) -> None:
        self.nics = list(nics)
        self.python = python
        #: ifindex → adapter, for the interfaces hostsim created.
        self.synthetic: dict[int, NicSpec] = {}
        #: What /sys/class/net holds: name → (ifindex, whether it is synthetic).
        self.entries: dict[str, tuple[int, bool]] = {}
        self._sysfs: int | None = None
        #: The virtual switch's network namespace, where the veth peers live.
        self._switch: int | None = None
        self.syncs = 0

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        self._ip("link", "set", "lo", "up")
        if self.nics:
            self._adapters()
        self._scripts()
        self._resolv_conf()
        self._sysfs_view()
        for nic in self.nics:
            self._configure(nic)

    def _adapters(self) -> None:
        guest = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            mounts.unshare(mounts.CLONE_NEWNET)
            try:
                self._switch = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                mounts.setns(guest, mounts.CLONE_NEWNET)
            switch = f"/proc/{os.getpid()}/fd/{self._switch}"
            for n, nic in enumerate(self.nics):
                peer = f"sw{n}"
                self._ip(
                    "link", "add", nic.name, "address", nic.mac, "type", "veth",
                    "peer", "name", peer, "netns", switch,
                )  # fmt: skip
                # No IPv6 link-local address: GET shows exactly what was configured.
                self._ip("link", "set", nic.name, "addrgenmode", "none")
                self.synthetic[socket.if_nametoindex(nic.name)] = nic
                mounts.setns(self._switch, mounts.CLONE_NEWNET)
                try:
                    self._ip("link", "set", peer, "addrgenmode", "none")
                    self._ip("link", "set", peer, "up")
                finally:
                    mounts.setns(guest, mounts.CLONE_NEWNET)
        finally:
            os.close(guest)

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")

    def _scripts(self) -> None:
        ours = ("hv_set_ifconfig", "hv_get_dhcp_info", "hostsim")
        if os.path.isdir(SCRIPT_DIR):
            mounts.shadow(SCRIPT_DIR, skip=ours)
        else:
            mounts.shadow(os.path.dirname(SCRIPT_DIR))
            os.mkdir(SCRIPT_DIR, 0o755)
        os.mkdir(STATE_DIR, 0o755)
        program = os.path.abspath(set_ifconfig.__file__)
        _write(
            f"{SCRIPT_DIR}/hv_set_ifconfig",
            _SET_IFCONFIG.format(
                python=shlex.quote(self.python),
                program=shlex.quote(program),
                state=shlex.quote(STATE_DIR),
            ),
            0o755,
        )
        _write(f"{SCRIPT_DIR}/hv_get_dhcp_info", _DHCP_INFO.format(state=STATE_DIR), 0o755)
        if not os.path.exists(f"{SCRIPT_DIR}/hv_get_dns_info"):
            _write(f"{SCRIPT_DIR}/hv_get_dns_info", _DNS_INFO.format(), 0o755)
        for nic in self.nics:
            os.mkdir(f"{STATE_DIR}/{nic.mac}", 0o755)
            # What hostsim's DHCP server hands this adapter: its start configuration.
            _write(f"{STATE_DIR}/{nic.mac}/lease", ifcfg_text(replace(nic, dhcp=False)))

    def _resolv_conf(self) -> None:
        text = (
            "# kvpfs hostsim: the resolver of the private network namespace\n"
            "options timeout:1 attempts:1\n"
        )
        private = f"{STATE_DIR}/resolv.conf"
        _write(private, text)
        if os.path.isfile(RESOLV_CONF):
            # Through a symlink, the bind lands on its target: in this namespace only.
            mounts.mount(private, RESOLV_CONF, None, mounts.MS_BIND)
            return
        # Missing or a dangling symlink: a private /etc with our file in it.
        mounts.shadow(os.path.dirname(RESOLV_CONF), skip=(os.path.basename(RESOLV_CONF),))
        _write(RESOLV_CONF, text)

    def _sysfs_view(self) -> None:
        # A sysfs mounted now shows this network namespace's interfaces.  Mount it
        # on /sys/class/net itself, keep a descriptor, and cover it with a tmpfs.
        flags = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
        mounts.mount("sysfs", SYS_NET, "sysfs", flags)
        self._sysfs = os.open(SYS_NET, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        mounts.mount("tmpfs", SYS_NET, "tmpfs", flags, "mode=755")
        self.sync()

    def _configure(self, nic: NicSpec) -> None:
        path = f"{STATE_DIR}/{nic.mac}/initial"
        _write(path, ifcfg_text(nic))
        done = subprocess.run(
            [f"{SCRIPT_DIR}/hv_set_ifconfig", path], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise NetworkError(f"configuring {nic.name}: {done.stderr.strip()}")

    # -- /sys/class/net ------------------------------------------------------------------

    @property
    def _root(self) -> str:
        assert self._sysfs is not None
        return f"/proc/self/fd/{self._sysfs}"

    def _source(self, name: str) -> str:
        """The real sysfs directory of interface ``name``.

        ``class/net/<if>`` is a relative symlink (``../../devices/...``); resolved
        by the kernel, its ``..`` would land on the covered root of that sysfs and
        cross into the tmpfs on top, so it is resolved here.
        """
        link = os.readlink(f"{self._root}/class/net/{name}")
        relative = os.path.normpath(os.path.join("class/net", link))
        if relative.startswith(".."):
            raise OSError(errno.ENOENT, f"{link} leaves sysfs")
        return f"{self._root}/{relative}"

    def _real_interfaces(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for name in os.listdir(f"{self._root}/class/net"):
            try:
                with open(f"{self._source(name)}/ifindex", encoding="ascii") as f:
                    found[name] = int(f.read())
            except (OSError, ValueError):
                continue  # gone since the listing
        return found

    def sync(self) -> None:
        """Make /sys/class/net show the namespace's interfaces as they are now.

        Never raises: what cannot be brought in step is logged (the daemon then
        sees a stale entry, or none).
        """
        try:
            self._sync()
        except OSError as exc:
            log.warning("hostsim: keeping /sys/class/net in step: %s", exc)

    def _sync(self) -> None:
        if self._sysfs is None:
            return
        real = self._real_interfaces()
        for name, (ifindex, synthetic) in list(self.entries.items()):
            if real.get(name) != ifindex or synthetic != (ifindex in self.synthetic):
                self._remove(name)
        for name, ifindex in real.items():
            if name not in self.entries:
                try:
                    self._add(name, ifindex)
                except OSError as exc:
                    log.warning("hostsim: /sys/class/net/%s: %s", name, exc)
                    with contextlib.suppress(OSError):
                        self._remove(name)
        self.syncs += 1

    def _add(self, name: str, ifindex: int) -> None:
        target = f"{SYS_NET}/{name}"
        source = self._source(name)
        nic = self.synthetic.get(ifindex)
        os.mkdir(target, 0o755)
        self.entries[name] = (ifindex, nic is not None)
        if nic is None:
            mounts.mount(source, target, None, mounts.MS_BIND)
            return
        flags = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
        mounts.mount("tmpfs", target, "tmpfs", flags, "mode=755")
        mounts.bind_entries(source, target, sorted(os.listdir(source)))
        device = f"{target}/device"
        if not os.path.isdir(device):
            os.mkdir(device, 0o755)
        _write(f"{device}/device_id", "{" + nic.guid + "}\n", 0o444)
        _write(f"{device}/class_id", NETVSC_CLASS_ID + "\n", 0o444)

    def _remove(self, name: str) -> None:
        target = f"{SYS_NET}/{name}"
        self.entries.pop(name, None)
        with contextlib.suppress(OSError):
            mounts.umount(target)
        try:
            os.rmdir(target)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync on every link event of the namespace (rtnetlink), until cancelled."""
        sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
        with sock:
            await sock.bind((0, _RTMGRP_LINK))
            task_status.started()
            while True:
                try:
                    await sock.recv(65536)
                except OSError as exc:  # ENOBUFS: events were lost; sync anyway
                    log.debug("hostsim: rtnetlink: %s", exc)
                self.sync()

    def close(self) -> None:
        for fd in (self._sysfs, self._switch):
            if fd is not None:
                os.close(fd)
        self._sysfs = self._switch = None
