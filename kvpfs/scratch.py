"""Which filenames are editor and tool scratch files.

Scratch files (vim swap files and backups, the ``4913`` probe, nano locks,
``sed -i`` temporaries, Emacs lock and auto-save files, ``*.tmp``) live only in
the mount's memory and never reach a store: a KVP value cannot hold a 12 KiB
swap file, and a half-written temporary must never be visible to the host.

Backends must make sure that no real key is ever shown under a name for which
:func:`is_scratch_name` is true (the KVP name escaping does this), otherwise
an editor's backup could overwrite a real key.
"""

from __future__ import annotations

import re

# vim probes whether it may create files with "4913", then 5036, 5159, ... (steps of 123).
_VIM_PROBE_FIRST = 4913
_VIM_PROBE_STEP = 123

_SED_TEMP = re.compile(r"sed[A-Za-z0-9]{6}")


def is_scratch_name(name: str) -> bool:
    """True for names that editors and tools use for transient files."""
    if not name:
        return False
    if name.startswith("."):
        # vim/nano swap and lock files (.k.swp, .k.swpx), Emacs locks (.#k),
        # Kate (.k.kate-swp), rsync and many others' hidden temporaries.
        return True
    if name.endswith("~"):
        return True  # vim, nano -B and Emacs backups
    if len(name) >= 2 and name.startswith("#") and name.endswith("#"):
        return True  # Emacs auto-save
    if name.endswith(".tmp"):
        return True  # write-then-rename temporaries (Python os.replace idiom and others)
    if _SED_TEMP.fullmatch(name):
        return True
    if name.isdigit() and name.isascii() and not name.startswith("0"):
        number = int(name)
        if number >= _VIM_PROBE_FIRST and (number - _VIM_PROBE_FIRST) % _VIM_PROBE_STEP == 0:
            return True
    return False
