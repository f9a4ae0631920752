"""
``peernix doctor``: what is wrong with this machine's set-up, as pure checks.

Every check is a function of parsed inputs (the daemon's :class:`Config`,
a :class:`~peernix.nixconf.NixConf`, HTTP answers as :class:`HttpAnswer`,
the daemon's ``/status.json`` document...) returning one
:class:`CheckResult`.  Nothing here opens a socket, a file or a process:
:mod:`peernix.doctor_io` gathers the :class:`Facts`, :func:`run_checks`
judges them, :mod:`peernix.cli` prints the results.

A result's status is one of

* ``ok``: nothing to do;
* ``warning``: it works, but costs (time, bandwidth, internet downloads);
* ``problem``: it breaks or endangers substitution; ``peernix doctor``
  exits 1 when any check says so;
* ``unknown``: it could not be checked (no permission, no answer to read);
  never a problem by itself;
* ``skipped``: it does not apply to this set-up (a feature that is off).

What the doctor knows of cache.nixos.org (its priority and key) is built in:
it needs no internet.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import field, frozen

from peernix.nix.signing import KeyFormatError, PublicKey, parse_public_key
from peernix.nixconf import CACHE_NIXOS_ORG_KEY, NixConf
from peernix.options import SETTINGS, Config

OK = "ok"
WARNING = "warning"
PROBLEM = "problem"
UNKNOWN = "unknown"
SKIPPED = "skipped"

#: Every status, from best to worst as a summary reads them.
STATUSES = (OK, SKIPPED, UNKNOWN, WARNING, PROBLEM)

#: What the doctor knows of cache.nixos.org without asking it.
CACHE_NIXOS_ORG_HOST = "cache.nixos.org"
CACHE_NIXOS_ORG_PRIORITY = 40

#: Nix's default ``narinfo-cache-negative-ttl``, in seconds.
NIX_DEFAULT_NEGATIVE_TTL = 3600

#: The key name zw3rk/peernix nodes sign with by default (see
#: :data:`peernix.service.SHARED_KEY_NAME`).
SHARED_KEY_NAME = "peernix-1"

#: The path of the binary cache on a peernix daemon.
CACHE_PATH = "/nix-cache"


@frozen
class CheckResult:
    """
    One check's verdict.

    :ivar name: the check's short name (``daemon``, ``substituter``...).
    :ivar status: one of :data:`STATUSES`.
    :ivar summary: what was found, one sentence.
    :ivar fix: what to do about it, or ``None`` when nothing is to be done.
    :ivar details: the facts behind the verdict, for ``--json``.
    """

    name: str
    status: str
    summary: str
    fix: str | None = None
    details: Mapping[str, Any] = field(factory=dict)

    def line(self) -> str:
        """:returns: the result as one line of text (no newline inside)."""
        text = f"{self.name}: {self.summary}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return f"{self.status:<8} " + " ".join(text.split())

    def document(self) -> dict[str, Any]:
        """:returns: the result as a JSON object."""
        return {"name": self.name, "status": self.status, "summary": self.summary,
                "fix": self.fix, "details": dict(self.details)}


@frozen
class HttpAnswer:
    """
    What one bounded HTTP GET got.

    :ivar url: what was asked.
    :ivar status: the HTTP status, ``None`` when no answer came.
    :ivar body: the body (at most the reader's limit).
    :ivar error: why no answer came (refused, timed out...), else ``None``.
    """

    url: str
    status: int | None = None
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """:returns: whether it answered 200."""
        return self.status == 200

    def describe(self) -> str:
        """:returns: the outcome in a few words (``HTTP 404``, ``connection refused``)."""
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no answer"

    def json(self) -> Any:
        """:returns: the body parsed as JSON, ``None`` when it is not 200 or not JSON."""
        if not self.ok:
            return None
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: a hostile peer's deeply nested document.
            return None


@frozen
class Sockets:
    """
    Sockets bound on this machine (its network namespace), as read from
    ``/proc/net``.

    :ivar tcp_listening: ``(address, port)`` of every listening TCP socket.
    :ivar udp_bound: ``(address, port)`` of every bound UDP socket.
    """

    tcp_listening: frozenset[tuple[str, int]]
    udp_bound: frozenset[tuple[str, int]]


@frozen
class Facts:
    """
    Everything :func:`run_checks` judges, gathered by :mod:`peernix.doctor_io`.

    Each ``*_error`` says why the thing next to it could not be read (a
    malformed file: a problem); each ``*_unreadable`` that it could not be
    read at all (no permission: unknown).
    """

    config: Config
    config_error: str | None = None
    config_unreadable: str | None = None
    #: This node's public key, derived from ``--secret-key-file``.
    own_key: PublicKey | None = None
    own_key_error: str | None = None
    own_key_unreadable: str | None = None
    nix_conf: NixConf | None = None
    nix_conf_error: str | None = None
    nix_conf_unreadable: str | None = None
    #: ``GET /nix-cache/nix-cache-info`` of the daemon.
    cache_info: HttpAnswer | None = None
    #: ``GET /status.json`` of the daemon.
    status: HttpAnswer | None = None
    #: ``GET <URL>/nix-cache-info`` of the peernix URL nix.conf lists, when local.
    substituter_probe: HttpAnswer | None = None
    #: What ``nix-store --version`` printed, ``None`` when it did not run.
    nix_version_output: str | None = None
    nix_version_error: str | None = None
    #: ``GET /status.json`` of each known peer, by the peer's URL.
    peer_statuses: Mapping[str, HttpAnswer] = field(factory=dict)
    #: Bound sockets, ``None`` when they could not be read.
    sockets: Sockets | None = None
    sockets_error: str | None = None
    #: This host's non-loopback addresses, and its host names.
    host_addresses: tuple[str, ...] = ()
    host_names: tuple[str, ...] = ()
    #: ``GET <upstream>/nix-cache-info`` of each upstream, by URL.
    upstream_probes: Mapping[str, HttpAnswer] = field(factory=dict)


# --------------------------------------------------------------------------
# Substituter URLs.


@frozen
class StoreUrl:
    """
    A substituter URL of ``nix.conf``, taken apart.

    :ivar url: as written.
    :ivar scheme: lower case.
    :ivar host: the host, lower case, IPv6 without brackets; ``""`` if none.
    :ivar port: the port, the scheme's default when not given.
    :ivar path: the path without trailing slashes.
    :ivar params: the store parameters of the query string.
    """

    url: str
    scheme: str
    host: str
    port: int | None
    path: str
    params: Mapping[str, str]

    @property
    def trusted(self) -> bool:
        """:returns: whether ``?trusted=`` makes Nix skip signature checks for this store."""
        return self.params.get("trusted", "").strip().lower() in ("1", "true")

    @property
    def priority(self) -> int | None:
        """:returns: the ``?priority=`` override, ``None`` when absent or not a number."""
        text = self.params.get("priority")
        if text is None or not re.fullmatch(r"\s*-?[0-9]+\s*", text):
            return None
        return int(text)

    @property
    def without_params(self) -> str:
        """:returns: the URL without its query string."""
        return self.url.split("?", 1)[0]


def parse_store_url(url: str) -> StoreUrl:
    """:returns: ``url`` taken apart; never raises (a nonsense URL gets empty parts)."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return StoreUrl(url, "", "", None, "", {})
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return StoreUrl(url, scheme, host, port, parts.path.rstrip("/"), params)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _normal_address(host: str) -> str:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).compressed
    except ValueError:
        return host.lower().rstrip(".")


