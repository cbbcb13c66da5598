"""Command line: ``kvpfs MOUNTPOINT [-o opt,...] [-f] [-d] [--kvp-dir DIR]``.

Like sshfs, the command returns only once the mount is ready and then keeps
serving in the background (``-f`` stays in the foreground), so that
``kvpfs /mnt/x && ls /mnt/x`` works in a script.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from kvpfs import __version__
from kvpfs.config import MountConfig, parse_mount_options, parse_source
from kvpfs.errors import UsageError, one_line

if TYPE_CHECKING:
    from kvpfs.xenstore.lsformat import DumpedNode

log = logging.getLogger("kvpfs")

MOUNT_OPTIONS_HELP = """\
mount options (-o, comma-separated):
  ro, rw             mount read-only (every write: EROFS) or read-write (default)
  raw                files are values byte for byte (default: value + one newline)
  allow_other        let other users in (the kernel still checks the mode bits)
  kvp_dir=DIR        the same as --kvp-dir DIR
  xenstore=WHERE     the same as --xenstore WHERE
  log=FILE           the same as --log FILE
  kvp_writable=all   make every KVP pool writable (default: only guest and
                     auto_internal; CI uses this to play the host)
  kvp_limits=format  allow the pool format's own 511/2047 bytes in the guest pool
                     (default "host": what reaches the host intact, 254/1022
                     UTF-16 units and valid UTF-8)
  uid=N,gid=N        owner shown for every file (default: the mounting user)
  attr_timeout=S     seconds the kernel may cache attributes (default 1; 0 or more)
  timeout=S          seconds before a store that does not answer gives EIO
                     (default 30; more than 0)
  vbd_timeout=S      how long vbd attach/detach wait for the backend (default 10)
  fsname=NAME        the mount's source as findmnt shows it
  dev, nodev, suid, nosuid, exec, noexec, noatime, sync, allow_root, auto_unmount
                     passed to FUSE and the kernel as they are
  _netdev, nofail, noauto, user, users, defaults, x-systemd.*, ...
                     mount(8) and fstab options: accepted and ignored
