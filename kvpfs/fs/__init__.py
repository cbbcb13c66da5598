"""The FUSE layer: one pyfuse3 filesystem that shows one directory per view.

``view`` is the seam every store implements (:class:`kvpfs.fs.view.View`).
"""
