"""kvpfs(1), kvpfs-xenstored(8) and kvpfs-hostsim(8), generated from the commands'
``--help`` texts so that the pages and the commands cannot drift apart.

The options, their arguments and their descriptions come from each command's
argparse help (``format_help()``, read as text at a fixed width); what ``--help``
has no room for (the views, FILES, EXIT STATUS, DIAGNOSTICS, SEE ALSO) is written
here, once.  ``python -m kvpfs.manpages kvpfs/man`` writes the pages; the package
installs them under ``share/man`` and a test checks that they are what this module
makes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvpfs import __version__

#: Help is read at this width, so the pages do not depend on the terminal.
HELP_COLUMNS = 80

Item = tuple[str, str]


@dataclass(frozen=True)
class HelpText:
    """A command's ``--help``, in parts."""

    usage: str
    description: str
    #: (heading, items) for "positional arguments", "options" and each epilog block.
    blocks: list[tuple[str, list[Item]]]


def read_help(parser: argparse.ArgumentParser) -> HelpText:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        text = parser.format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    chunks = text.strip("\n").split("\n\n")
    usage = " ".join(chunks[0].removeprefix("usage: ").split())
    description = ""
    blocks: list[tuple[str, list[Item]]] = []
    for chunk in chunks[1:]:
        lines = chunk.split("\n")
        if not lines[0].endswith(":") or lines[0].startswith(" "):
            description += ("\n\n" if description else "") + " ".join(chunk.split())
            continue
        blocks.append((lines[0][:-1], _items(lines[1:])))
    return HelpText(usage, description, blocks)


def _items(lines: Sequence[str]) -> list[Item]:
    """``  TERM   text`` lines, a text continued on deeper-indented lines."""
    items: list[list[str]] = []
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if indent <= 2 and line.strip():
            term, _, text = line.strip().partition("  ")
            items.append([term.strip(), text.strip()])
        elif items:
            items[-1][1] = f"{items[-1][1]} {line.strip()}".strip()
    return [(term, text) for term, text in items]


def option_names(help_text: HelpText) -> set[str]:
    """Every ``-x``/``--xx`` flag the help lists."""
    names: set[str] = set()
    for heading, items in help_text.blocks:
        if heading == "options":
            for term, _ in items:
                names.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", term))
    return names


# --------------------------------------------------------------------------- roff


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = text.split("\n")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


@dataclass(frozen=True)
class Page:
    name: str
    section: int
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    #: Prose sections after OPTIONS: (heading, paragraphs or items).
    extra: list[tuple[str, list[str | Item]]] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"

    def render(self) -> str:
        help_text = read_help(self.parser())
        out = [
            f'.TH {self.name.upper()} {self.section} "" "kvpfs {__version__}" '
            f'"{"User Commands" if self.section == 1 else "System Administration"}"',
            ".SH NAME",
            f"{_roff(self.name)} \\- {_roff(self.summary)}",
            ".SH SYNOPSIS",
            f".B {_roff(help_text.usage.split(' ', 1)[0])}",
        ]
        rest = help_text.usage.split(" ", 1)
        if len(rest) > 1:
            out.append(_roff(rest[1]))
        out += [".SH DESCRIPTION", _roff(help_text.description)]
        for heading, items in help_text.blocks:
            # "mount options (-o, comma-separated)" -> MOUNT OPTIONS
            title = "OPTIONS" if heading == "options" else heading.split(" (")[0].upper()
            out.append(f'.SH "{_roff(title)}"')
            out += _items_roff(items)
        for heading, body in self.extra:
            out.append(f'.SH "{heading}"')
            for part in body:
                if isinstance(part, tuple):
                    out += _items_roff([part])
                else:
                    out += [".PP", _roff(part)]
        return "\n".join(out) + "\n"


def _items_roff(items: Sequence[Item]) -> list[str]:
    out = []
    for term, text in items:
        out += [".TP", f".B {_roff(term)}"]
        if text:
            out.append(_roff(text))
    return out


def _mount_parser() -> argparse.ArgumentParser:
    from kvpfs.cli import mount_parser

    return mount_parser()


def _xenstored_parser() -> argparse.ArgumentParser:
    from kvpfs.cli import xenstored_parser

    return xenstored_parser()


def _hostsim_parser() -> argparse.ArgumentParser:
    from kvpfs.peers.hyperv.hostsim import hostsim_parser

    return hostsim_parser()


