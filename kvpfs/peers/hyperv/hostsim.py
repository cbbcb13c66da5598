"""``kvpfs hostsim -- COMMAND``: a Hyper-V KVP environment on any Linux machine.

Off Hyper-V nothing plays the host, so ``hv_kvp_daemon`` has no device to open.
This command plays the host and the kernel device and runs the distribution's
unmodified daemon against them, in a private mount and network namespace:

1. ``unshare(CLONE_NEWNS | CLONE_NEWNET)``, and every mount made private, so
   that nothing below propagates out;
2. a tmpfs over the pool directory ``/var/lib/hyperv`` (where it does not exist,
   a tmpfs over ``/var/lib`` with every entry of the real one bound back, so no
   directory is ever created outside);
3. a private ``/dev``: a tmpfs with every entry of the real one bound back
   (``--rbind`` for directories such as ``pts``), an empty ``vmbus/`` and a
   ``/dev/log`` socket that collects the daemon's syslog lines;
3a. the guest's network adapters (:mod:`kvpfs.peers.hyperv.netns`): by default
   one synthetic netvsc NIC ``eth0`` (``--nic`` adds or configures more), with
   the ``/sys/class/net`` entries, scripts and ``/etc/resolv.conf`` the daemon's
   IP requests use;
4. one kvpfs mount with ``kvp/`` (the guest's pools), ``host/`` (the host's
   view, with ``host/net/<mac>/config`` for each adapter) and ``vmbus/`` (the
   emulated device), whose ``vmbus/`` is bind-mounted
   onto ``/dev/vmbus``.  One mount, because pyfuse3 serves one FUSE session per
   process and the device, the host and the two views share their state;
5. ``hv_kvp_daemon -n``, until it has registered with the device and the host
   has sent its initial items (pool 3: host name, VM name and id);
6. COMMAND, with ``KVPFS_MOUNT`` (the mount), ``KVPFS_POOL_DIR`` and
   ``KVPFS_DAEMON_PID`` in its environment; its exit status is the command's.

Teardown, also after a failure or a signal: the command is stopped (the first
SIGINT/SIGTERM/SIGHUP is passed on, a second one kills it), the device is
removed so that the daemon exits by itself (SIGTERM, then SIGKILL, if it does
not), every other process left in the namespace is stopped the same way, the
mount ends, and the mount point is removed if hostsim made it.  The namespaces,
and with them every mount and interface above, disappear when hostsim exits.  Nothing is
created outside except that mount point (an empty directory in ``$TMPDIR``, only
while hostsim runs; ``--mountpoint`` uses an existing one instead).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import trio

from kvpfs.fs.mount import Session, fuse_options, serve
from kvpfs.fs.operations import FsOptions, Operations
from kvpfs.kvp.view import KvpView
from kvpfs.peers.hyperv import mounts
from kvpfs.peers.hyperv.device import KvpDevice
from kvpfs.peers.hyperv.host import CONNECT_TIMEOUT, Adapter, KvpHost
from kvpfs.peers.hyperv.netns import (
    NetworkError,
    NicSpec,
    SyntheticNetwork,
    apply_nic_option,
    default_nics,
)
from kvpfs.peers.hyperv.view import HostView, VmbusView

log = logging.getLogger("kvpfs.hostsim")

POOL_DIR = "/var/lib/hyperv"
DEVICE_DIR = "/dev/vmbus"
DAEMON_NAME = "hv_kvp_daemon"
DAEMON_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
HOST_NAME = "kvpfs-hostsim"


class HostsimError(Exception):
    """A one-line message for the user; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- mounts (the process is single-threaded until trio starts) -----------------------------


def enter_private_namespace() -> None:
    """A mount namespace and a network namespace of our own; no mount propagates out."""
    try:
        mounts.unshare(mounts.CLONE_NEWNS | mounts.CLONE_NEWNET)
    except OSError as exc:
        raise HostsimError(
            f"mount and network namespaces are not allowed here ({exc.strerror}); "
            "in a container, run with CAP_SYS_ADMIN (e.g. docker run --privileged)"
        ) from None
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)


