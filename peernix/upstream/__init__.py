"""
Fetching from upstream binary caches on the LAN's behalf (issue 13).

When no peer has a path, one node of the LAN (the path's *fetcher*, chosen
by rendezvous hashing, :mod:`.rendezvous`) downloads it from an upstream
(:mod:`.client`) into a staging area on disk (:mod:`.staging`) and streams
it to every waiting node and client at once; :mod:`.fetch` coordinates
that, :mod:`.config` decides which upstreams to use.
"""