def daemon_hosts(config: Config, host_addresses: Iterable[str] = (), host_names: Iterable[str] = ()) -> set[str]:
    """
    :returns: the hosts (addresses, ``localhost``, this host's names) at
        which a client on this machine reaches the daemon listening as
        ``config`` says: any of them on all addresses, only ``--interface``
        otherwise.
    """
    interface = config.interface
    if interface not in (None, "::", "0.0.0.0"):
        hosts = {_normal_address(interface)}
        if _is_loopback(interface):
            hosts.add("localhost")
        return hosts
    hosts = {"localhost", "127.0.0.1"}
    if interface != "0.0.0.0":
        hosts.add("::1")
    for address in host_addresses:
        normal = _normal_address(address)
        if interface == "0.0.0.0" and ":" in normal:
            continue
        hosts.add(normal)
    hosts.update(_normal_address(name) for name in host_names if name)
    return hosts


def reaches_daemon(url: StoreUrl, config: Config, hosts: set[str]) -> bool:
    """:returns: whether ``url`` is this daemon's cache: an http URL at one of ``hosts``, its port, ``/nix-cache``."""
    host = _normal_address(url.host)
    local = host in hosts or (host.startswith("127.") and "127.0.0.1" in hosts)
    return url.scheme == "http" and local and url.port == config.port and url.path == CACHE_PATH


def _near_miss(url: StoreUrl, config: Config, hosts: set[str]) -> str | None:
    """:returns: why a URL at this machine is not this daemon's cache, or ``None`` when it is not at this machine."""
    host = _normal_address(url.host)
    if url.scheme not in ("http", "https") or not (host in hosts or _is_loopback(host)):
        return None
    if url.scheme == "https":
        return f"{url.url} uses https; peernix speaks plain http"
    if url.port != config.port:
        return f"{url.url} names port {url.port}, but the daemon listens on port {config.port}"
    if url.path != CACHE_PATH:
        return (f"{url.url} lacks the {CACHE_PATH} path (Nix would say it 'does not appear to be a binary cache')"
                if url.path in ("", "/") else f"{url.url} has the path {url.path!r} instead of {CACHE_PATH}")
    if host not in hosts:
        return f"{url.url} names {url.host}, where the daemon does not listen (--interface {config.interface})"
    return None


def cache_url(config: Config) -> str:
    """:returns: the substituter URL to put in nix.conf for ``config``."""
    host = config.interface
    if host is None or host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}{CACHE_PATH}"


def is_cache_nixos_org(url: StoreUrl) -> bool:
    """:returns: whether ``url`` is cache.nixos.org."""
    return url.host == CACHE_NIXOS_ORG_HOST


def find_peernix(nix_conf: NixConf, config: Config, hosts: set[str]) -> StoreUrl | None:
    """:returns: the first substituter of ``nix_conf`` that reaches this daemon, or ``None``."""
    for text in nix_conf.substituters:
        url = parse_store_url(text)
        if reaches_daemon(url, config, hosts):
            return url
    return None


def parse_cache_info(body: bytes) -> dict[str, str]:
    """:returns: the ``Key: value`` lines of a ``nix-cache-info`` body, as Nix reads them (split at the first colon)."""
    fields: dict[str, str] = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    return fields


# --------------------------------------------------------------------------
# The checks.


def _nix_conf_unavailable(name: str, facts: Facts) -> CheckResult | None:
    """:returns: the verdict of a nix.conf check when nix.conf could not be read, else ``None``."""
    if facts.nix_conf_unreadable is not None:
        return CheckResult(name, UNKNOWN, f"cannot check: {facts.nix_conf_unreadable}.",
                           "run peernix doctor as root (sudo) to read it.")
    if facts.nix_conf_error is not None or facts.nix_conf is None:
        return CheckResult(name, PROBLEM, f"nix.conf cannot be used: {facts.nix_conf_error or 'not read'}.",
                           "correct nix.conf: Nix itself refuses it.")
    return None


