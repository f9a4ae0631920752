"""
The I/O shell of ``peernix doctor``: gather the :class:`~peernix.doctor.Facts`.

Plain blocking code for a command-line tool: files, ``/proc/net``, one
``nix-store --version`` and a few HTTP GETs, every one bounded in time
(``timeout`` seconds each, peers asked in parallel) and in size
(:data:`MAX_BODY` bytes).  HTTP goes straight to the address asked, never
through a proxy from the environment: everything asked is this machine, a
LAN peer or an upstream the daemon itself would ask.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import socket
import subprocess
import urllib.error
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import peernix
from peernix.discovery.addresses import host_addresses as read_host_addresses
from peernix.doctor import (Facts, HttpAnswer, Sockets, configured_upstreams, daemon_hosts, find_peernix,
                            parse_proc_net, parse_store_url)
from peernix.nix.signing import KeyFormatError, PublicKey, load_secret_key_file
from peernix.nixconf import NixConf, NixConfError, NixConfUnreadable, Opener, nix_conf_path, read_nix_conf
from peernix.options import Config

#: The largest body read from any answer (a status page of a big LAN is a
#: few hundred KiB).
MAX_BODY = 2 * 1024 * 1024

#: Peers asked for their status at most (the registry is capped anyway).
MAX_PEERS_ASKED = 64

#: Seconds each HTTP request may take by default.
DEFAULT_TIMEOUT = 3.0

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answers to report (the 30x status), never followed: only the address asked is asked."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

#: GETs a URL: ``(url, timeout) -> HttpAnswer``.
HttpGet = Callable[[str, float], HttpAnswer]


def _read_body(response: Any, deadline: float, timeout: float) -> bytes:
    """
    :returns: at most :data:`MAX_BODY` bytes of ``response``'s body.
    :raises TimeoutError: when the body has not come whole by ``deadline``
        (a peer trickling bytes must not hold the doctor up).
    """
    read = getattr(response, "read1", None) or response.read
    chunks: list[bytes] = []
    size = 0
    while size < MAX_BODY:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the body did not come within {timeout:g} s")
        chunk = read(min(64 * 1024, MAX_BODY - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def http_get(url: str, timeout: float = DEFAULT_TIMEOUT) -> HttpAnswer:
    """
    GET ``url`` without any proxy; never raises.

    Bounded: connecting and each read wait at most ``timeout``, and the
    body must have come whole ``timeout`` seconds after the request began
    (so at most about twice ``timeout`` in all); at most :data:`MAX_BODY`
    bytes are read.

    :returns: the status and the body, or the reason nothing answered.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": f"peernix-doctor/{peernix.__version__}"})
    try:
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return HttpAnswer(url, response.status, _read_body(response, deadline, timeout))
        except urllib.error.HTTPError as e:
            with e:
                return HttpAnswer(url, e.code, _read_body(e, deadline, timeout))
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            return HttpAnswer(url, error=f"no answer within {timeout:g} s")
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        return HttpAnswer(url, error=text.lower())
    except TimeoutError as e:
        return HttpAnswer(url, error=str(e) if str(e).startswith("the body") else f"no answer within {timeout:g} s")
    except (OSError, ValueError, http.client.HTTPException) as e:
        return HttpAnswer(url, error=str(e) or type(e).__name__)


