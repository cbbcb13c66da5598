"""The embedded xenstored: ``store`` (pure model of cxenstored 4.17) and ``server``
(trio sockets around it)."""
