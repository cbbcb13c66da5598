"""What a mount serves, readable from inside it: the ``.kvpfs/`` view."""
