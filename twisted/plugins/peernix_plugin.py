"""twistd plugin: ``twistd -n peernix`` / ``twist peernix`` (imports lazily)."""

from twisted.application.service import ServiceMaker

peernix = ServiceMaker(
    "peernix",
    "peernix.tap",
    "A LAN-wide Nix binary cache: serve this store to peers, substitute from them.",
    "peernix",
)
