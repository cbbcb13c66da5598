"""The XenStore nodes libxl 4.17 writes for a vbd, as data (no I/O).

:func:`attach_ops` is ``xl block-attach``'s one transaction, in libxl's order:

1. the ``/libxl/<domU>/device/vbd/<devid>`` copy is removed and gets ``frontend``
   and ``backend``;
2. the frontend directory is removed, created, given ``[n<domU>, r<bdom>]`` and
   ``backend``; every frontend key is written and given the same permissions;
3. the backend directory is removed, created, given ``[n<bdom>, r<domU>]`` and
   ``frontend``; the backend keys inherit the directory's permissions;
4. the backend keys are copied under the ``/libxl`` path (``[n0]`` inherited).

Removals of a path that is not there are part of the sequence; a consumer ignores
their ``ENOENT`` as libxl does.  :func:`closing_ops` is the first step of
``xl block-detach``; :func:`cleanup_parents_stop` says where removing empty parents
stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvpfs.vbd.diskspec import DiskSpec
from kvpfs.vbd.states import XenbusState

__all__ = [
    "DEFAULT_PROTOCOL",
    "DEFAULT_SCRIPT_DIR",
    "DevicePaths",
    "XsOp",
    "attach_ops",
    "closing_ops",
    "device_paths",
    "dom0_ops",
    "domain_creation_ops",
    "parse_xbdback_name",
    "unsupported_reason",
    "vm_uuid",
    "xbdback_name",
]

#: Debian's hotplug script directory (libxl's ``libxl__xen_script_dir_path()``).
DEFAULT_SCRIPT_DIR = "/etc/xen/scripts"
#: What libxl writes as ``protocol`` for a 64-bit x86 PV guest.
DEFAULT_PROTOCOL = "x86_64-abi"

#: ``XsOp.op`` values.
RM, MKDIR, WRITE, SET_PERMS = "rm", "mkdir", "write", "set_perms"


@dataclass(frozen=True, slots=True)
class XsOp:
    """One XenStore request of a sequence."""

    op: str
    path: str
    value: bytes = b""
    perms: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.op == WRITE:
            return f"write {self.path} = {self.value!r}"
        if self.op == SET_PERMS:
            return f"set_perms {self.path} {' '.join(self.perms)}"
        return f"{self.op} {self.path}"


@dataclass(frozen=True, slots=True)
class DevicePaths:
    domid: int
    backend_domid: int
    devid: int
    frontend: str
    backend: str
    libxl: str

    @property
    def name(self) -> str:
        return xbdback_name(self.domid, self.devid)


def device_paths(domid: int, backend_domid: int, devid: int) -> DevicePaths:
    return DevicePaths(
        domid,
        backend_domid,
        devid,
        frontend=f"/local/domain/{domid}/device/vbd/{devid}",
        backend=f"/local/domain/{backend_domid}/backend/vbd/{domid}/{devid}",
        libxl=f"/libxl/{domid}/device/vbd/{devid}",
    )


def xbdback_name(domid: int, devid: int) -> str:
    """xbdback(4)'s interface name: ``xbdback3i769`` for devid 769 of domain 3."""
    return f"xbdback{domid}i{devid}"


_NAME = re.compile(r"xbdback(0|[1-9][0-9]{0,9})i(0|[1-9][0-9]{0,9})")


