"""The Hyper-V host that kvpfs plays around the real ``hv_kvp_daemon``.

``message`` is pure (the hv_kvp_msg codec and the kernel's conversions);
``device`` emulates the kernel's ``/dev/vmbus/hv_kvp``; ``host`` is the host's
API (SET, DELETE, GET, ENUMERATE); ``view`` shows ``host/`` and ``vmbus/`` in a
mount; ``hostsim`` is the composition root of ``kvpfs hostsim``.
"""
