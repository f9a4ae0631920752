"""The local Nix store: :class:`LocalStore` reads Nix's database and files."""

from __future__ import annotations

from peernix.store.local import LocalStore, StoreError

__all__ = ["LocalStore", "StoreError"]