"""

OTHER_COMMANDS_HELP = """
sources (an fstab line's first field):
  auto, kvpfs        the host's pools and xenstored where it has them, else
                     embedded ones (the default)
  embedded           kvpfs's own pools and xenstored, whatever the host has
  host, real         only the host's: an error where it has none

other commands:
  kvpfs unmount MOUNTPOINT         unmount a kvpfs mount (lazily if busy)
  kvpfs xenstored --socket PATH    run the embedded xenstored
  kvpfs hostsim -- COMMAND         run COMMAND beside a simulated Hyper-V host
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line: ``kvpfs: <what>``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", 2)


def version_text() -> str:
    """kvpfs and the versions of what it runs on."""
    import ctypes
    import importlib.metadata

    versions = [f"kvpfs {__version__}"]
    for dist in ("pyfuse3", "trio"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    try:
        fuse_pkgversion = ctypes.CDLL("libfuse3.so.3").fuse_pkgversion
        fuse_pkgversion.restype = ctypes.c_char_p
        versions.append(f"libfuse {fuse_pkgversion().decode()}")
    except (OSError, AttributeError):
        versions.append("libfuse (not found)")
    return ", ".join(versions)


class _Version(argparse.Action):
    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        print(version_text())
        sys.exit(0)


def mount_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvpfs",
        usage="kvpfs [SOURCE] MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d] [-v] [--kvp-dir DIR] "
        "[--xenstore PATH|auto|off] [--log FILE]",
        description="Mount Hyper-V KVP pools and XenStore as files. Returns once the "
        "mount is ready and serves in the background (-f: in the foreground).",
        epilog=MOUNT_OPTIONS_HELP + OTHER_COMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("first", metavar="SOURCE", help="auto (default), embedded or host")
    p.add_argument("second", metavar="MOUNTPOINT", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
        help="mount options (below); may be given more than once",
    )
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true", help="debug log; implies -f")
    p.add_argument(
        "-v", dest="verbose", action="store_true",
        help="log what the mount does (to --log FILE, else syslog, in the background)",
    )
    p.add_argument("--kvp-dir", metavar="DIR", help="directory of the .kvp_pool_N files")
    p.add_argument(
        "--xenstore",
        metavar="PATH|auto|off",
        help="xenstored socket or xenbus device for xenstore/ and vbd/; 'auto' (default): "
        "the host's, else an embedded xenstored of this mount's own; 'off': KVP only",
    )
    p.add_argument("--log", dest="log_file", metavar="FILE", help="append the log here")
    p.add_argument("-V", "--version", action=_Version, nargs=0, help="show versions and exit")
    return p


def parse_mount_args(argv: Sequence[str]) -> MountConfig:
    args = mount_parser().parse_args(argv)
    # ``kvpfs MOUNTPOINT`` or, as mount.fuse3 and sshfs have it, ``kvpfs SOURCE MOUNTPOINT``.
    if args.second is None:
        source, mountpoint = "auto", args.first
    else:
        source, mountpoint = parse_source(args.first), args.second
    config = MountConfig(
        mountpoint=mountpoint,
        source=source,
        foreground=args.foreground or args.debug,
        debug=args.debug,
        verbose=args.verbose,
    )
    for text in args.options:
        parse_mount_options(config, text)
    # Flags win over -o, whatever their order.
    config.kvp_dir = args.kvp_dir or config.kvp_dir
    config.xenstore = args.xenstore or config.xenstore
    config.log_file = args.log_file or config.log_file
    return config


def _fuse_conf_allows_other(path: str = "/etc/fuse.conf") -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def preflight(config: MountConfig) -> None:
    """The checks that deserve a clear one-line error before anything is mounted."""
    import errno
    import stat

    from kvpfs.fs.mount import mounted_at

    mnt = config.mountpoint
    try:
        st = os.stat(mnt)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"mountpoint {mnt} is a dead mount (not connected): run `kvpfs unmount {mnt}`"
            ) from None
        if exc.errno == errno.ENOENT:
            raise UsageError(f"mountpoint {mnt} does not exist") from None
        raise UsageError(f"mountpoint {mnt} is not usable: {exc.strerror}") from None
    if mounted_at(mnt):
        raise UsageError(f"mountpoint {mnt} is busy: something is already mounted there")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mnt} is not a directory")
    wants_other = config.allow_other or "allow_root" in config.fuse_extra
    if wants_other and os.getuid() != 0 and not _fuse_conf_allows_other():
        raise UsageError(
            "allow_other and allow_root need 'user_allow_other' in /etc/fuse.conf "
            "when not mounting as root"
        )
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        hint = " (load the fuse module; in a container pass --device /dev/fuse)"
        raise UsageError(f"cannot open /dev/fuse: {exc.strerror}{hint}") from None
    os.close(fd)