PAGES = [
    Page(
        "kvpfs",
        1,
        "mount Hyper-V KVP pools and XenStore as files",
        _mount_parser,
        [
            ("VIEWS", [
                ("kvp/", "the guest's five KVP pools (external, guest, auto, auto_external, "
                 "auto_internal), one file per key, byte- and lock-compatible with hv_kvp_daemon"),
                ("xenstore/", "the XenStore tree: a node with children is a directory, a "
                 "childless node a file; permissions and directory values are the xattrs "
                 "user.xenstore.perms and user.xenstore.value"),
                ("vbd/", "virtual block devices as the backend domain sees them; write "
                 "'DOMID DISKSPEC' to vbd/attach to attach, rmdir vbd/xbdbackDiN to detach"),
                (".kvpfs/", "what the mount serves, one fact per file: source, kvp-dir, "
                 "kvp-source, xenstore, xenstored-path, pid, version"),
            ]),
            ("FILES", [
                ("/var/lib/hyperv/.kvp_pool_0 ... _4", "a Linux Hyper-V guest's pools"),
                ("/var/db/hyperv/pool/.kvp_pool_0 ... _4", "a FreeBSD Hyper-V guest's pools"),
                ("$XDG_STATE_HOME/kvpfs/kvp", "the embedded pools (~/.local/state/kvpfs/kvp), "
                 "kept across mounts"),
                ("$XDG_RUNTIME_DIR/kvpfs/xenstored-PID.sock",
                 "the socket of a mount's embedded xenstored, removed when the mount ends"),
                ("/etc/fuse.conf", "user_allow_other lets users other than root use allow_other"),
            ]),
            ("EXIT STATUS", [
                ("0", "the mount is ready (or, with -f, ended cleanly)"),
                ("1", "the mount failed; nothing is left mounted"),
                ("2", "a usage mistake: an unknown option or a malformed value"),
            ]),
            ("DIAGNOSTICS", [
                "Every error is one line on standard error, starting with \"kvpfs: \", "
                "printed before the command returns. For example: \"mountpoint M is busy: "
                "something is already mounted there\", \"mountpoint M is a dead mount (not "
                "connected): run `kvpfs unmount M`\", \"no xenstored at PATH: No such file or "
                "directory\", \"mount option 'timeout=0' needs a number of seconds more than "
                "0\", \"M is not a kvpfs mount (tmpfs); nothing unmounted\".",
                "On success the command says where the data comes from, e.g. \"KVP pools: "
                "/var/lib/hyperv (this Hyper-V guest's live pools: kvp/guest writes reach the "
                "host)\" and \"embedded xenstored: XENSTORED_PATH=...\". Errors of the store "
                "reach programs as errno values; the README lists them per view.",
            ]),
            ("SEE ALSO", [
                "kvpfs-xenstored(8), kvpfs-hostsim(8), hv_kvp_daemon(8), xenstore-ls(1), "
                "xl-disk-configuration(5), mount.fuse3(8), fusermount3(1), fstab(5)",
            ]),
        ],
    ),
    Page(
        "kvpfs-xenstored",
        8,
        "kvpfs's embedded xenstored, compatible with cxenstored 4.17",
        _xenstored_parser,
        [
            ("FILES", [
                ("the --socket PATH", "created when serving starts and removed at exit; a "
                 "socket that another server answers is never taken over"),
            ]),
            ("EXIT STATUS", [
                ("0", "stopped by SIGINT or SIGTERM (after writing --dump)"),
                ("1", "could not serve: \"cannot serve on PATH: Address already in use\", "
                 "or a --load file that is not xenstore-ls -f -p output (the line is named)"),
                ("2", "a usage mistake"),
            ]),
            ("SEE ALSO", ["kvpfs(1), xenstore-ls(1), xenstore-read(1), xenstored(8)"]),
        ],
    ),
    Page(
        "kvpfs-hostsim",
        8,
        "run a command beside a simulated Hyper-V host and the real hv_kvp_daemon",
        _hostsim_parser,
        [
            ("ENVIRONMENT", [
                ("KVPFS_MOUNT", "where kvpfs is mounted for COMMAND (kvp/, host/, vmbus/)"),
                ("KVPFS_POOL_DIR", "the daemon's pool directory inside the namespace"),
                ("KVPFS_DAEMON_PID", "the hv_kvp_daemon's process id"),
            ]),
            ("EXIT STATUS", [
                "COMMAND's exit status; 1 when the simulation cannot start (not root, the "
                "daemon is not installed, namespaces are not allowed), with one line saying why.",
            ]),
            ("SEE ALSO", ["kvpfs(1), hv_kvp_daemon(8)"]),
        ],
    ),
]


def write_pages(directory: str) -> list[str]:
    """Write every page as ``DIRECTORY/manN/NAME.N``; return the paths."""
    written = []
    for page in PAGES:
        sub = os.path.join(directory, f"man{page.section}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, page.filename)
        with open(path, "w", encoding="utf-8") as f:
            f.write(page.render())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m kvpfs.manpages DIRECTORY", file=sys.stderr)
        return 2
    for path in write_pages(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