def check_config(facts: Facts) -> CheckResult:
    """The config file and the signing key the daemon starts with."""
    config = facts.config
    if facts.config_error is not None:
        return CheckResult("config", PROBLEM, f"the daemon would not start: {facts.config_error}.",
                           "correct the config file (see docs/configuration.rst).",
                           {"config_file": config.config_file})
    if facts.own_key_error is not None:
        return CheckResult("config", PROBLEM, f"the daemon would not start: {facts.own_key_error}.",
                           "point --secret-key-file at a key made by nix-store --generate-binary-cache-key.",
                           {"secret_key_file": config.secret_key_file})
    if facts.config_unreadable is not None or facts.own_key_unreadable is not None:
        return CheckResult("config", UNKNOWN, f"cannot check: {facts.config_unreadable or facts.own_key_unreadable}.",
                           "run peernix doctor as the daemon's user (or root).",
                           {"config_file": config.config_file, "secret_key_file": config.secret_key_file})
    where = f"config file {config.config_file}" if config.config_file else "no config file, the command line only"
    signing = (f"signing with key {facts.own_key.name!r}" if facts.own_key is not None
               else "not signing (no --secret-key-file): only paths signed elsewhere are shared")
    return CheckResult("config", OK, f"settings read ({where}); {signing}.", None,
                       {"config_file": config.config_file, "port": config.port,
                        "udp_port": config.effective_udp_port,
                        "public_key": facts.own_key.to_string() if facts.own_key else None})


def check_daemon(config: Config, cache_info: HttpAnswer | None, status: HttpAnswer | None,
                 own_key: PublicKey | None = None) -> CheckResult:
    """
    The daemon answers on its port: ``nix-cache-info`` and ``/status.json``;
    and it runs with the settings the doctor was given (its priority, its
    key: a warning when not, since the checks then judge another set-up).

    :param own_key: the public key of the doctor's ``--secret-key-file``.
    """
    if cache_info is None:
        return CheckResult("daemon", UNKNOWN, "not asked.")
    details: dict[str, Any] = {"url": cache_info.url, "nix_cache_info": cache_info.describe()}
    start = f"start it: twistd --nodaemon --pidfile= peernix --port {config.port} (or systemctl start peernix)"
    if not cache_info.ok:
        if cache_info.status is None:
            return CheckResult("daemon", PROBLEM, f"nothing answers at {cache_info.url}: {cache_info.describe()}.",
                               start + "; see its log (journalctl -u peernix).", details)
        return CheckResult("daemon", PROBLEM,
                           f"{cache_info.url} answered {cache_info.describe()}, not a binary cache:"
                           f" another program holds port {config.port}?",
                           f"stop that program or run peernix on another --port; {start}.", details)
    fields = parse_cache_info(cache_info.body)
    details["nix_cache_info_fields"] = fields
    if fields.get("StoreDir") != "/nix/store":
        return CheckResult("daemon", PROBLEM,
                           f"{cache_info.url} says StoreDir {fields.get('StoreDir')!r}; Nix needs /nix/store.",
                           "run peernix, not another cache, on this port.", details)
    document = status.json() if status is not None else None
    if not isinstance(document, dict):
        why = status.describe() if status is not None else "not asked"
        details["status_json"] = why
        return CheckResult("daemon", WARNING,
                           f"the cache answers at {cache_info.url}, but /status.json does not ({why}):"
                           " not peernix (zw3rk/peernix?) or an old version; the peer checks cannot run.",
                           "run peernix from this repository on this port.", details)
    details["version"] = document.get("version")
    differences = []
    if isinstance(document.get("priority"), int) and document["priority"] != config.priority:
        differences.append(f"priority {document['priority']}, not {config.priority}")
    running_key = document.get("public_key")
    if own_key is not None and running_key != own_key.to_string():
        differences.append(f"signing key {running_key or 'none'}, not {own_key.to_string()}")
    elif own_key is None and config.secret_key_file is None and isinstance(running_key, str) and running_key:
        differences.append(f"signing key {running_key}, while no --secret-key-file was given here")
    if differences:
        details["differences"] = differences
        return CheckResult("daemon", WARNING,
                           f"peernix {document.get('version')} answers at {cache_info.url}, but runs with other"
                           f" settings than the doctor was given: {'; '.join(differences)}.",
                           "give peernix doctor the daemon's own options (e.g. --config FILE), or restart the"
                           " daemon with the settings wanted.", details)
    return CheckResult("daemon", OK, f"peernix {document.get('version')} answers at {cache_info.url}"
                       f" (priority {fields.get('Priority', '?')}).", None, details)


