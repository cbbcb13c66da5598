"""Dump a XenStore tree as ``xenstore-ls -f -p`` does, and load one back.

The I/O half of :mod:`kvpfs.xenstore.lsformat`: :func:`dump_tree` walks the tree
as xenstore-ls walks it (DIRECTORY, then READ and GET_PERMS of each child, depth
first, in the server's order), :func:`load_tree` makes a tree hold exactly the
nodes of a dump, with their values and permissions.
"""

from __future__ import annotations

from kvpfs.xenstore.client import XenStoreClient, XenStoreError
from kvpfs.xenstore.lsformat import DumpedNode


async def dump_tree(client: XenStoreClient, root: str = "/") -> list[DumpedNode]:
    """Every node below ``root`` (not ``root`` itself, as xenstore-ls)."""
    nodes: list[DumpedNode] = []

    async def walk(path: str) -> None:
        for name in await client.directory(path):
            child = f"{path.rstrip('/')}/{name}"
            try:
                value = await client.read(child)
                perms = tuple(await client.get_perms(child))
            except XenStoreError:
                continue  # removed while we walked, as xenstore-ls skips it
            nodes.append(DumpedNode(child, value, perms))
            await walk(child)

    await walk(root)
    return nodes


async def load_tree(client: XenStoreClient, nodes: list[DumpedNode]) -> None:
    """Replace the whole tree with ``nodes`` (parents listed before children).

    What the tree held before is removed first, so a dump, a load and a dump give
    the same text.  A node's permissions are set right after its write, so the
    children created next inherit them as they would have.
    """
    for name in await client.directory("/"):
        await client.rm(f"/{name}")
    for node in nodes:
        await client.write(node.path, node.value)
        if node.perms is not None:
            await client.set_perms(node.path, node.perms)