def daemon_base_url(config: Config) -> str:
    """:returns: where this machine reaches the daemon: loopback, or ``--interface`` when it listens on one address."""
    host = config.interface
    if host is None or host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def read_sockets(read: Callable[[str], str] | None = None) -> Sockets:
    """
    :param read: reads a file as text (tests pass fixed contents).
    :returns: the listening TCP and bound UDP sockets of ``/proc/net``;
        a missing IPv6 table (IPv6 off) counts as empty.
    :raises OSError: when ``/proc/net/tcp`` cannot be read (not Linux).
    """
    def default_read(path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    reader = read or default_read

    def table(name: str, required: bool) -> str:
        try:
            return reader(f"/proc/net/{name}")
        except FileNotFoundError:
            if required:
                raise
            return ""

    tcp = parse_proc_net(table("tcp", True), listening_only=True) | parse_proc_net(
        table("tcp6", False), listening_only=True)
    udp = parse_proc_net(table("udp", True), listening_only=False) | parse_proc_net(
        table("udp6", False), listening_only=False)
    return Sockets(frozenset(tcp), frozenset(udp))


def nix_version(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
                timeout: float = 10.0) -> tuple[str | None, str | None]:
    """
    :returns: ``(output, None)`` of ``nix-store --version`` (else ``nix
        --version``), or ``(None, why)`` when neither runs.
    """
    errors = []
    for argv in (["nix-store", "--version"], ["nix", "--version"]):
        try:
            result = run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            errors.append(f"{argv[0]} not found on PATH")
            continue
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{argv[0]}: {e}")
            continue
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout, None
        errors.append(f"{' '.join(argv)} exited with {result.returncode}")
    return None, "; ".join(errors)


def _read_config_file_access(path: str) -> str | None:
    """:returns: why ``path`` cannot be opened for lack of permission, else ``None``."""
    try:
        with open(path, "rb"):
            return None
    except PermissionError as e:
        return f"cannot read {path}: {e.strerror}"
    except OSError:
        return None


def gather(config: Config, *, config_error: str | None = None, timeout: float = DEFAULT_TIMEOUT,
           env: Mapping[str, str] = os.environ, get: HttpGet = http_get,
           opener: Opener | None = None,
           run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
           read_proc: Callable[[str], str] | None = None,
           addresses: tuple[str, ...] | None = None) -> Facts:
    """
    Gather what the checks judge.  Blocking; bounded by ``timeout`` per
    HTTP request (peers and upstreams are asked in parallel).

    :param config: the daemon's settings, as the command line and config
        file give them.
    :param config_error: why the config file could not be used, if so.
    :param env: for ``$NIX_CONF_DIR``.
    :param get, opener, run, read_proc, addresses: the I/O, injectable.
    """
    values: dict[str, object] = {"config": config}
    if config_error is not None:
        denied = _read_config_file_access(config.config_file) if config.config_file else None
        if denied is not None:
            values["config_unreadable"] = denied
        else:
            values["config_error"] = config_error

    own_key: PublicKey | None = None
    if config.secret_key_file is not None:
        try:
            own_key = load_secret_key_file(config.secret_key_file).public_key
        except KeyFormatError as e:
            try:
                with open(config.secret_key_file, "rb"):
                    pass
            except PermissionError as denied_error:
                values["own_key_unreadable"] = f"cannot read {config.secret_key_file}: {denied_error.strerror}"
            except OSError:
                values["own_key_error"] = str(e)
            else:
                values["own_key_error"] = str(e)
    values["own_key"] = own_key

    nix_conf: NixConf | None = None
    path = nix_conf_path(env=env)
    try:
        nix_conf = read_nix_conf(path, opener) if opener is not None else read_nix_conf(path)
    except NixConfUnreadable as e:
        values["nix_conf_unreadable"] = str(e)
    except NixConfError as e:
        values["nix_conf_error"] = str(e)
    values["nix_conf"] = nix_conf

    host_addresses = addresses if addresses is not None else tuple(read_host_addresses())
    host_names = tuple({socket.gethostname(), socket.getfqdn()} - {""})
    values["host_addresses"] = host_addresses
    values["host_names"] = host_names
    hosts = daemon_hosts(config, host_addresses, host_names)

    base = daemon_base_url(config)
    values["cache_info"] = get(f"{base}/nix-cache/nix-cache-info", timeout)
    status = get(f"{base}/status.json", timeout)
    values["status"] = status

    if nix_conf is not None:
        found = find_peernix(nix_conf, config, hosts)
        if found is not None:
            # Only this machine is asked: the URL names one of its addresses.
            values["substituter_probe"] = get(f"{found.without_params.rstrip('/')}/nix-cache-info", timeout)

    output, error = nix_version(run)
    values["nix_version_output"] = output
    values["nix_version_error"] = error

    document = status.json()
    peer_urls: list[str] = []
    if isinstance(document, dict) and isinstance(document.get("peers"), list):
        peer_urls = [p["url"] for p in document["peers"]
                     if isinstance(p, dict) and isinstance(p.get("url"), str)
                     and parse_store_url(p["url"]).scheme in ("http", "https")][:MAX_PEERS_ASKED]
    upstreams = configured_upstreams(config, nix_conf, hosts) or []
    asks = {("peer", url): f"{url.rstrip('/')}/status.json" for url in peer_urls}
    asks.update({("upstream", url): f"{url.split('?', 1)[0].rstrip('/')}/nix-cache-info" for url in upstreams
                 if parse_store_url(url).scheme in ("http", "https")})
    answers: dict[tuple[str, str], HttpAnswer] = {}
    if asks:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(asks))) as pool:
            futures = {key: pool.submit(get, url, timeout) for key, url in asks.items()}
            for key, future in futures.items():
                answers[key] = future.result()
    values["peer_statuses"] = {url: answers[("peer", url)] for url in peer_urls}
    values["upstream_probes"] = {url: answers[("upstream", url)] for url in upstreams
                                 if ("upstream", url) in answers}

    try:
        values["sockets"] = read_sockets(read_proc)
    except OSError as e:
        values["sockets_error"] = f"{e.filename or '/proc/net'}: {e.strerror or e}"

    return Facts(**values)  # type: ignore[arg-type]
