"""The libxl 4.17 node layout for a vbd, as an ordered list of operations."""

from __future__ import annotations

import pytest

from kvpfs.vbd.diskspec import parse_disk_spec
from kvpfs.vbd.layout import (
    GUEST_WRITABLE,
    DevicePaths,
    XsOp,
    attach_ops,
    cleanup_parents_stop,
    closing_ops,
    device_paths,
    domain_creation_ops,
    params_value,
    parse_xbdback_name,
    script_value,
    unsupported_reason,
    vm_uuid,
    xbdback_name,
)
from kvpfs.vbd.states import XenbusState, parse_state, state_name

FE = "/local/domain/1/device/vbd/51712"
BE = "/local/domain/0/backend/vbd/1/51712"
LX = "/libxl/1/device/vbd/51712"
FE_PERMS = ("n1", "r0")

BACKEND_KEYS = [
    ("params", b"/dev/loop0"),
    ("script", b"/etc/xen/scripts/block"),
    ("frontend-id", b"1"),
    ("online", b"1"),
    ("removable", b"0"),
    ("bootable", b"1"),
    ("state", b"1"),
    ("dev", b"xvda"),
    ("type", b"phy"),
    ("mode", b"w"),
    ("device-type", b"disk"),
    ("discard-enable", b"1"),
    ("specification", b"xen"),
]
FRONTEND_KEYS = [
    ("backend-id", b"0"),
    ("state", b"1"),
    ("virtual-device", b"51712"),
    ("device-type", b"disk"),
    ("trusted", b"1"),
    ("protocol", b"x86_64-abi"),
]


def expected_reference_ops() -> list[XsOp]:
    """§12.3 for ``xl block-attach 1 phy:/dev/loop0,xvda,w``, written out by hand."""
    ops = [
        XsOp("rm", LX),
        XsOp("write", f"{LX}/frontend", FE.encode()),
        XsOp("write", f"{LX}/backend", BE.encode()),
        XsOp("rm", FE),
        XsOp("mkdir", FE),
        XsOp("set_perms", FE, perms=FE_PERMS),
        XsOp("write", f"{FE}/backend", BE.encode()),
    ]
    for k, v in FRONTEND_KEYS:
        ops += [XsOp("write", f"{FE}/{k}", v), XsOp("set_perms", f"{FE}/{k}", perms=FE_PERMS)]
    ops += [
        XsOp("rm", BE),
        XsOp("mkdir", BE),
        XsOp("set_perms", BE, perms=("n0", "r1")),
        XsOp("write", f"{BE}/frontend", FE.encode()),
    ]
    ops += [XsOp("write", f"{BE}/{k}", v) for k, v in BACKEND_KEYS]
    ops += [XsOp("write", f"{LX}/{k}", v) for k, v in BACKEND_KEYS]
    return ops


def test_reference_example() -> None:
    spec = parse_disk_spec("phy:/dev/loop0,xvda,w")
    assert attach_ops(1, 0, spec.devid, spec) == expected_reference_ops()


def test_variants() -> None:
    spec = parse_disk_spec(
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, direct-io-safe, untrusted, "
        "target=loop3"
    )
    ops = {op.path: op.value for op in attach_ops(3, 0, spec.devid, spec, protocol=None) if op.op == "write"}
    be, fe = "/local/domain/0/backend/vbd/3/5632", "/local/domain/3/device/vbd/5632"
    assert ops[f"{be}/params"] == b"/dev/loop3"  # /dev/ for a relative target
    assert ops[f"{be}/mode"] == b"r"
    assert ops[f"{be}/removable"] == b"1"
    assert ops[f"{be}/device-type"] == b"cdrom"
    assert ops[f"{be}/direct-io-safe"] == b"1"
    assert ops[f"{be}/discard-enable"] == b"0"
    assert ops[f"{fe}/trusted"] == b"0"
    assert ops[f"{fe}/virtual-device"] == b"5632"
    assert f"{fe}/protocol" not in ops  # not a PV guest
    keys = [op.path.rsplit("/", 1)[1] for op in attach_ops(3, 0, spec.devid, spec) if op.path.startswith(be + "/")]
    assert keys.index("direct-io-safe") == keys.index("device-type") + 1


