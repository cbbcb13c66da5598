"""kvpfs: Hyper-V KVP pools and XenStore as a FUSE filesystem."""

__version__ = "0.1.0"