def check_substituter(facts: Facts) -> CheckResult:
    """nix.conf lists this daemon as a substituter, without ``?trusted=1`` and not in ``trusted-substituters``."""
    unavailable = _nix_conf_unavailable("substituter", facts)
    if unavailable is not None:
        return unavailable
    nix_conf = facts.nix_conf
    assert nix_conf is not None
    config = facts.config
    hosts = daemon_hosts(config, facts.host_addresses, facts.host_names)
    wanted = cache_url(config)
    details: dict[str, Any] = {"nix_conf": nix_conf.path, "files": list(nix_conf.files),
                               "substituters": nix_conf.substituters,
                               "trusted_substituters": nix_conf.trusted_substituters}
    add = (f"put it first: substituters = {wanted} https://cache.nixos.org in {nix_conf.path}"
           " (NixOS: nix.settings.substituters), then restart nix-daemon.")
    trusted_listed = [u for u in nix_conf.trusted_substituters
                      if reaches_daemon(parse_store_url(u), config, hosts)]
    found = find_peernix(nix_conf, config, hosts)
    if found is None:
        where = nix_conf.path if nix_conf.exists else f"{nix_conf.path} (missing: Nix's defaults apply)"
        near = [why for why in (_near_miss(parse_store_url(u), config, hosts) for u in nix_conf.substituters) if why]
        summary = f"{where} does not list peernix as a substituter, so Nix never asks it."
        if trusted_listed:
            summary += (f" It is only in trusted-substituters ({' '.join(trusted_listed)}), which lets"
                        " unprivileged users add it but does not make Nix use it.")
        if near:
            summary += " " + "; ".join(near) + "."
        return CheckResult("substituter", PROBLEM, summary, add, details)
    details["peernix"] = found.url
    if found.trusted:
        return CheckResult("substituter", PROBLEM,
                           f"peernix is listed as {found.url}: with trusted=1 Nix skips signature checks"
                           " for it and accepts unsigned paths from any machine on the LAN.",
                           f"remove the query string: substituters = {found.without_params} ...,"
                           " then restart nix-daemon; peernix passes only signed paths on, and Nix"
                           " checks the signatures itself.", details)
    if trusted_listed:
        return CheckResult("substituter", PROBLEM,
                           f"peernix is in trusted-substituters ({' '.join(trusted_listed)}): that list"
                           " names the caches unprivileged users may switch on for themselves (with ?trusted=1"
                           " there, without signature checks); peernix is trusted for nothing, only the"
                           " signatures on its paths are, and it belongs in substituters alone.",
                           "remove it from trusted-substituters (keep it in substituters), then restart"
                           " nix-daemon.", details)
    probe = facts.substituter_probe
    if probe is not None and not probe.ok:
        details["probe"] = probe.describe()
        return CheckResult("substituter", PROBLEM,
                           f"nix.conf lists {found.url}, but {probe.url} answers {probe.describe()}"
                           " (localhost may be ::1 while the daemon listens on IPv4 only).",
                           f"use {wanted} in nix.conf, or make the daemon listen there.", details)
    return CheckResult("substituter", OK, f"nix.conf lists peernix as {found.url}, without trusted=1.",
                       None, details)


def check_priority(facts: Facts) -> CheckResult:
    """peernix comes before cache.nixos.org in Nix's order: by priority, ties in listed order."""
    unavailable = _nix_conf_unavailable("priority", facts)
    if unavailable is not None:
        return unavailable
    nix_conf = facts.nix_conf
    assert nix_conf is not None
    config = facts.config
    hosts = daemon_hosts(config, facts.host_addresses, facts.host_names)
    urls = [parse_store_url(u) for u in nix_conf.substituters]
    peernix = next((i for i, u in enumerate(urls) if reaches_daemon(u, config, hosts)), None)
    if peernix is None:
        return CheckResult("priority", SKIPPED, "peernix is not a substituter (see the substituter check).")
    # peernix's own priority: ?priority=, else what its nix-cache-info says,
    # else (daemon not answering) what its configuration makes it say.
    advertised: int | None = None
    if facts.cache_info is not None and facts.cache_info.ok:
        text = parse_cache_info(facts.cache_info.body).get("Priority", "")
        advertised = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
    source = "its nix-cache-info" if advertised is not None else "its configuration (--priority)"
    own = urls[peernix].priority
    peernix_priority = own if own is not None else advertised if advertised is not None else config.priority
    if own is not None:
        source = "?priority= in nix.conf"
    details: dict[str, Any] = {"peernix": urls[peernix].url, "peernix_priority": peernix_priority,
                               "peernix_priority_from": source}
    cno = next((i for i, u in enumerate(urls) if is_cache_nixos_org(u)), None)
    if cno is None:
        return CheckResult("priority", OK, f"peernix has priority {peernix_priority} (from {source});"
                           " cache.nixos.org is not a substituter here.", None, details)
    cno_override = urls[cno].priority
    cno_priority = cno_override if cno_override is not None else CACHE_NIXOS_ORG_PRIORITY
    details.update(cache_nixos_org=urls[cno].url, cache_nixos_org_priority=cno_priority)
    # Nix sorts substituters by priority with a stable sort (std::list::sort):
    # equal priorities keep the order nix.conf lists them in.
    first = (peernix_priority, peernix) < (cno_priority, cno)
    compared = f"peernix {peernix_priority} (from {source}) vs cache.nixos.org {cno_priority}"
    if first:
        return CheckResult("priority", OK, f"Nix asks peernix before cache.nixos.org ({compared}).", None, details)
    why = "a tie, and cache.nixos.org is listed first" if peernix_priority == cno_priority else "lower is asked first"
    return CheckResult("priority", PROBLEM,
                       f"Nix asks cache.nixos.org before peernix ({compared}; {why}), so every path it"
                       " has comes from the internet and the LAN is never used for them.",
                       f"give peernix a lower priority than {cno_priority} (drop ?priority= from its URL or use"
                       f" {urls[peernix].without_params}?priority=30) and list it first, then restart nix-daemon.",
                       details)


def _parse_keys(items: Iterable[str]) -> tuple[list[PublicKey], list[str]]:
    keys, bad = [], []
    for item in items:
        try:
            keys.append(parse_public_key(item))
        except KeyFormatError:
            bad.append(item)
    return keys, bad


def node_key(facts: Facts) -> PublicKey | None:
    """
    :returns: this node's public key: the one of ``--secret-key-file``, else
        the one the running daemon reports in ``/status.json``, else ``None``
        (the node does not sign).
    """
    if facts.own_key is not None:
        return facts.own_key
    document = facts.status.json() if facts.status is not None else None
    text = document.get("public_key") if isinstance(document, Mapping) else None
    if isinstance(text, str) and text:
        try:
            return parse_public_key(text)
        except KeyFormatError:
            return None
    return None


