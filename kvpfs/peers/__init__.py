"""The peers kvpfs plays where the real ones are missing (CI, a laptop).

``xenstored`` is the embedded xenstored (``store``: the cxenstored 4.17 model as a
pure state machine; ``server``: its trio sockets); ``xendrivers`` the simulated
NetBSD xbdback and guest blkfront that answer an attach; ``hyperv`` the Hyper-V
host around the distribution's real ``hv_kvp_daemon`` (its message codec, the
emulated ``/dev/vmbus/hv_kvp``, the host API, its views and ``kvpfs hostsim``).

Only composition roots import this package: :mod:`kvpfs.compose` and
:mod:`kvpfs.peers.hyperv.hostsim`.  Production views never do.
"""
