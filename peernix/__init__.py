"""peernix: a LAN-wide Nix binary cache that downloads each store path once."""

__version__ = "0.1.0"
