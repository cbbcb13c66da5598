"""XenStore: the wire protocol, a trio client, and an embedded xenstored.

``protocol`` is pure (no I/O) and shared by the client and the server so that both
sides agree byte for byte with Xen 4.17's cxenstored.
"""