def prepare_filesystems() -> None:
    """The private /dev (with an empty vmbus/) and the tmpfs pool directory."""
    mounts.shadow("/dev", skip=("vmbus", "log"))
    os.mkdir(DEVICE_DIR, 0o755)
    if os.path.isdir(POOL_DIR):
        mounts.mount("tmpfs", POOL_DIR, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=755")
    else:
        # The daemon creates the directory itself, on the private tmpfs.
        mounts.shadow(os.path.dirname(POOL_DIR))


def prepare_network(nics: Sequence[NicSpec]) -> SyntheticNetwork:
    """The guest's synthetic adapters, in the private namespaces (after
    :func:`enter_private_namespace`)."""
    network = SyntheticNetwork(nics)
    try:
        network.setup()
    except (NetworkError, OSError) as exc:
        network.close()
        hint = " (--no-nics runs without adapters)" if nics else ""
        raise HostsimError(f"cannot build the synthetic network: {exc}{hint}") from None
    return network


# -- configuration -----------------------------------------------------------------------


@dataclass
class Config:
    command: list[str]
    mountpoint: str | None = None
    daemon: str = ""
    verbose: bool = False
    timeout: float = 30.0
    ready_timeout: float = 15.0
    items: dict[int, dict[str, str]] = field(default_factory=dict)
    nics: list[NicSpec] = field(default_factory=default_nics)


_POOL_NAMES = {"external": 0, "auto_external": 3}


def default_items() -> dict[int, dict[str, str]]:
    """What Hyper-V puts in pool 3 when the VM starts (names as on Hyper-V)."""
    vm = socket.gethostname()
    return {
        3: {
            "HostName": HOST_NAME,
            "PhysicalHostName": HOST_NAME.upper(),
            "PhysicalHostNameFullyQualified": f"{HOST_NAME}.invalid",
            "VirtualMachineId": str(uuid.uuid5(uuid.NAMESPACE_DNS, vm)).upper(),
            "VirtualMachineName": vm,
        }
    }


def _host_item(text: str) -> tuple[int, str, str]:
    pool_text, sep, item = text.partition(":")
    key, eq, value = item.partition("=")
    pool = _POOL_NAMES.get(pool_text)
    if pool is None and pool_text in ("0", "3"):
        pool = int(pool_text)
    if not sep or not eq or pool is None:
        raise argparse.ArgumentTypeError(
            f"expected POOL:KEY=VALUE with POOL external (0) or auto_external (3), got {text!r}"
        )
    return pool, key, value


def hostsim_parser() -> argparse.ArgumentParser:
    """The ``kvpfs hostsim`` command line (also what its manual page describes)."""
    p = argparse.ArgumentParser(
        prog="kvpfs hostsim",
        description="Run COMMAND in private mount and network namespaces where the real "
        "hv_kvp_daemon talks to a simulated Hyper-V host. kvpfs is mounted at $KVPFS_MOUNT "
        "with kvp/ (the guest's pools) and host/ (the host's view: writing "
        "host/external/KEY is a host SET, removing it a DELETE; host/net/MAC/config is an "
        "adapter's IP configuration, read with GET_IP_INFO, written with SET_IP_INFO).",
    )
    p.add_argument(
        "--mountpoint",
        metavar="DIR",
        help="mount kvpfs here (default: a new directory in $TMPDIR, removed afterwards)",
    )
    p.add_argument("--daemon", metavar="PATH", help="the hv_kvp_daemon to run")
    p.add_argument(
        "--host-item",
        action="append",
        default=[],
        type=_host_item,
        metavar="POOL:KEY=VALUE",
        help="an item the host sets when the daemon first registers "
        "(POOL: external or auto_external)",
    )
    p.add_argument(
        "--no-host-items",
        action="store_true",
        help="do not set the default pool-3 items (HostName, VirtualMachineName, ...)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="the kernel's wait for the daemon's reply (default 30)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="how long the daemon may take to register (default 15)",
    )
    p.add_argument(
        "--nic",
        action="append",
        default=[],
        metavar="NAME[,mac=MAC][,guid=GUID][,ip=ADDR/PREFIX][,gw=ADDR][,dns=ADDR][,dhcp]",
        help="add a synthetic network adapter, or configure one (the default is eth0 with "
        "192.0.2.10/24, gateway 192.0.2.1, DNS 192.0.2.53); ip=, gw= and dns= may repeat",
    )
    p.add_argument(
        "--no-nics",
        action="store_true",
        help="no default adapter (the network namespace then has only lo and the --nic ones)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what happens, with the daemon's syslog lines",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    return p


def parse_args(argv: Sequence[str]) -> Config:
    p = hostsim_parser()
    args = p.parse_args(list(argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("a COMMAND is required: kvpfs hostsim [options] -- COMMAND [ARG...]")
    items = {} if args.no_host_items else default_items()
    for pool, key, value in args.host_item:
        items.setdefault(pool, {})[key] = value
    nics = [] if args.no_nics else default_nics()
    for text in args.nic:
        try:
            nics = apply_nic_option(nics, text)
        except ValueError as exc:
            p.error(f"--nic {text}: {exc}")
    return Config(
        command=command,
        mountpoint=args.mountpoint,
        daemon=args.daemon or "",
        verbose=args.verbose,
        timeout=args.timeout,
        ready_timeout=args.ready_timeout,
        items=items,
        nics=nics,
    )


def find_daemon(explicit: str = "") -> str:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise HostsimError(f"{explicit} is not an executable hv_kvp_daemon")
        return explicit
    search = os.pathsep.join([os.environ.get("PATH", ""), *DAEMON_DIRS])
    found = shutil.which(DAEMON_NAME, path=search)
    if found is None:
        raise HostsimError(
            f"{DAEMON_NAME} is not installed (Debian and Ubuntu: apt-get install "
            "hyperv-daemons; Fedora: dnf install hypervkvpd)"
        )
    return found


def preflight(config: Config) -> None:
    if os.geteuid() != 0:
        raise HostsimError("kvpfs hostsim needs root (mount namespaces, mounts and /dev/fuse)")
    config.daemon = find_daemon(config.daemon)
    if config.nics and shutil.which("ip") is None:
        raise HostsimError(
            "the synthetic network adapters need iproute2's ip (apt-get install iproute2)"
        )
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise HostsimError(
            f"cannot open /dev/fuse: {exc.strerror} (load the fuse module; in a container "
            "pass --device /dev/fuse)"
        ) from None
    if config.mountpoint is not None and not os.path.isdir(config.mountpoint):
        raise HostsimError(f"mountpoint {config.mountpoint} is not a directory")


# -- the daemon's syslog ---------------------------------------------------------------


@dataclass
class SyslogSink:
    """A datagram socket at /dev/log: the daemon logs nowhere else."""

    echo: bool = False
    lines: list[str] = field(default_factory=list)

    async def serve(
        self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(path)
            task_status.started()
            while True:
                data = await sock.recv(8192)
                line = _syslog_text(data)
                self.lines.append(line)
                del self.lines[:-200]
                if self.echo:
                    print(f"kvpfs hostsim: syslog: {line}", file=sys.stderr, flush=True)


def _syslog_text(data: bytes) -> str:
    text = data.decode("utf-8", "replace").rstrip("\n\0")
    # "<PRI>Mmm dd hh:mm:ss TAG: message": keep "TAG: message".
    if text.startswith("<") and ">" in text:
        text = text.split(">", 1)[1]
        if len(text) > 16 and text[3] == " " and text[15] == " ":
            text = text[16:]
    return text


# -- processes -------------------------------------------------------------------------


async def _stop(process: trio.Process, name: str, *, grace: float = 3.0) -> None:
    """End ``process``: wait ``grace`` seconds, then SIGTERM, then SIGKILL."""
    with trio.move_on_after(grace):
        await process.wait()
        return
    if process.returncode is None:
        log.info("hostsim: stopping %s (pid %d)", name, process.pid)
        process.terminate()
        with trio.move_on_after(2.0):
            await process.wait()
            return
        process.kill()
        await process.wait()


def _namespace_of(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def namespace_processes() -> list[int]:
    """Other processes in this mount namespace (started inside it, so ours)."""
    mine = _namespace_of("self")
    own = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != own and _namespace_of(entry) == mine:
            found.append(int(entry))
    return found


async def _stop_leftovers() -> None:
    pids = await trio.to_thread.run_sync(namespace_processes)
    if not pids:
        return
    log.info("hostsim: stopping processes left in the namespace: %s", pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with trio.move_on_after(2.0):
            while pids:
                await trio.sleep(0.05)
                pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    # A zombie has no namespace link any more: it is gone for our purposes.
    return _namespace_of(pid) is not None


# -- the environment -------------------------------------------------------------------


@dataclass(eq=False)
class Environment:
    """A running simulation: the mount, the device, the host and the daemon.

    Made by :func:`environment` inside the private namespace.  Everything here runs
    on the trio thread that also serves the mount: never touch the mount from it
    (use a worker thread or a subprocess).
    """

    config: Config
    mountpoint: str
    device: KvpDevice
    host: KvpHost
    session: Session
    syslog: SyslogSink
    nursery: trio.Nursery
    #: The daemon started last by :meth:`start_daemon`, while it is ours to stop.
    daemon: trio.Process | None = None
    #: Process ids of every daemon started, in order.
    started: list[int] = field(default_factory=list)
    #: The guest's synthetic network adapters, if :func:`prepare_network` made them.
    network: SyntheticNetwork | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    async def start_daemon(self) -> trio.Process:
        """Start ``hv_kvp_daemon -n`` in its own session (terminal signals miss it)."""
        process = await trio.lowlevel.open_process(
            [self.config.daemon, "-n"], stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.daemon = process
        self.started.append(process.pid)
        self.nursery.start_soon(self._watch, process)
        log.info("hostsim: started %s (pid %d)", self.config.daemon, process.pid)
        return process

    async def _watch(self, process: trio.Process) -> None:
        status = await process.wait()
        if self.daemon is process:
            print(
                f"kvpfs hostsim: {DAEMON_NAME} (pid {process.pid}) exited with status {status}",
                file=sys.stderr,
                flush=True,
            )

    async def wait_ready(self, registrations: int = 1) -> None:
        """Wait for registration number ``registrations`` and the host's initial items.

        HostsimError if the daemon exits first or takes longer than the ready timeout.
        """
        daemon = self.daemon
        with trio.move_on_after(self.config.ready_timeout):
            async with trio.open_nursery() as race:

                async def registered() -> None:
                    await self.device.wait_registered(registrations)
                    await self.host.provisioned.wait()
                    race.cancel_scope.cancel()

                async def exited() -> None:
                    if daemon is not None:
                        await daemon.wait()
                        race.cancel_scope.cancel()

                race.start_soon(registered)
                race.start_soon(exited)
        if self.device.registrations >= registrations and self.device.registered:
            return
        if daemon is not None and daemon.returncode is not None:
            why = f"exited with status {daemon.returncode}"
        else:
            why = f"did not register within {self.config.ready_timeout:g} s"
        lines = "; ".join(self.syslog.lines[-5:]) or "no syslog lines"
        raise HostsimError(f"{DAEMON_NAME} {why} ({lines})")

    async def stop_daemon(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            await _stop(daemon, DAEMON_NAME, grace=0.0)


def _bind_device(mountpoint: str) -> None:
    # In a worker thread: the bind looks the source up through the FUSE mount,
    # which the trio thread serves.
    mounts.mount(os.path.join(mountpoint, "vmbus"), DEVICE_DIR, None, mounts.MS_BIND)
    os.stat(os.path.join(DEVICE_DIR, "hv_kvp"))


@contextlib.asynccontextmanager
async def environment(
    config: Config,
    mountpoint: str,
    *,
    start: bool = True,
    network: SyntheticNetwork | None = None,
) -> AsyncIterator[Environment]:
    """Mount kvpfs on ``mountpoint``, expose the device at /dev/vmbus and (``start``)
    run the daemon until it is ready; tear it all down on exit.

    Call it in the private namespace, after :func:`prepare_filesystems` (and
    :func:`prepare_network`, whose adapters the host then knows).
    """
    device = KvpDevice(timeout=config.timeout)
    adapters = [Adapter.of(nic.mac, nic.guid) for nic in (network.nics if network else [])]
    host = KvpHost(device, initial_items=config.items, adapters=adapters)
    if network is not None:
        host.before_ip_request.append(network.sync)
    ops = Operations(
        [KvpView(POOL_DIR), HostView(host), VmbusView(device)],
        # A host request may wait for a daemon, then for the kernel's timeout; a
        # partial write of host/net/<mac>/config sends two requests.
        FsOptions(store_timeout=2 * (config.timeout + CONNECT_TIMEOUT) + 10.0),
    )
    syslog = SyslogSink(echo=config.verbose)
    async with trio.open_nursery() as nursery:
        await nursery.start(syslog.serve, "/dev/log")
        if network is not None:
            await nursery.start(network.watch)
        try:
            session: Session = await nursery.start(
                functools.partial(serve, handle_signals=False),
                ops,
                mountpoint,
                fuse_options(fsname="kvpfs-hostsim"),
            )
        except RuntimeError as exc:
            raise HostsimError(f"mounting kvpfs on {mountpoint} failed: {exc}") from None
        env = Environment(
            config, mountpoint, device, host, session, syslog, nursery, network=network
        )
        try:
            try:
                await trio.to_thread.run_sync(_bind_device, mountpoint)
            except OSError as exc:
                raise HostsimError(
                    f"cannot put the device at {DEVICE_DIR}: {exc.strerror or exc}"
                ) from None
            if start:
                await env.start_daemon()
                await env.wait_ready()
            yield env
        finally:
            with trio.CancelScope(shield=True):
                await _teardown(env)
            nursery.cancel_scope.cancel()


async def _teardown(env: Environment) -> None:
    # Without its device the daemon's read fails, its reopen fails, and it exits.
    env.device.shutdown()
    daemon, env.daemon = env.daemon, None
    if daemon is not None:
        await _stop(daemon, DAEMON_NAME, grace=3.0)
    await _stop_leftovers()
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(mounts.umount, DEVICE_DIR)
    await env.session.stop()


# -- the command ---------------------------------------------------------------------


@dataclass
class _Command:
    process: trio.Process | None = None
    #: Set just before the command is started: a signal then waits for it.
    starting: bool = False
    signals: list[int] = field(default_factory=list)

    def forward(self) -> None:
        """Pass the signals so far on: the first as it is, a second one as SIGKILL."""
        process = self.process
        if process is None or process.returncode is not None or not self.signals:
            return
        if len(self.signals) == 1:
            process.send_signal(self.signals[0])
        else:
            process.kill()


async def _handle_signals(command: _Command, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            command.signals.append(signum)
            if command.process is not None and command.process.returncode is None:
                command.forward()
            elif not (command.starting and command.process is None):
                # Still setting up (or already done): stop, and tear down.
                cancel.cancel()


async def _run_command(env: Environment, command: _Command) -> int:
    daemon = env.daemon
    extra = {
        "KVPFS_MOUNT": env.mountpoint,
        "KVPFS_POOL_DIR": POOL_DIR,
        "KVPFS_DAEMON_PID": str(daemon.pid if daemon is not None else ""),
    }
    log.info("hostsim: running %s", env.config.command)
    command.starting = True
    try:
        process = await trio.lowlevel.open_process(env.config.command, env={**os.environ, **extra})
    except OSError as exc:
        raise HostsimError(
            f"cannot run {env.config.command[0]}: {exc.strerror or exc}", 127
        ) from None
    command.process = process
    # A signal that came while the command was being started is its signal too.
    command.forward()
    try:
        code = await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                await _stop(process, env.config.command[0], grace=0.0)
    return 128 - code if code < 0 else code


async def _main(config: Config, mountpoint: str, network: SyntheticNetwork | None) -> int:
    command = _Command()
    status: int | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, command, nursery.cancel_scope)
        async with environment(config, mountpoint, network=network) as env:
            status = await _run_command(env, command)
        nursery.cancel_scope.cancel()
    if status is None:
        # Interrupted before the command could finish.
        return 128 + command.signals[0] if command.signals else 1
    return status


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> HostsimError | OSError | None:
    """The error to tell the user about, from the exceptions of nested nurseries."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_leaf(exc)
            if found is not None:
                return found
        elif isinstance(exc, (HostsimError, OSError)):
            return exc
    return None


def _report(exc: HostsimError | OSError) -> int:
    if isinstance(exc, HostsimError):
        print(f"kvpfs hostsim: {exc}", file=sys.stderr)
        return exc.status
    print(f"kvpfs hostsim: {exc.strerror or exc}", file=sys.stderr)
    return 1


def run_hostsim(argv: Sequence[str]) -> int:
    """The ``kvpfs hostsim`` command; returns the exit status."""
    try:
        config = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    logging.basicConfig(
        level=logging.INFO if config.verbose else logging.WARNING,
        format="kvpfs hostsim: %(levelname)s %(name)s: %(message)s",
    )
    made: str | None = None
    network: SyntheticNetwork | None = None
    try:
        preflight(config)
        enter_private_namespace()
        prepare_filesystems()
        network = prepare_network(config.nics)
        if config.mountpoint is None:
            made = tempfile.mkdtemp(prefix="kvpfs-hostsim-")
        mountpoint = os.path.abspath(config.mountpoint or made or "")
        return trio.run(_main, config, mountpoint, network)
    except (HostsimError, OSError) as exc:
        return _report(exc)
    except BaseExceptionGroup as group:
        leaf = _first_leaf(group)
        if leaf is None:
            raise
        return _report(leaf)
    except KeyboardInterrupt:
        return 130
    finally:
        if network is not None:
            network.close()
        if made is not None:
            with contextlib.suppress(OSError):
                mounts.umount(made)
            with contextlib.suppress(OSError):
                os.rmdir(made)


if __name__ == "__main__":
    sys.exit(run_hostsim(sys.argv[1:]))