def parse_xbdback_name(name: str) -> tuple[int, int] | None:
    """(domid, devid) for a canonical interface name, else None."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def unsupported_reason(spec: DiskSpec) -> str | None:
    """Why kvpfs cannot attach ``spec`` (it drives the ``phy`` vbd backend only)."""
    if spec.specification != "xen":
        return f"specification={spec.specification} is not supported (only xen)"
    if spec.backendtype not in (None, "phy"):
        return f"backendtype={spec.backendtype} is not supported (only phy)"
    if spec.format != "raw":
        return f"format {spec.format} needs the qdisk backend; only raw is supported"
    if spec.colo or spec.colo_params:
        return "COLO needs the qdisk backend"
    if not spec.target:
        return "a target is required (empty cdrom drives need the qdisk backend)"
    return None


def params_value(spec: DiskSpec) -> str:
    """``params``: the target, with ``/dev/`` in front of a relative path
    unless a script interprets it."""
    target = spec.target or ""
    if spec.script is None and target and not target.startswith("/"):
        return "/dev/" + target
    return target


def script_value(spec: DiskSpec, script_dir: str = DEFAULT_SCRIPT_DIR) -> str:
    script = spec.script or "block"
    if script.startswith("/"):
        return script
    return f"{script_dir.rstrip('/')}/{script}"


def backend_keys(
    domid: int, spec: DiskSpec, *, script_dir: str = DEFAULT_SCRIPT_DIR
) -> list[tuple[str, bytes]]:
    keys = [
        ("params", _b(params_value(spec))),
        ("script", _b(script_value(spec, script_dir))),
        ("frontend-id", b"%d" % domid),
        ("online", b"1"),
        ("removable", b"1" if spec.is_cdrom else b"0"),
        ("bootable", b"1"),
        ("state", b"%d" % XenbusState.INITIALISING),
        ("dev", _b(spec.vdev)),
        ("type", b"phy"),
        ("mode", b"w" if spec.readwrite else b"r"),
        ("device-type", _b(spec.devtype)),
    ]
    if spec.direct_io_safe:
        keys.append(("direct-io-safe", b"1"))
    keys.append(("discard-enable", b"1" if spec.discard_enable else b"0"))
    keys.append(("specification", _b(spec.specification)))
    return keys


def frontend_keys(
    backend_domid: int, devid: int, spec: DiskSpec, *, protocol: str | None = DEFAULT_PROTOCOL
) -> list[tuple[str, bytes]]:
    keys = [
        ("backend-id", b"%d" % backend_domid),
        ("state", b"%d" % XenbusState.INITIALISING),
        ("virtual-device", b"%d" % devid),
        ("device-type", _b(spec.devtype)),
        ("trusted", b"1" if spec.trusted else b"0"),
    ]
    if protocol is not None:
        keys.append(("protocol", _b(protocol)))
    return keys


def attach_ops(
    domid: int,
    backend_domid: int,
    devid: int,
    spec: DiskSpec,
    *,
    protocol: str | None = DEFAULT_PROTOCOL,
    script_dir: str = DEFAULT_SCRIPT_DIR,
) -> list[XsOp]:
    """``xl block-attach``'s transaction for ``spec`` as device ``devid`` (normally
    ``spec.devid``) of guest ``domid``.

    ``protocol`` is written for PV guests only (None for HVM).
    """
    p = device_paths(domid, backend_domid, devid)
    fe_perms = (f"n{domid}", f"r{backend_domid}")
    be_perms = (f"n{backend_domid}", f"r{domid}")
    bents = backend_keys(domid, spec, script_dir=script_dir)
    ops = [
        XsOp(RM, p.libxl),
        XsOp(WRITE, f"{p.libxl}/frontend", _b(p.frontend)),
        XsOp(WRITE, f"{p.libxl}/backend", _b(p.backend)),
        XsOp(RM, p.frontend),
        XsOp(MKDIR, p.frontend),
        XsOp(SET_PERMS, p.frontend, perms=fe_perms),
        XsOp(WRITE, f"{p.frontend}/backend", _b(p.backend)),
    ]
    for key, value in frontend_keys(backend_domid, devid, spec, protocol=protocol):
        ops.append(XsOp(WRITE, f"{p.frontend}/{key}", value))
        ops.append(XsOp(SET_PERMS, f"{p.frontend}/{key}", perms=fe_perms))
    ops += [
        XsOp(RM, p.backend),
        XsOp(MKDIR, p.backend),
        XsOp(SET_PERMS, p.backend, perms=be_perms),
        XsOp(WRITE, f"{p.backend}/frontend", _b(p.frontend)),
    ]
    ops += [XsOp(WRITE, f"{p.backend}/{key}", value) for key, value in bents]
    ops += [XsOp(WRITE, f"{p.libxl}/{key}", value) for key, value in bents]
    return ops


def closing_ops(paths: DevicePaths, backend_state: int | None) -> list[XsOp]:
    """``online=0`` and, unless the backend is already Closed, ``state=5``."""
    ops = [XsOp(WRITE, f"{paths.backend}/online", b"0")]
    if backend_state != XenbusState.CLOSED:
        ops.append(XsOp(WRITE, f"{paths.backend}/state", b"%d" % XenbusState.CLOSING))
    return ops


_DOMAIN_ROOT = re.compile(r"/(?:local(?:/domain(?:/[0-9]+)?)?|libxl(?:/[0-9]+(?:/device)?)?)?")


def cleanup_parents_stop(path: str) -> bool:
    """Whether removing empty parents must stop before ``path``.

    libxl walks up to the root.  A domain's own directories (``/local/domain/<id>``,
    ``/libxl/<id>`` and ``/libxl/<id>/device``, all made by domain creation) and
    everything above belong to the domain's lifetime, not to a device, so kvpfs
    stops there: a detach leaves the tree as the attach found it.  (libxl itself
    removes an emptied ``/libxl/<id>/device`` after the last detach.)
    """
    return _DOMAIN_ROOT.fullmatch(path) is not None


def dom0_ops() -> list[XsOp]:
    """What dom0's start-up leaves in its home (its name and id)."""
    return [
        XsOp(WRITE, "/local/domain/0/name", b"Domain-0"),
        XsOp(WRITE, "/local/domain/0/domid", b"0"),
    ]


