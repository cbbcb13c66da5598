"""xl-disk-configuration(5) parsing: the man page's equivalences, defaults, errors."""

from __future__ import annotations

import pytest

from kvpfs.vbd.diskspec import DiskSpec, DiskSpecError, parse_disk_spec


def key(spec: DiskSpec) -> tuple[object, ...]:
    return (spec.target, spec.format, spec.vdev, spec.readwrite, spec.devtype)


@pytest.mark.parametrize(
    "text",
    [
        "/dev/vg/guest-volume,,hda",
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
    ],
)
def test_man_page_first_group(text: str) -> None:
    assert key(parse_disk_spec(text)) == ("/dev/vg/guest-volume", "raw", "hda", True, "disk")


@pytest.mark.parametrize(
    "text",
    [
        "/root/image.iso,,hdc,cdrom",
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
    ],
)
def test_man_page_cdrom_group(text: str) -> None:
    spec = parse_disk_spec(text)
    assert key(spec) == ("/root/image.iso", "raw", "hdc", False, "cdrom")
    assert spec.is_cdrom


def test_brief_example() -> None:
    spec = parse_disk_spec("format=raw, vdev=xvdb, access=rw, target=/srv/disk.img")
    assert key(spec) == ("/srv/disk.img", "raw", "xvdb", True, "disk")
    assert spec.devid == 51728


def test_reference_example() -> None:
    spec = parse_disk_spec("phy:/dev/loop0,xvda,w")
    assert key(spec) == ("/dev/loop0", "raw", "xvda", True, "disk")
    assert spec.deprecated and spec.devid == 51712


def test_target_consumes_the_rest() -> None:
    spec = parse_disk_spec("vdev=xvdc, target=/srv/a,b c ")
    assert spec.target == "/srv/a,b c "
    # Allowed after an empty positional target.
    assert parse_disk_spec(",raw,xvdc,target=/x,y").target == "/x,y"


def test_named_slots_are_skipped_by_positionals() -> None:
    spec = parse_disk_spec("format=raw,/srv/x.img,xvdd")
    assert (spec.target, spec.vdev) == ("/srv/x.img", "xvdd")
    spec = parse_disk_spec("vdev=xvde,/srv/x.img,,ro")
    assert (spec.target, spec.vdev, spec.readwrite) == ("/srv/x.img", "xvde", False)


def test_defaults() -> None:
    spec = parse_disk_spec("/srv/x.img,,xvdb")
    assert spec.readwrite and spec.trusted and spec.specification == "xen"
    assert spec.discard is None and spec.discard_enable
    assert not spec.direct_io_safe and spec.backend is None and spec.script is None
    ro = parse_disk_spec("/srv/x.img,,xvdb,r")
    assert not ro.discard_enable  # libxl: discard defaults to on for rw disks only
    cd = parse_disk_spec("/srv/x.iso,,hdc,cdrom")
    assert not cd.readwrite


def test_flags_and_keys() -> None:
    spec = parse_disk_spec(
        "/srv/x.img,raw,xvdb,rw,direct-io-safe,no-discard,untrusted,backend=Domain-0,"
        "backendtype=phy,script=block-foo,specification=xen"
    )
    assert spec.direct_io_safe and spec.discard is False and not spec.trusted
    assert (spec.backend, spec.backendtype, spec.script) == ("Domain-0", "phy", "block-foo")


def test_deprecated_prefixes() -> None:
    assert parse_disk_spec("tap:aio:/srv/x.img,xvdb,w").target == "/srv/x.img"
    assert parse_disk_spec("file:/srv/x.img,xvdb,w").target == "/srv/x.img"
    spec = parse_disk_spec("nbd:host:1234,xvdb,w")
    assert (spec.script, spec.target) == ("block-nbd", "host:1234")
    spec = parse_disk_spec("qcow2:/srv/x.qcow2,xvdb,w")
    assert (spec.format, spec.vdev) == ("qcow2", "xvdb")
    # The empty cdrom of xend's syntax.
    spec = parse_disk_spec(",hdc:cdrom,r")
    assert (spec.target, spec.vdev, spec.devtype, spec.readwrite) == (None, "hdc", "cdrom", False)


def test_whitespace_before_parameters() -> None:
    assert key(parse_disk_spec("  /srv/x.img,\traw,  xvdb,  rw")) == (
        "/srv/x.img", "raw", "xvdb", True, "disk",
    )


def test_number_vdev() -> None:
    assert parse_disk_spec("/srv/x.img,,0xca10").devid == 51728


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "vdev is mandatory"),
        ("/srv/x.img", "vdev is mandatory"),
        ("/srv/x.img,raw,,rw", "vdev is mandatory"),
        ("/srv/x.img,raw,xvdb,rw,extra", "too many positional"),
        ("/srv/x.img,raw,xvdb,rw,format=raw", "format specified twice"),
        ("/srv/x.img,,xvdb,vdev=xvdc", "vdev specified twice"),
        ("/srv/x.img,,xvdb,discard,no-discard", "discard specified twice"),
        ("/srv/x.img,,xvdb,cdrom,devtype=cdrom", "devtype specified twice"),
        ("/srv/x.img,vmdk,xvdb", "format 'vmdk'"),
        ("/srv/x.img,,xvdb,rx", "access 'rx'"),
        ("/srv/x.img,,xvdb,devtype=floppy", "devtype 'floppy'"),
        ("/srv/x.img,,xvdb,backendtype=tap", "backendtype 'tap'"),
        ("/srv/x.img,,xvdb,specification=scsi", "specification 'scsi'"),
        ("/srv/x.img,,xvdb,colour=blue", "unknown parameter 'colour'"),
        ("/srv/x.img,,xvda0", "vdev:"),
        ("/srv/x.img,,nvme0", "vdev:"),
        ("foo:/srv/x.img,xvdb,w", "unknown deprecated disk prefix"),
        ("raw:/srv/x,hdc:floppy,r", "unknown deprecated device type"),
        ("/srv/x.img,,xvdb,target=/y", "target specified twice"),
        ("/srv/x\nimg,,xvdb", "one line"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(DiskSpecError, match=message):
        parse_disk_spec(text)