def check_trusted_keys(facts: Facts) -> CheckResult:
    """``trusted-public-keys`` holds cache.nixos.org's key and, when this node signs, its own."""
    unavailable = _nix_conf_unavailable("trusted-keys", facts)
    if unavailable is not None:
        return unavailable
    nix_conf = facts.nix_conf
    assert nix_conf is not None
    keys, bad = _parse_keys(nix_conf.trusted_public_keys)
    # Nix keeps the first key of each name (keys.cc uses emplace).
    by_name: dict[str, PublicKey] = {}
    for key in keys:
        by_name.setdefault(key.name, key)
    details: dict[str, Any] = {"trusted_public_keys": [k.to_string() for k in keys], "unparsable": bad}
    problems: list[str] = []
    warnings: list[str] = []
    fixes: list[str] = []
    cno = parse_public_key(CACHE_NIXOS_ORG_KEY)
    have = by_name.get(cno.name)
    if have is None:
        problems.append("cache.nixos.org's key is missing, so Nix rejects every path signed by it,"
                        " from the internet and from peers alike")
        fixes.append(f"add {CACHE_NIXOS_ORG_KEY} to trusted-public-keys")
    elif have.key != cno.key:
        problems.append(f"the key named {cno.name} is not cache.nixos.org's")
        fixes.append(f"replace it with {CACHE_NIXOS_ORG_KEY}")
    own = node_key(facts)
    if own is not None:
        mine = by_name.get(own.name)
        if mine is None:
            warnings.append(f"this node's own key {own.name} is missing, so paths this machine built come"
                            " back from peers (after a garbage collection) only by being rebuilt")
            fixes.append(f"add {own.to_string()} to trusted-public-keys")
        elif mine.key != own.key:
            problems.append(f"nix.conf trusts another key under this node's key name {own.name}:"
                            " Nix rejects this node's signatures")
            fixes.append(f"replace that key with {own.to_string()}, or make this node a key with a name of"
                         " its own (nix-store --generate-binary-cache-key \"$(hostname)-peernix-1\" ...)")
    if bad:
        warnings.append(f"unparsable keys are ignored by Nix: {' '.join(bad)}")
        fixes.append("remove or correct them")
    fix_text = ("; ".join(fixes) + " in nix.conf, then restart nix-daemon.") if fixes else None
    if problems:
        return CheckResult("trusted-keys", PROBLEM, "; ".join(problems + warnings) + ".", fix_text, details)
    if warnings:
        return CheckResult("trusted-keys", WARNING, "; ".join(warnings) + ".", fix_text, details)
    names = ", ".join(by_name)
    signing = "" if own is not None else " (this node does not sign: no own key to trust)"
    return CheckResult("trusted-keys", OK, f"trusted-public-keys holds the keys needed: {names}{signing}.",
                       None, details)


def _peer_rows(document: Any) -> list[Mapping[str, Any]] | None:
    """:returns: the peer rows of a ``/status.json`` document, ``None`` when it has no peer table."""
    if not isinstance(document, Mapping):
        return None
    peers = document.get("peers")
    if not isinstance(peers, list):
        return None
    return [p for p in peers if isinstance(p, Mapping) and isinstance(p.get("url"), str)]


def check_key_names(own_key: PublicKey | None, status_document: Any,
                    trusted_public_keys: Sequence[str] = (),
                    peer_documents: Mapping[str, Any] | None = None) -> CheckResult:
    """
    No two nodes sign with keys of the same name (Nix trusts one key per
    name and silently rejects the other's signatures): this node's key
    against the keys its peers announce, the peers' keys among themselves,
    and both against ``trusted-public-keys``.

    :param own_key: this node's public key, if it signs.
    :param status_document: the daemon's ``/status.json`` (its peer table
        carries each peer's announced ``public_key``), ``None`` if unknown.
    :param trusted_public_keys: nix.conf's ``trusted-public-keys``.
    :param peer_documents: each peer's own ``/status.json`` by its URL
        (its ``public_key`` is the key it signs with: static peers announce
        none over UDP).
    """
    rows = _peer_rows(status_document)
    if rows is None:
        return CheckResult("key-names", UNKNOWN,
                           "cannot collect the keys peers announce: the daemon's /status.json did not answer.",
                           "start the daemon (see the daemon check).")
    holders: dict[str, dict[bytes, list[str]]] = {}
    if own_key is not None:
        holders.setdefault(own_key.name, {}).setdefault(own_key.key, []).append("this node")
    announced = 0
    documents = peer_documents or {}
    for row in rows:
        url = str(row["url"])
        texts = {row.get("public_key")}
        document = documents.get(url)
        if isinstance(document, Mapping):
            texts.add(document.get("public_key"))
        counted = False
        for text in texts:
            if not isinstance(text, str) or not text:
                continue
            try:
                key = parse_public_key(text)
            except KeyFormatError:
                continue
            nodes = holders.setdefault(key.name, {}).setdefault(key.key, [])
            if url not in nodes:
                nodes.append(url)
            counted = True
        announced += counted
    trusted, _bad = _parse_keys(trusted_public_keys)
    trusted_by_name: dict[str, PublicKey] = {}
    for trusted_key in trusted:
        trusted_by_name.setdefault(trusted_key.name, trusted_key)
    clashes: list[str] = []
    for name, keys in sorted(holders.items()):
        if len(keys) > 1:
            who = "; ".join(", ".join(nodes) for nodes in keys.values())
            clashes.append(f"key name {name!r} is used with {len(keys)} different keys ({who})")
        known = trusted_by_name.get(name)
        if known is not None:
            for raw, nodes in keys.items():
                if raw != known.key and "this node" not in nodes:
                    clashes.append(f"{', '.join(nodes)} announce(s) a key named {name!r} that is not the one"
                                   " nix.conf trusts under that name")
    details: dict[str, Any] = {"peers_announcing_keys": announced,
                               "names": {name: len(keys) for name, keys in sorted(holders.items())}}
    if clashes:
        return CheckResult("key-names", PROBLEM,
                           "; ".join(clashes) + ": Nix trusts one key per name and rejects the other"
                           " signatures.",
                           "give each machine a key with a name of its own: nix-store"
                           " --generate-binary-cache-key \"$(hostname)-peernix-1\" SECRET PUBLIC, and trust"
                           " the new public keys.", details)
    if own_key is not None and own_key.name == SHARED_KEY_NAME:
        return CheckResult("key-names", WARNING,
                           f"this node's key is named {SHARED_KEY_NAME!r}, the shared default of zw3rk/peernix:"
                           " no peer uses it with another key yet, but every Go node does by default.",
                           "make a key with a name unique to this host: nix-store --generate-binary-cache-key"
                           " \"$(hostname)-peernix-1\" SECRET PUBLIC.", details)
    return CheckResult("key-names", OK,
                       f"no key name is shared by different keys ({announced} peer key(s) known).",
                       None, details)


