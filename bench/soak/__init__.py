"""
``python -m bench.soak``: the soak test of issue 8.

Three peernix daemons on 127.0.0.1, each the others' static peer, serve a
mixed load (narinfo hits local and through peers, misses, NAR downloads
checked byte for byte) from several client processes while a chaos loop
stops, restarts, freezes and thaws them.  Every minute it reports errors,
p99 latency, RSS and open file descriptors per daemon; at the end it checks
that no wrong byte and no 5xx reached a client and that RSS and descriptors
stayed flat.  See ``bench/README.rst`` ("Soak").

Modules: :mod:`bench.soak.fixture` (the three stores),
:mod:`bench.soak.client` (the load and its checks),
:mod:`bench.soak.cluster` (daemons, chaos, sampling),
:mod:`bench.soak.verdict` (per-minute figures, the pass rule, the JSON),
:mod:`bench.soak.__main__` (the command line) and
:mod:`bench.soak.test_soak` (tests of the judging code).
"""
