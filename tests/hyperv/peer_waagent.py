"""Inside ``kvpfs hostsim``: the host sets NdDriverVersion, Debian's waagent reads it.

Argument: the directory holding Debian's ``azurelinuxagent`` package.  The host's
SETs are writes to ``$KVPFS_MOUNT/host/external`` (as Add-VMKvpItem would send
them); waagent reads ``/var/lib/hyperv/.kvp_pool_0`` itself, unmodified.  Prints
the versions it read as JSON on the last line.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, sys.argv[1])

from azurelinuxagent.common.rdma import RDMAHandler  # type: ignore[import-not-found]

EXTERNAL = os.path.join(os.environ["KVPFS_MOUNT"], "host", "external")


def host_set(key: str, value: str) -> None:
    with open(os.path.join(EXTERNAL, key), "w", encoding="utf-8") as f:
        f.write(value + "\n")


def main() -> None:
    host_set("SomethingElse", "first")
    host_set("NdDriverVersion", "142.0")
    first = RDMAHandler().get_rdma_version()
    host_set("NdDriverVersion", "143.1")
    second = RDMAHandler().get_rdma_version()
    os.unlink(os.path.join(EXTERNAL, "NdDriverVersion"))
    third = RDMAHandler().get_rdma_version()
    print(json.dumps([first, second, third]), flush=True)


if __name__ == "__main__":
    main()
