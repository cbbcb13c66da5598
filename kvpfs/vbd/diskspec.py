"""The xl disk specification (xl-disk-configuration(5)), parsed without I/O.

A spec is a comma-separated list of ``key=value`` pairs, flags and positional
parameters.  Positional parameters fill the slots ``target``, ``format``, ``vdev``,
``access`` that are still unspecified, in that order; ``target=`` consumes the rest
of the string, commas included.  Every parameter may be given once; an empty value
means the default.  The deprecated forms are accepted too: format and script
prefixes on the target (``raw:``, ``qcow2:``, ``vhd:``, ``nbd:``, ...), ignored
prefixes (``phy:``, ``file:``, ``tap:aio:``, ...), after which the positional
order is ``target, vdev[:devtype], access``, and ``,hdc:cdrom,r`` for an empty cdrom.

Examples that all mean the same::

    /dev/vg/guest-volume,,hda
    /dev/vg/guest-volume,raw,hda,rw
    format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume
    raw:/dev/vg/guest-volume,hda,w
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvpfs.vbd import vdev as vdev_codec

__all__ = ["FORMATS", "DiskSpec", "DiskSpecError", "parse_disk_spec"]

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
BACKEND_TYPES = ("phy", "qdisk", "standalone")
SPECIFICATIONS = ("xen", "virtio")
COLO_KEYS = ("colo-host", "colo-port", "colo-export", "active-disk", "hidden-disk")
_KEYS = frozenset(
    {"format", "vdev", "access", "devtype", "backend", "backendtype", "script", "specification"}
    | set(COLO_KEYS)
)
#: Bare keywords and the parameter each one sets.
_FLAGS = {
    "cdrom": ("devtype", "cdrom"),
    "direct-io-safe": ("direct-io-safe", "1"),
    "discard": ("discard", "1"),
    "no-discard": ("discard", "0"),
    "trusted": ("trusted", "1"),
    "untrusted": ("trusted", "0"),
    "colo": ("colo", "1"),
}
_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_IGNORED_PREFIXES = ("tapdisk", "tap2", "tap", "aio", "ioemu", "file", "phy")
_PREFIX = re.compile(r"([a-z][a-z0-9]*):")
_WHITESPACE = " \t"


class DiskSpecError(ValueError):
    """The spec does not parse; the message says which parameter and why."""


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A parsed spec, with the defaults of the man page applied."""

    vdev: str
    target: str | None = None
    format: str = "raw"
    readwrite: bool = True
    devtype: str = "disk"
    #: View domain as written (a name or a number); None is domain 0.
    backend: str | None = None
    backendtype: str | None = None
    script: str | None = None
    direct_io_safe: bool = False
    #: None: the toolstack's default (on for read-write disks).
    discard: bool | None = None
    trusted: bool = True
    specification: str = "xen"
    colo: bool = False
    colo_params: tuple[tuple[str, str], ...] = ()
    #: A deprecated prefix or positional form was used (for a log line).
    deprecated: bool = False
    devid: int = field(init=False)

    def __post_init__(self) -> None:
        try:
            devid = vdev_codec.encode(self.vdev)
        except vdev_codec.VdevError as exc:
            raise DiskSpecError(f"vdev: {exc}") from None
        object.__setattr__(self, "devid", devid)

    @property
    def is_cdrom(self) -> bool:
        return self.devtype == "cdrom"

    @property
    def discard_enable(self) -> bool:
        # libxl's default: discard for read-write disks only.
        return self.readwrite if self.discard is None else self.discard