def check_negative_ttl(facts: Facts) -> CheckResult:
    """``narinfo-cache-negative-ttl``: how long Nix remembers that a substituter lacked a path."""
    unavailable = _nix_conf_unavailable("negative-ttl", facts)
    if unavailable is not None:
        return unavailable
    nix_conf = facts.nix_conf
    assert nix_conf is not None
    text = nix_conf.value("narinfo-cache-negative-ttl") or str(NIX_DEFAULT_NEGATIVE_TTL)
    explicit = nix_conf.is_set("narinfo-cache-negative-ttl")
    details: dict[str, Any] = {"narinfo_cache_negative_ttl": text, "set_in_nix_conf": explicit}
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        return CheckResult("negative-ttl", PROBLEM,
                           f"narinfo-cache-negative-ttl = {text!r} is not a number of seconds: Nix refuses it.",
                           "set narinfo-cache-negative-ttl = 60 in nix.conf.", details)
    ttl = int(text)
    trade_off = ("after a miss, Nix does not ask any substituter for that path again for this long, so a path"
                 " a peer got a minute later is still downloaded from the internet or built here;"
                 " a short TTL costs one small request per miss instead")
    fix = "set narinfo-cache-negative-ttl = 60 in nix.conf (NixOS: nix.settings), then restart nix-daemon."
    if ttl >= NIX_DEFAULT_NEGATIVE_TTL:
        which = "Nix's default" if ttl == NIX_DEFAULT_NEGATIVE_TTL else "longer than Nix's default"
        return CheckResult("negative-ttl", WARNING, f"narinfo-cache-negative-ttl is {ttl} s ({which}): {trade_off}.",
                           fix, details)
    return CheckResult("negative-ttl", OK,
                       f"narinfo-cache-negative-ttl is {ttl} s: Nix asks again for a path that was missing"
                       f" after {ttl} s.", None, details)


