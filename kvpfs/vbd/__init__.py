"""Block devices (vbd) as the backend domain sees them, and the toolstack's attach
and detach.

Pure modules: ``vdev`` (device names and numbers), ``diskspec`` (the xl disk
specification), ``layout`` (the nodes libxl 4.17 writes), ``states`` (XenbusState).
trio modules: ``toolstack`` (attach/detach over a XenStore client), ``hotplug``
(running the block hotplug script).  ``view`` is the mount's ``vbd/``.  The
drivers that answer an attach without Xen are peers: :mod:`kvpfs.peers.xendrivers`.
"""