class _Parser:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.specified: set[str] = set()
        self.had_prefix = False
        self.deprecated = False

    def set(self, key: str, value: str) -> None:
        if key in self.specified:
            raise DiskSpecError(f"{key} specified twice")
        self.specified.add(key)
        if value != "":
            self.values[key] = value

    def named(self, item: str) -> None:
        key, _, value = item.partition("=")
        if key not in _KEYS:
            raise DiskSpecError(f"unknown parameter {key!r}")
        self.set(key, value)

    def positional(self, value: str) -> None:
        if "target" not in self.specified:
            self.set("target", self.strip_prefixes(value))
        elif "format" not in self.specified and not self.had_prefix and ":" not in value:
            self.set("format", value)
        elif "vdev" not in self.specified:
            # The deprecated ``vdev:devtype`` form (``hdc:cdrom``): the old syntax
            # has no format slot, so the next positional is the access.
            name, colon, kind = value.rpartition(":")
            if colon:
                self.deprecated = self.had_prefix = True
                if kind == "cdrom":
                    self.set("devtype", "cdrom")
                elif kind != "disk":
                    raise DiskSpecError(f"unknown deprecated device type {kind!r}")
                value = name
            self.set("vdev", value)
        elif "access" not in self.specified:
            self.set("access", value)
        else:
            raise DiskSpecError(f"too many positional parameters at {value!r}")

    def strip_prefixes(self, value: str) -> str:
        while (m := _PREFIX.match(value)) is not None:
            word, rest = m.group(1), value[m.end() :]
            if word in _FORMAT_PREFIXES:
                self.set("format", word)
            elif word in _SCRIPT_PREFIXES:
                self.set("script", f"block-{word}")
            elif word not in _IGNORED_PREFIXES:
                if not rest or not rest[0].isalnum() or re.match(r"[a-z0-9]*:", rest):
                    raise DiskSpecError(f"unknown deprecated disk prefix {word + ':'!r}")
                return value
            self.had_prefix = self.deprecated = True
            value = rest
        return value


def _items(text: str) -> list[tuple[str, bool]]:
    """(item, is_target_rest) in order; leading whitespace of each item dropped."""
    out: list[tuple[str, bool]] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _WHITESPACE:
            pos += 1
        if text.startswith("target=", pos):
            out.append((text[pos + len("target=") :], True))
            return out
        comma = text.find(",", pos)
        if comma < 0:
            if pos < end:
                out.append((text[pos:], False))
            return out
        out.append((text[pos:comma], False))
        pos = comma + 1


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse one DISKSPEC; :class:`DiskSpecError` says what is wrong."""
    if "\0" in text or "\n" in text:
        raise DiskSpecError("a disk spec is one line of text")
    p = _Parser()
    for item, is_target in _items(text):
        if is_target:
            # Allowed even after an empty positional target (the man page says so).
            if p.values.get("target"):
                raise DiskSpecError("target specified twice")
            p.specified.discard("target")
            p.set("target", item)
        elif "=" in item:
            p.named(item)
        elif item in _FLAGS:
            key, value = _FLAGS[item]
            p.set(key, value)
        else:
            p.positional(item)
    v = p.values
    if "vdev" not in v:
        raise DiskSpecError("vdev is mandatory")
    fmt = v.get("format", "raw")
    if fmt not in FORMATS:
        raise DiskSpecError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    devtype = v.get("devtype", "disk")
    if devtype not in ("disk", "cdrom"):
        raise DiskSpecError(f"devtype {devtype!r} is not cdrom")
    access = v.get("access")
    if access is None:
        readwrite = devtype != "cdrom"
    elif access in ("rw", "w"):
        readwrite = True
    elif access in ("ro", "r"):
        readwrite = False
    else:
        raise DiskSpecError(f"access {access!r} is not one of ro, r, rw, w")
    backendtype = v.get("backendtype")
    if backendtype is not None and backendtype not in BACKEND_TYPES:
        raise DiskSpecError(f"backendtype {backendtype!r} is not one of {', '.join(BACKEND_TYPES)}")
    specification = v.get("specification", "xen")
    if specification not in SPECIFICATIONS:
        raise DiskSpecError(f"specification {specification!r} is not xen or virtio")
    discard = v.get("discard")
    return DiskSpec(
        vdev=v["vdev"],
        target=v.get("target"),
        format=fmt,
        readwrite=readwrite,
        devtype=devtype,
        backend=v.get("backend"),
        backendtype=backendtype,
        script=v.get("script"),
        direct_io_safe="direct-io-safe" in v,
        discard=None if discard is None else discard == "1",
        trusted=v.get("trusted", "1") == "1",
        specification=specification,
        colo="colo" in v,
        colo_params=tuple((k, v[k]) for k in COLO_KEYS if k in v),
        deprecated=p.deprecated,
    )