def parse_version(text: str) -> tuple[int, ...] | None:
    """:returns: the numeric parts of a Nix version (``2.8.0`` -> ``(2, 8, 0)``), ``None`` if none."""
    match = re.search(r"\b(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def check_nix_version(output: str | None, error: str | None = None) -> CheckResult:
    """
    The local Nix's version and what it means for peernix.

    :param output: what ``nix-store --version`` (or ``nix --version``) printed.
    :param error: why neither could run.
    """
    if output is None:
        return CheckResult("nix-version", UNKNOWN, f"cannot tell the Nix version: {error or 'nix-store not found'}.",
                           "put nix-store on PATH (the doctor runs nix-store --version).")
    version = parse_version(output)
    first_line = output.strip().splitlines()[0] if output.strip() else ""
    if version is None:
        return CheckResult("nix-version", UNKNOWN, f"cannot read a version in {first_line!r}.")
    shown = ".".join(str(v) for v in version)
    details: dict[str, Any] = {"version": shown, "accept_encoding": version >= (2, 14),
                               "resumes": version >= (2, 3), "unauthorized_is_error": version >= (2, 35)}
    resume = ("resumes an interrupted NAR download with a Range request when the answer was identity bytes with"
              " Accept-Ranges: bytes, which is what peernix sends local clients")
    if version < (2, 14):
        return CheckResult("nix-version", WARNING,
                           f"Nix {shown} sends no Accept-Encoding (only 2.14 and later do), so nothing is"
                           f" compressed on the wire to it (loopback: no matter); it {resume}.",
                           "upgrade Nix (2.14 or later asks for compressed transfers; 2.24 is current).",
                           details)
    notes = [f"Nix {shown} sends Accept-Encoding", f"it {resume}"]
    if version <= (2, 30):
        notes.append("it breaks on Content-Encoding: identity, which peernix never sends")
    if version >= (2, 35):
        notes.append("it treats 401 as a hard error instead of a miss; peernix never answers 401")
    return CheckResult("nix-version", OK, "; ".join(notes) + ".", None, details)


def check_peers(status_document: Any) -> CheckResult:
    """Peers known, and healthy."""
    rows = _peer_rows(status_document)
    if rows is None:
        if isinstance(status_document, Mapping) and status_document.get("peers", ...) is None:
            return CheckResult("peers", SKIPPED, "the daemon has no peer side (it only serves its own store).")
        return CheckResult("peers", UNKNOWN, "cannot list peers: the daemon's /status.json did not answer.",
                           "start the daemon (see the daemon check).")
    if not rows:
        return CheckResult("peers", WARNING,
                           "no peers known yet: every path this machine lacks comes from the internet.",
                           "run peernix on the other machines of the LAN; open TCP and UDP port 9999 (and UDP"
                           " 5353 for mDNS) in the firewalls; list machines in other subnets with --peer"
                           " http://HOST:9999.", {"peers": []})
    unhealthy = [row for row in rows if not row.get("healthy", False)]
    details = {"peers": [{"url": row["url"], "healthy": bool(row.get("healthy")),
                          "failures": row.get("failures")} for row in rows]}
    if unhealthy:
        names = ", ".join(f"{row['url']} ({_failures(row)})" for row in unhealthy)
        return CheckResult("peers", WARNING,
                           f"{len(rows)} peer(s) known, {len(unhealthy)} not answering: {names}.",
                           "check that those machines run peernix and that their firewall lets TCP port 9999 in.",
                           details)
    return CheckResult("peers", OK, f"{len(rows)} peer(s) known, all healthy: "
                       + ", ".join(str(row["url"]) for row in rows) + ".", None, details)


def _failures(row: Mapping[str, Any]) -> str:
    failures = row.get("failures")
    if isinstance(failures, Mapping) and failures:
        return ", ".join(f"{kind} {count}" for kind, count in sorted(failures.items()))
    return "backing off"


def _host_of(url: str) -> tuple[str, int | None]:
    parsed = parse_store_url(url)
    return _normal_address(parsed.host), parsed.port


def lists_us(peer_url: str, peer_document: Any, config: Config,
             host_addresses: Iterable[str], host_names: Iterable[str]) -> bool | None:
    """
    :returns: whether the peer's ``/status.json`` lists this node (one of
        its addresses or names, its port) among its peers; ``None`` when the
        document has no peer table.  A peer on this very machine (at a
        loopback address) reaches us at loopback addresses too.
    """
    rows = _peer_rows(peer_document)
    if rows is None:
        return None
    ours = {_normal_address(a) for a in host_addresses} | {_normal_address(n) for n in host_names if n}
    if config.interface not in (None, "::", "0.0.0.0"):
        ours = {_normal_address(config.interface)}
    peer_host, _ = _host_of(peer_url)
    same_machine = _is_loopback(peer_host) or peer_host in ours
    for row in rows:
        host, port = _host_of(str(row["url"]))
        if port != config.port:
            continue
        if host in ours or (same_machine and _is_loopback(host)):
            return True
    return False


def serves_peers(config: Config) -> bool:
    """
    :returns: whether this node serves its peers: not when consume-only
        (``--serve-peers no``, where that setting exists).
    """
    value = getattr(config, "serve_peers", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("no", "false", "off", "0")
    return bool(value)


def check_reached_by_peers(facts: Facts) -> CheckResult:
    """Each known peer has this node in its registry (asked at its ``/status.json``)."""
    if not serves_peers(facts.config):
        return CheckResult("reached-by-peers", SKIPPED,
                           "this node serves no peers (--serve-peers no): they are not meant to ask it.")
    rows = _peer_rows(facts.status.json() if facts.status is not None else None)
    if rows is None:
        return CheckResult("reached-by-peers", UNKNOWN, "cannot tell: the daemon's peer table is unknown.")
    if not rows:
        return CheckResult("reached-by-peers", SKIPPED, "no peers known (see the peers check).")
    reach: list[str] = []
    missing: list[str] = []
    unknown: list[str] = []
    for row in rows:
        url = str(row["url"])
        answer = facts.peer_statuses.get(url)
        if answer is None:
            unknown.append(f"{url} (not asked)")
            continue
        verdict = lists_us(url, answer.json(), facts.config, facts.host_addresses, facts.host_names)
        if verdict is None:
            unknown.append(f"{url} ({answer.describe() if not answer.ok else 'no peer table in its status.json'})")
        elif verdict:
            reach.append(url)
        else:
            missing.append(url)
    details = {"reach_us": reach, "do_not_list_us": missing, "unknown": unknown}
    if missing:
        return CheckResult("reached-by-peers", WARNING,
                           f"{len(missing)} peer(s) do not list this node, so they never ask it: "
                           f"{', '.join(missing)}.",
                           f"let TCP port {facts.config.port} and UDP port {facts.config.effective_udp_port} in"
                           " through this machine's firewall, or list this machine on them with --peer.",
                           details)
    if unknown and not reach:
        return CheckResult("reached-by-peers", UNKNOWN,
                           "cannot tell whether peers reach this node: " + ", ".join(unknown) + ".", None, details)
    summary = f"{len(reach)} peer(s) list this node"
    if unknown:
        summary += "; cannot tell for " + ", ".join(unknown)
    return CheckResult("reached-by-peers", OK, summary + ".", None, details)


def parse_proc_net(text: str, *, listening_only: bool) -> set[tuple[str, int]]:
    """
    :param text: ``/proc/net/{tcp,tcp6,udp,udp6}``.
    :param listening_only: keep only sockets in state LISTEN (``0A``), for TCP.
    :returns: ``(address, port)`` of each socket's local end.
    """
    found: set[tuple[str, int]] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        if listening_only and fields[3] != "0A":
            continue
        hex_address, _, hex_port = fields[1].rpartition(":")
        try:
            raw = bytes.fromhex(hex_address)
            port = int(hex_port, 16)
        except ValueError:
            continue
        # The kernel prints each 32-bit word in host (little-endian) order.
        if len(raw) not in (4, 16):
            continue
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        address = ipaddress.ip_address(words)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        found.add((address.compressed, port))
    return found


def check_ports(config: Config, sockets: Sockets | None, error: str | None = None) -> CheckResult:
    """The TCP port (HTTP) listens and the UDP port (announcements, queries) is bound, on which addresses."""
    if sockets is None:
        return CheckResult("ports", UNKNOWN, f"cannot read the bound sockets: {error or 'unknown'}.")
    tcp = sorted(a for a, p in sockets.tcp_listening if p == config.port)
    udp_port = config.effective_udp_port
    udp = sorted(a for a, p in sockets.udp_bound if p == udp_port)
    details = {"tcp_port": config.port, "tcp_addresses": tcp, "udp_port": udp_port, "udp_addresses": udp}
    if not tcp:
        return CheckResult("ports", PROBLEM, f"nothing listens on TCP port {config.port} (the daemon is not"
                           " running, or runs in another network namespace).",
                           "start the daemon (see the daemon check).", details)
    notes = []
    if all(_is_loopback(a) for a in tcp):
        notes.append(f"TCP port {config.port} listens on loopback only ({', '.join(tcp)}): peers cannot reach it")
    if not udp:
        notes.append(f"nothing is bound to UDP port {udp_port}: announcements and has_path queries go unheard")
    if notes:
        return CheckResult("ports", WARNING, "; ".join(notes) + ".",
                           "run the daemon without --interface (or on a LAN address) and with its UDP port free.",
                           details)
    return CheckResult("ports", OK, f"TCP {config.port} listens on {', '.join(tcp)}; UDP {udp_port} is bound on"
                       f" {', '.join(udp)}.", None, details)


#: The command-line flag of the LAN fetch feature's list of upstreams
#: (``--upstream URL``, repeatable; ``--upstream none`` turns it off).
UPSTREAM_FLAG = "upstream"


def upstream_setting() -> str | None:
    """
    :returns: the :class:`Config` attribute of ``--upstream`` in
        :data:`~peernix.options.SETTINGS`, ``None`` while peernix has no
        LAN fetch (the upstreams check then does not apply).
    """
    return next((s.name for s in SETTINGS if s.flag == UPSTREAM_FLAG), None)


def configured_upstreams(config: Config, nix_conf: NixConf | None,
                         hosts: set[str]) -> list[str] | None:
    """
    :returns: the upstreams the daemon fetches from for the LAN: the
        setting's value, or by default the local Nix's substituters minus
        this daemon; ``None`` when the feature does not exist or is off.
    """
    name = upstream_setting()
    if name is None:
        return None
    value = getattr(config, name, None)
    if value is not None:
        items = [str(v) for v in value]
        if not items or any(v.strip().lower() == "none" for v in items):
            return None
        return items
    if nix_conf is None:
        return []
    return [u for u in nix_conf.substituters if not reaches_daemon(parse_store_url(u), config, hosts)]


def check_upstreams(facts: Facts) -> CheckResult:
    """The upstream caches answer, where the LAN fetch feature is on."""
    if upstream_setting() is None:
        return CheckResult("upstreams", SKIPPED, "not applicable: this peernix has no LAN fetch (--upstream).")
    hosts = daemon_hosts(facts.config, facts.host_addresses, facts.host_names)
    upstreams = configured_upstreams(facts.config, facts.nix_conf, hosts)
    if upstreams is None:
        return CheckResult("upstreams", SKIPPED, "LAN fetch is off (--upstream none).")
    if not upstreams:
        return CheckResult("upstreams", WARNING, "LAN fetch has no upstream to fetch from.",
                           "list the caches with --upstream URL, or as substituters in nix.conf.")
    failing = []
    for url in upstreams:
        answer = facts.upstream_probes.get(url)
        if answer is None or not answer.ok:
            failing.append(f"{url} ({answer.describe() if answer is not None else 'not asked'})")
    details = {"upstreams": upstreams, "failing": failing}
    if failing:
        return CheckResult("upstreams", WARNING, "upstream(s) not answering nix-cache-info: " + ", ".join(failing)
                           + "; clients then fetch from their own next substituter.",
                           "check this machine's internet access and proxy settings.", details)
    return CheckResult("upstreams", OK, "every upstream answers: " + ", ".join(upstreams) + ".", None, details)


def run_checks(facts: Facts) -> list[CheckResult]:
    """:returns: every check's result, in the order they are printed."""
    status_document = facts.status.json() if facts.status is not None else None
    trusted = facts.nix_conf.trusted_public_keys if facts.nix_conf is not None else ()
    return [
        check_config(facts),
        check_daemon(facts.config, facts.cache_info, facts.status, facts.own_key),
        check_substituter(facts),
        check_priority(facts),
        check_trusted_keys(facts),
        check_key_names(node_key(facts), status_document, trusted,
                        {url: answer.json() for url, answer in facts.peer_statuses.items()}),
        check_negative_ttl(facts),
        check_nix_version(facts.nix_version_output, facts.nix_version_error),
        check_peers(status_document),
        check_reached_by_peers(facts),
        check_ports(facts.config, facts.sockets, facts.sockets_error),
        check_upstreams(facts),
    ]


def has_problem(results: Iterable[CheckResult]) -> bool:
    """:returns: whether some result is a problem (``peernix doctor`` then exits 1)."""
    return any(r.status == PROBLEM for r in results)


def report_document(results: Sequence[CheckResult]) -> dict[str, Any]:
    """:returns: the ``--json`` document: ``ok`` (no problem), counts by status, and every check."""
    counts = {status: sum(1 for r in results if r.status == status) for status in STATUSES}
    return {"ok": not has_problem(results), "counts": counts, "checks": [r.document() for r in results]}