def _open_log(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise UsageError(f"cannot open log file {path}: {exc.strerror}") from None


def _setup_logging(config: MountConfig, log_fd: int | None, *, background: bool) -> None:
    """-d: debug, -v: info, else warnings; to stderr in the foreground, to the log
    file if there is one, else (in the background) to syslog."""
    import logging.handlers

    level = logging.DEBUG if config.debug else logging.INFO if config.verbose else logging.WARNING
    root = logging.getLogger()
    root.setLevel(level)
    form = logging.Formatter("kvpfs: %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if not background:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_fd is not None:
        stream = os.fdopen(os.dup(log_fd), "a", buffering=1, encoding="utf-8", errors="replace")
        stamped = logging.Formatter(
            "%(asctime)s kvpfs[%(process)d] %(levelname)s %(name)s: %(message)s"
        )
        file_handler = logging.StreamHandler(stream)
        file_handler.setFormatter(stamped)
        handlers.append(file_handler)
    elif background and os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
        except OSError:
            pass
        else:
            syslog.setFormatter(logging.Formatter("kvpfs[%(process)d]: %(name)s: %(message)s"))
            handlers.append(syslog)
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(form)
        root.addHandler(handler)


def run_mount(config: MountConfig) -> int:
    preflight(config)
    log_fd = _open_log(config.log_file)
    if config.foreground:
        _setup_logging(config, log_fd, background=False)
        return _serve(config, ready_fd=None, log_fd=log_fd)
    # Fork before trio or pyfuse3 start any thread; the parent waits until the
    # child reports the mount ready (or why it failed) and exits with that.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        os.close(read_fd)
        report = b"".join(chunks).decode(errors="replace")
        if report.startswith("ready"):
            for line in report.splitlines()[1:]:
                print(f"kvpfs: {line}", file=sys.stderr)
            # A normal interpreter exit would touch (and so copy) pages shared
            # with the child: ~60 ms for nothing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        message = report.strip() or f"the mount process exited with status {status >> 8}"
        print(f"kvpfs: {message}", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    _setup_logging(config, log_fd, background=True)
    try:
        status = _serve(config, ready_fd=write_fd, log_fd=log_fd)
    except UsageError as exc:
        os.write(write_fd, str(exc).encode())
        status = exc.status
    except BaseException as exc:  # the parent must hear why, whatever it was
        os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
        status = 1
    os._exit(status)


def _detach_stdio(log_fd: int | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    # Whatever still reaches stdout or stderr (a fault handler, a stray print)
    # lands in the log file rather than on a terminal the mount left long ago.
    target = log_fd if log_fd is not None else null
    os.dup2(target, 1)
    os.dup2(target, 2)


def _run_trio(main: Callable[[], Awaitable[None]], context: str = "") -> None:
    """``trio.run(main)``; a failure the user can act on becomes one line
    (:func:`kvpfs.errors.one_line`), anything else keeps its traceback."""
    import trio

    try:
        trio.run(main)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        message = one_line(exc)
        if message is None:
            raise
        log.debug("failed", exc_info=True)
        raise UsageError(context + message) from None


def _serve(config: MountConfig, ready_fd: int | None, log_fd: int | None) -> int:
    import trio

    from kvpfs.compose import plan_mount, serve_mount

    plan = plan_mount(config)
    announcements = plan.describe()
    for line in announcements:
        log.info("%s", line)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_mount, handle_signals=True), config, plan)
            log.info("mounted on %s", config.mountpoint)
            if ready_fd is None:
                for line in announcements:
                    print(f"kvpfs: {line}", file=sys.stderr, flush=True)
            else:
                os.write(ready_fd, "\n".join(["ready", *announcements]).encode())
                os.close(ready_fd)
                _detach_stdio(log_fd)

    _run_trio(main)
    return 0


def run_unmount(argv: Sequence[str]) -> int:
    p = _Parser(prog="kvpfs unmount", description="Unmount a kvpfs mount (lazily if busy).")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    from kvpfs.fs.mount import FSTYPE, force_unmount, mount_type

    fstype = mount_type(args.mountpoint)
    if fstype is None:
        raise UsageError(f"{args.mountpoint} is not mounted")
    if fstype != FSTYPE:
        # Never detach what kvpfs did not mount, busy or not.
        raise UsageError(f"{args.mountpoint} is not a kvpfs mount ({fstype}); nothing unmounted")
    import subprocess

    done = subprocess.run(["fusermount3", "-u", args.mountpoint], check=False, capture_output=True)
    if done.returncode == 0:
        return 0
    # Busy (an open file, a shell inside): detach it lazily, as umount -l does.
    if force_unmount(args.mountpoint):
        return 0
    raise UsageError(f"cannot unmount {args.mountpoint}: {done.stderr.decode().strip()}")


def _domain_socket(text: str) -> tuple[int, str]:
    domid, sep, path = text.partition(":")
    if not sep or not domid.isdigit() or not path or not 0 < int(domid) < 0x7FF0:
        raise argparse.ArgumentTypeError(f"expected DOMID:PATH with a guest domid, got {text!r}")
    return int(domid), path


def _domain(text: str) -> tuple[int, str]:
    domid, sep, name = text.partition(":")
    if not sep or not domid.isdigit() or not name or not 0 < int(domid) < 0x7FF0:
        raise argparse.ArgumentTypeError(f"expected ID:NAME with a guest domid, got {text!r}")
    return int(domid), name


def xenstored_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvpfs xenstored",
        description="Run kvpfs's embedded xenstored (cxenstored 4.17 compatible) until "
        "SIGINT/SIGTERM. Prints XENSTORED_PATH=... for the xenstore-* clients once it "
        "answers (and the tree is seeded).",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="privileged (dom0) socket")
    p.add_argument(
        "--domain-socket",
        action="append",
        default=[],
        type=_domain_socket,
        metavar="DOMID:PATH",
        help="a socket whose clients are the unprivileged guest DOMID",
    )
    p.add_argument(
        "--initial",
        choices=["xenstored", "domains"],
        default="xenstored",
        help="starting tree: as cxenstored starts, or with dom0 and guest domain 1",
    )
    p.add_argument(
        "--domain",
        action="append",
        default=[],
        type=_domain,
        metavar="ID:NAME",
        help="also introduce guest ID, laid out as domain creation leaves it (repeatable)",
    )
    p.add_argument(
        "--load",
        metavar="FILE",
        help="replace the tree with the output of 'xenstore-ls -f -p' saved in FILE "
        "('-': standard input)",
    )
    p.add_argument(
        "--dump",
        metavar="FILE",
        help="at exit, write the tree to FILE ('-': standard output) in the same format",
    )
    return p


def _read_dump(path: str) -> list[DumpedNode]:
    from kvpfs.xenstore.lsformat import DumpError, parse_dump

    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("latin-1")
        else:
            with open(path, "rb") as f:
                text = f.read().decode("latin-1")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_dump(text)
    except DumpError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _write_dump(path: str, nodes: list[DumpedNode]) -> None:
    from kvpfs.xenstore.lsformat import format_dump

    data = format_dump(nodes).encode("latin-1")
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def run_xenstored(argv: Sequence[str]) -> int:
    """``kvpfs xenstored --socket PATH``: the embedded xenstored in the foreground."""
    args = xenstored_parser().parse_args(argv)
    seed = _read_dump(args.load) if args.load else None
    import signal

    import trio

    from kvpfs.peers.xenstored.server import serve_xenstored
    from kvpfs.vbd.toolstack import create_domain
    from kvpfs.xenstore.client import XenStoreClient
    from kvpfs.xenstore.seed import dump_tree, load_tree

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    functools.partial(
                        serve_xenstored,
                        args.socket,
                        dict(args.domain_socket),
                        initial=args.initial,
                    )
                )
                async with XenStoreClient(args.socket) as client:
                    if seed is not None:
                        await load_tree(client, seed)
                    for domid, name in args.domain:
                        await create_domain(client, domid, name)
                        # No real ring or event channel here; xenstored only
                        # requires a port above 0 (as cxenstored).
                        await client.introduce(domid, 0, 1)
                    # Only now: a script waiting for this line finds the tree seeded.
                    print(f"XENSTORED_PATH={server.socket_path}", flush=True)
                    for domid, path in server.domain_sockets.items():
                        print(f"XENSTORED_DOMAIN_PATH_{domid}={path}", flush=True)
                    async for _ in signals:
                        break
                    if args.dump:
                        _write_dump(args.dump, await dump_tree(client))
                nursery.cancel_scope.cancel()

    _run_trio(main, f"cannot serve on {args.socket}: ")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "hostsim":
        # First: unshare(CLONE_NEWNS) needs a process that has started no thread.
        from kvpfs.peers.hyperv.hostsim import run_hostsim

        return run_hostsim(args[1:])
    try:
        if args and args[0] == "unmount":
            return run_unmount(args[1:])
        if args and args[0] == "xenstored":
            return run_xenstored(args[1:])
        return run_mount(parse_mount_args(args))
    except UsageError as exc:
        print(f"kvpfs: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"kvpfs: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
