"""Running a block hotplug script as libxl does on Linux.

The script named by the backend's ``script`` node (``/etc/xen/scripts/block``) is
run with the action as its only argument (``add`` after the backend reached
InitWait, ``remove`` after it closed) and this environment:

* ``XENBUS_PATH=backend/vbd/<domU>/<devid>``, relative to dom0's home, so the
  script's ``xenstore-read``/``xenstore-write`` calls reach the device's nodes;
* ``XENBUS_TYPE=vbd`` and ``XENBUS_BASE_PATH=backend``, which Debian's ``block``
  script reads as well;
* ``script=<the script's path>``;
* ``XENSTORED_PATH`` when kvpfs talks to a xenstored other than the default one,
  so that the script's own clients find the same daemon.

The script reports through XenStore (``physical-device``, ``hotplug-status``,
``hotplug-error``); its exit status and output are only logged.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

__all__ = ["HotplugResult", "HotplugRunner", "hotplug_env"]


@dataclass(frozen=True, slots=True)
class HotplugResult:
    returncode: int
    output: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def hotplug_env(
    script: str, domid: int, devid: int, *, kind: str = "vbd", xenstored_path: str | None = None
) -> dict[str, str]:
    env = {
        "script": script,
        "XENBUS_TYPE": kind,
        "XENBUS_PATH": f"backend/{kind}/{domid}/{devid}",
        "XENBUS_BASE_PATH": "backend",
    }
    if xenstored_path is not None:
        env["XENSTORED_PATH"] = xenstored_path
    return env


class HotplugRunner:
    """Runs hotplug scripts; ``xenstored_path`` is passed on as ``XENSTORED_PATH``."""

    def __init__(
        self, *, xenstored_path: str | None = None, base_env: Mapping[str, str] | None = None
    ) -> None:
        self.xenstored_path = xenstored_path
        self._base_env = base_env

    async def run(
        self, script: str, action: str, domid: int, devid: int, *, kind: str = "vbd"
    ) -> HotplugResult:
        """Run ``script action`` to completion (cancel the caller to stop it)."""
        env = dict(os.environ if self._base_env is None else self._base_env)
        env.update(hotplug_env(script, domid, devid, kind=kind, xenstored_path=self.xenstored_path))
        log.info("hotplug: %s %s for %s/%d/%d", script, action, kind, domid, devid)
        try:
            proc = await trio.run_process(
                [script, action],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
            )
        except OSError as exc:
            log.error("hotplug: cannot run %s: %s", script, exc)
            return HotplugResult(126 if exc.errno == errno.EACCES else 127, str(exc).encode())
        output = proc.stdout or b""
        if proc.returncode != 0:
            log.error(
                "hotplug: %s %s exited %d: %s",
                script,
                action,
                proc.returncode,
                output.decode("utf-8", "replace").strip(),
            )
        return HotplugResult(proc.returncode, output)
