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
from collections.abc import Sequence

from kvpfs import __version__
from kvpfs.config import MountConfig, parse_mount_options
from kvpfs.errors import UsageError

log = logging.getLogger("kvpfs")

MOUNT_OPTIONS_HELP = """\
mount options (-o, comma-separated):
  ro                 mount read-only (every write: EROFS)
  raw                files are values byte for byte (default: value + one newline)
  allow_other        let other users in (the kernel still checks the mode bits)
  kvp_writable=all   make every KVP pool writable (default: only guest and
                     auto_internal; CI uses this to play the host)
  kvp_limits=format  allow the pool format's own 511/2047 bytes in the guest pool
                     (default "host": what reaches the host intact, 254/1022
                     UTF-16 units and valid UTF-8)
  uid=N,gid=N        owner shown for every file (default: the mounting user)
  attr_timeout=S     seconds the kernel may cache attributes (default 1)
  timeout=S          seconds before a store that does not answer gives EIO (default 30)
  vbd_timeout=S      how long vbd attach/detach wait for the backend (default 10)
"""


def _mount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpfs",
        description="Mount Hyper-V KVP pools (and XenStore) as files.",
        epilog=MOUNT_OPTIONS_HELP
        + "\nother commands:\n  kvpfs xenstored --socket PATH   run the embedded xenstored\n"
        "  kvpfs unmount MOUNTPOINT         unmount (lazily if busy)\n"
        "  kvpfs hostsim -- COMMAND         run COMMAND beside a simulated Hyper-V host\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true", help="debug log; implies -f")
    p.add_argument("--kvp-dir", metavar="DIR", help="directory of the .kvp_pool_N files")
    p.add_argument(
        "--xenstore",
        metavar="PATH|auto|off",
        default="auto",
        help="xenstored socket or xenbus device for xenstore/ and vbd/; 'auto' (default): "
        "the one libxenstore would use, else an embedded xenstored; 'off': KVP only",
    )
    p.add_argument("--log", dest="log_file", metavar="FILE", help="log here once in background")
    p.add_argument("--version", action="version", version=f"kvpfs {__version__}")
    return p


def parse_mount_args(argv: Sequence[str]) -> MountConfig:
    args = _mount_parser().parse_args(argv)
    config = MountConfig(
        mountpoint=args.mountpoint,
        foreground=args.foreground or args.debug,
        debug=args.debug,
        kvp_dir=args.kvp_dir,
        log_file=args.log_file,
        xenstore=args.xenstore,
    )
    for text in args.options:
        parse_mount_options(config, text)
    return config


def preflight(config: MountConfig) -> None:
    """The checks that deserve a clear one-line error before anything is mounted."""
    from kvpfs.fs.mount import mounted_at

    mnt = config.mountpoint
    if not os.path.lexists(mnt):
        raise UsageError(f"mountpoint {mnt} does not exist")
    if mounted_at(mnt):
        raise UsageError(f"mountpoint {mnt} is busy: something is already mounted there")
    try:
        st = os.stat(mnt)
    except OSError as exc:
        raise UsageError(f"mountpoint {mnt} is not usable: {exc.strerror}") from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mnt} is not a directory")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        hint = " (load the fuse module; in a container pass --device /dev/fuse)"
        raise UsageError(f"cannot open /dev/fuse: {exc.strerror}{hint}") from None
    os.close(fd)


def _setup_logging(config: MountConfig) -> None:
    level = logging.DEBUG if config.debug else logging.WARNING
    logging.basicConfig(level=level, format="kvpfs: %(levelname)s %(name)s: %(message)s")


def run_mount(config: MountConfig) -> int:
    preflight(config)
    if config.foreground:
        _setup_logging(config)
        return _serve(config, ready_fd=None)
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
    _setup_logging(config)
    try:
        status = _serve(config, ready_fd=write_fd)
    except UsageError as exc:
        os.write(write_fd, str(exc).encode())
        status = exc.status
    except BaseException as exc:  # the parent must hear why, whatever it was
        os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
        status = 1
    os._exit(status)


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_file else null
    os.dup2(target, 1)
    os.dup2(target, 2)


def _serve(config: MountConfig, ready_fd: int | None) -> int:
    import trio

    from kvpfs.compose import plan_mount, serve_mount

    plan = plan_mount(config)
    announcements = plan.describe()

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
                _detach_stdio(config.log_file)

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        usage = group.subgroup(UsageError)
        if usage is not None:
            raise usage.exceptions[0] from None
        raise
    return 0


def run_unmount(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="kvpfs unmount")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    from kvpfs.fs.mount import force_unmount, mounted_at

    if not mounted_at(args.mountpoint):
        raise UsageError(f"{args.mountpoint} is not mounted")
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


def run_xenstored(argv: Sequence[str]) -> int:
    """``kvpfs xenstored --socket PATH``: the embedded xenstored in the foreground."""
    p = argparse.ArgumentParser(
        prog="kvpfs xenstored",
        description="Run kvpfs's embedded xenstored (cxenstored 4.17 compatible) until "
        "SIGINT/SIGTERM. Prints XENSTORED_PATH=... for the xenstore-* clients.",
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
    args = p.parse_args(argv)
    import signal

    import trio

    from kvpfs.peers.xenstored.server import serve_xenstored

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(
                        serve_xenstored,
                        args.socket,
                        dict(args.domain_socket),
                        initial=args.initial,
                        print_path=True,
                    )
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as exc:
        raise UsageError(f"cannot serve on {args.socket}: {exc.strerror or exc}") from None
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
