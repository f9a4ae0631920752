"""Pure Nix protocol code: encodings, narinfo, keys and signatures, NARs.

Nothing in this package performs network I/O or touches the reactor.  The NAR
writer and listing read the filesystem and are meant to run in a worker
thread.
"""
