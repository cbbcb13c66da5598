"""``python -m kvpfs``: the ``kvpfs`` command."""

import sys

from kvpfs.cli import main

sys.exit(main())
