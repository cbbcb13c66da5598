"""The FUSE layer: one pyfuse3 filesystem that shows one directory per backend."""