def test_script_and_params() -> None:
    spec = parse_disk_spec("nbd:host:1234,xvdb,w")
    assert params_value(spec) == "host:1234"
    assert script_value(spec) == "/etc/xen/scripts/block-nbd"
    assert script_value(parse_disk_spec("/x,,xvdb,script=/opt/s")) == "/opt/s"
    assert script_value(parse_disk_spec("/x,,xvdb"), "/tmp/scripts/") == "/tmp/scripts/block"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/x.qcow2,qcow2,xvdb", "qdisk"),
        ("/x,,xvdb,backendtype=qdisk", "only phy"),
        ("/x,,xvdb,specification=virtio", "only xen"),
        (",hdc:cdrom,r", "target is required"),
        ("/x,,xvdb,colo", "COLO"),
    ],
)
def test_unsupported(text: str, reason: str) -> None:
    got = unsupported_reason(parse_disk_spec(text))
    assert got is not None and reason in got
    assert unsupported_reason(parse_disk_spec("/x,,xvdb,backendtype=phy")) is None


def test_closing() -> None:
    p = device_paths(1, 0, 51712)
    assert closing_ops(p, 4) == [XsOp("write", f"{BE}/online", b"0"), XsOp("write", f"{BE}/state", b"5")]
    assert closing_ops(p, 6) == [XsOp("write", f"{BE}/online", b"0")]


def test_paths_and_names() -> None:
    assert device_paths(1, 0, 51712) == DevicePaths(1, 0, 51712, FE, BE, LX)
    assert xbdback_name(3, 769) == "xbdback3i769"
    assert parse_xbdback_name("xbdback3i769") == (3, 769)
    for bad in ("xbdback3i", "xbdback03i769", "xbdbacki769", "xbdback3i769x", "x"):
        assert parse_xbdback_name(bad) is None


def test_cleanup_stops_at_domain_directories() -> None:
    stops = ("/", "/local", "/local/domain", "/local/domain/0", "/libxl", "/libxl/1", "/libxl/1/device")
    for stop in stops:
        assert cleanup_parents_stop(stop)
    for go in ("/local/domain/0/backend", "/local/domain/1/device", "/libxl/1/device/vbd"):
        assert not cleanup_parents_stop(go)


def test_domain_creation() -> None:
    """libxl 4.17's libxl__domain_make for a PV guest, node for node."""
    ops = domain_creation_ops(7, "web")
    home, vm = "/local/domain/7", f"/vm/{vm_uuid(7)}"
    made = [(op.op, op.path, op.value, op.perms) for op in ops]
    assert made[:8] == [
        ("mkdir", home, b"", ()), ("set_perms", home, b"", ("n0", "r7")),
        ("mkdir", vm, b"", ()), ("set_perms", vm, b"", ("n0", "r7")),
        ("mkdir", "/libxl/7", b"", ()), ("mkdir", "/libxl/7/device", b"", ()),
        ("write", f"{home}/vm", vm.encode(), ()), ("write", f"{home}/name", b"web", ()),
    ]
    read_only = [p for o, p, _, perms in made if o == "set_perms" and perms == ("n0", "r7")]
    assert read_only == [home, vm] + [f"{home}/{d}" for d in ("cpu", "memory", "device", "control")]
    guest_owned = [p for o, p, _, perms in made if o == "set_perms" and perms == ("n7",)]
    assert guest_owned == [f"{home}/{n}" for n in GUEST_WRITABLE]
    assert {"data", "drivers", "feature", "attr", "error", "control/shutdown"} <= set(GUEST_WRITABLE)
    assert made[-6:] == [
        ("write", f"{vm}/uuid", vm_uuid(7).encode(), ()), ("write", f"{vm}/name", b"web", ()),
        ("write", f"{home}/control/platform-feature-multiprocessor-suspend", b"1", ()),
        ("write", f"{home}/control/platform-feature-xs_reset_watches", b"1", ()),
        ("write", "/libxl/7/type", b"pv", ()), ("write", f"{home}/domid", b"7", ()),
    ]


def test_states() -> None:
    assert [state_name(s) for s in XenbusState] == [
        "Unknown", "Initialising", "InitWait", "Initialised", "Connected",
        "Closing", "Closed", "Reconfiguring", "Reconfigured",
    ]
    assert state_name(None) == state_name(42) == "Unknown"
    assert parse_state(b"4") == 4 and parse_state(b"") is None and parse_state(None) is None
    assert parse_state("x") is None