#: The guest-writable nodes ``libxl__domain_make`` creates under the home, in its
#: order (libxl 4.17, tools/libs/light/libxl_create.c; a PV guest).
GUEST_WRITABLE = (
    "control/shutdown",
    "control/feature-poweroff",
    "control/feature-reboot",
    "control/feature-suspend",
    "control/sysrq",
    "device/suspend/event-channel",
    "data",
    "drivers",
    "feature",
    "attr",
    "error",
)


def vm_uuid(domid: int) -> str:
    """A stable stand-in for the guest's UUID (libxl takes the real one)."""
    return f"00000000-0000-4000-8000-{domid:012x}"


def domain_creation_ops(domid: int, name: str) -> list[XsOp]:
    """``libxl__domain_make``'s transaction for a PV guest, as libxl 4.17 writes it.

    The home and ``/vm/<uuid>`` with ``[n0, r<domU>]``, ``/libxl/<domU>`` and its
    ``device`` with ``[n0]``, ``vm`` and ``name``, the read-only ``cpu``, ``memory``,
    ``device`` and ``control`` directories, the nodes the guest writes
    (:data:`GUEST_WRITABLE`, ``[n<domU>]``), the platform features and the domain
    type.  ``domid`` is written too, as the build that follows does (reference
    §12.2 names only the nodes a vbd depends on; this is the whole layout, so that
    a guest agent can write ``data/`` or ``control/`` as on a real dom0).
    """
    home = f"/local/domain/{domid}"
    vm = f"/vm/{vm_uuid(domid)}"
    libxl = f"/libxl/{domid}"
    ro = ("n0", f"r{domid}")
    rw = (f"n{domid}",)
    ops = [
        XsOp(MKDIR, home),
        XsOp(SET_PERMS, home, perms=ro),
        XsOp(MKDIR, vm),
        XsOp(SET_PERMS, vm, perms=ro),
        XsOp(MKDIR, libxl),
        XsOp(MKDIR, f"{libxl}/device"),
        XsOp(WRITE, f"{home}/vm", _b(vm)),
        XsOp(WRITE, f"{home}/name", _b(name)),
    ]
    for directory in ("cpu", "memory", "device", "control"):
        path = f"{home}/{directory}"
        ops += [XsOp(MKDIR, path), XsOp(SET_PERMS, path, perms=ro)]
    for node in GUEST_WRITABLE:
        path = f"{home}/{node}"
        ops += [XsOp(MKDIR, path), XsOp(SET_PERMS, path, perms=rw)]
    ops += [
        XsOp(WRITE, f"{vm}/uuid", _b(vm_uuid(domid))),
        XsOp(WRITE, f"{vm}/name", _b(name)),
        XsOp(WRITE, f"{home}/control/platform-feature-multiprocessor-suspend", b"1"),
        XsOp(WRITE, f"{home}/control/platform-feature-xs_reset_watches", b"1"),
        XsOp(WRITE, f"{libxl}/type", b"pv"),
        XsOp(WRITE, f"{home}/domid", b"%d" % domid),
    ]
    return ops
