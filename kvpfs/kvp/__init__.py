"""Hyper-V KVP pool files of a guest, shown as one directory per pool."""
