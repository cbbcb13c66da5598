"""XenStore as a client sees it: the wire protocol, finding a xenstored, a trio
client, and the mount's ``xenstore/`` view.

``protocol`` is pure (no I/O) and shared by the client and the embedded server
(:mod:`kvpfs.peers.xenstored`) so that both sides agree byte for byte with Xen
4.17's cxenstored.
"""
