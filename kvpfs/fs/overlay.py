"""In-memory home of editor scratch files, and keys that an editor moved aside.

vim's default save renames the key ``k`` to ``k~`` and then writes a new ``k``.
Passing that rename to the store would make the key vanish from the pool until
the new file is committed, so a rename of a key onto a scratch name copies the
value into the overlay and only *hides* the key (a tombstone).  The key is
deleted from the store only if the scratch copy is removed (or moved to another
key) before a new value for the key is committed; for vim's pattern that never
happens, so the store sees exactly one update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvpfs.fs.view import Path, View


@dataclass(slots=True, eq=False)
class ScratchFile:
    data: bytearray = field(default_factory=bytearray)
    #: The key this file's content was moved away from, while that key is hidden.
    origin: Path | None = None
    mtime_ns: int = field(default_factory=time.time_ns)


class Overlay:
    def __init__(self) -> None:
        self._files: dict[tuple[int, Path], ScratchFile] = {}
        self._hidden: dict[tuple[int, Path], int] = {}

    # scratch files

    def get(self, view: View, path: Path) -> ScratchFile | None:
        if not self._files:  # the common case, on every request
            return None
        return self._files.get((id(view), path))

    def put(self, view: View, path: Path, scratch: ScratchFile) -> None:
        self._files[(id(view), path)] = scratch

    def pop(self, view: View, path: Path) -> ScratchFile | None:
        return self._files.pop((id(view), path), None)

    def names_in(self, view: View, directory: Path) -> list[tuple[str, ScratchFile]]:
        n = len(directory)
        bid = id(view)
        return [
            (p[n], f)
            for (b, p), f in self._files.items()
            if b == bid and len(p) == n + 1 and p[:n] == directory
        ]

    # keys hidden while an editor has moved them onto a scratch name

    def hide(self, view: View, path: Path) -> None:
        key = (id(view), path)
        self._hidden[key] = self._hidden.get(key, 0) + 1

    def is_hidden(self, view: View, path: Path) -> bool:
        return bool(self._hidden) and (id(view), path) in self._hidden

    def unhide(self, view: View, path: Path) -> None:
        """A new value for ``path`` was committed: the moved-away copy no longer owns it."""
        if self._hidden.pop((id(view), path), None) is None:
            return
        bid = id(view)
        for (b, _), f in self._files.items():
            if b == bid and f.origin == path:
                f.origin = None

    def release_origin(self, view: View, scratch: ScratchFile) -> Path | None:
        """Detach ``scratch`` from the key it came from; returns that key if still hidden."""
        origin, scratch.origin = scratch.origin, None
        if origin is None:
            return None
        key = (id(view), origin)
        count = self._hidden.get(key, 0)
        if count <= 1:
            self._hidden.pop(key, None)
        else:
            self._hidden[key] = count - 1
        # Only the last copy that still claims the key may decide its fate.
        return origin if count == 1 else None
