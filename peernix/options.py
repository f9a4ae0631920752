"""
peernix's settings: one declarative table, and everything generated from it.

:data:`SETTINGS` lists every setting once.  From it come

* the command line (:class:`PeernixOptions`, a ``twisted.python.usage``
  parser: ``--port 9999``, repeatable ``--peer URL``, ``--no-mdns``),
* the TOML config file reader (:func:`read_config_file`: the same settings as
  snake_case keys, ``port = 9999``, ``peers = ["http://10.0.0.2:9999"]``),
* the documentation (:func:`render_settings_rst`),

and both parsers produce one immutable :class:`Config`.  The command line
wins over the file; a list given on the command line replaces the file's list.

Values are checked here, where the user typed them, so every error names the
option or key and says what is expected.  Whether the files named by
``--secret-key-file`` and the store exist is checked at start-up by the code
that opens them (:func:`peernix.service.build_service`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import attrs
from twisted.python import usage

from peernix.nix.signing import KeyFormatError, parse_public_key
from peernix.store.share import SHARE_MODES

#: An IP network as :func:`ipaddress.ip_network` returns it.
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The well-known peernix port (TCP for HTTP, UDP for announcements).
DEFAULT_PORT = 9999


class ConfigError(Exception):
    """
    A setting has a bad value, a config file cannot be read or parsed, or it
    has an unknown key.  The message is one line, meant for the user: it names
    the option or key and says what is wrong.
    """


# --------------------------------------------------------------------------
# Value types: how one value is read from the command line (text) and from
# TOML (a native value), checked, and shown in help and docs.


@attrs.frozen
class ValueType:
    """
    The kind of one setting's value.

    :ivar name: a short description for docs (``"port number"``).
    :ivar metavar: the placeholder shown in help (``"N"``, ``"URL"``).
    :ivar native: the TOML value types accepted in a config file.
    :ivar from_text: turns command-line text into a native value; raises
        :class:`ValueError` with a message for the user.
    :ivar check: validates and normalises a native value, returning the value
        :class:`Config` holds; raises :class:`ValueError` with a message.
    :ivar show: renders a value of :class:`Config` for help and docs.
    :ivar example: a TOML literal of a typical value, for the docs.
    """

    name: str
    metavar: str
    native: tuple[type, ...]
    from_text: Callable[[str], Any]
    check: Callable[[Any], Any]
    show: Callable[[Any], str] = str
    example: str = '"..."'


def _identity(value: Any) -> Any:
    return value


def _text_to_int(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def _text_to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None


def _text_to_bool(text: str) -> bool:
    # Only reached for a bool setting given a value, which the command line
    # never does (bools are --flag / --no-flag); kept total for the table.
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535 (0: any free port), got {value}")
    return value


def _check_priority(value: int) -> int:
    if value < 0:
        raise ValueError(f"expected a priority of 0 or more, got {value}")
    return value


def _check_seconds(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return value


def _check_address(value: str) -> str:
    literal = value.strip()
    if literal.startswith("[") and literal.endswith("]"):
        literal = literal[1:-1]
    try:
        return ipaddress.ip_address(literal).compressed
    except ValueError:
        raise ValueError(
            f"expected an IPv4 or IPv6 address such as 127.0.0.1 or ::1, got {value!r}"
        ) from None


def _check_path(value: str) -> str:
    if not value or "\0" in value:
        raise ValueError(f"expected a file or directory name, got {value!r}")
    # Absolute now, because twistd may change directory when it daemonises.
    return os.path.abspath(os.path.expanduser(value))


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_peer_url(value: str) -> str:
    """Normalise a static peer's base URL to ``http://host:port``."""
    hint = "expected a base URL such as http://192.0.2.7:9999 or http://[2001:db8::7]:9999"
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{hint} (IPv6 addresses go in brackets), got {value!r}"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{hint}, got {value!r} (the scheme must be http)")
    if parts.username is not None or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"{hint}, without a path, query or user name; got {value!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"{hint}, got {value!r} (no host)")
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise ValueError(f"{hint}, got {value!r} (not an IPv6 address in brackets)") from None
        if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in host.split(".")):
            raise ValueError(f"{hint}, got {value!r} (bad host name {host!r})") from None
        shown = host.lower()
    else:
        if address.version == 6 and not bracketed:
            raise ValueError(f"{hint}, got {value!r} (IPv6 addresses go in brackets)")
        shown = f"[{address.compressed}]" if address.version == 6 else address.compressed
    if port == 0:
        raise ValueError(f"{hint}, got {value!r} (port 0)")
    return f"{parts.scheme}://{shown}:{port if port is not None else DEFAULT_PORT}"


def _check_public_key(value: str) -> str:
    """Check a ``name:base64(32 bytes)`` Nix public key, as nix.conf holds them."""
    try:
        parse_public_key(value)
    except KeyFormatError as e:
        raise ValueError(str(e)) from None
    return value.strip()


def _check_network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"expected an address or network such as 192.168.1.0/24 or ::1/128, got {value!r}"
        ) from None


def _show_optional(none_means: str) -> Callable[[Any], str]:
    def show(value: Any) -> str:
        return none_means if value is None else str(value)

    return show


def _show_bool(value: Any) -> str:
    return "on" if value else "off"


PORT = ValueType("port number", "N", (int,), _text_to_int, _check_port, example="9999")
PRIORITY = ValueType("whole number", "N", (int,), _text_to_int, _check_priority, example="30")
SECONDS = ValueType("number of seconds", "SECONDS", (int, float), _text_to_float, _check_seconds,
                    example="60")
ADDRESS = ValueType("IP address", "ADDRESS", (str,), _identity, _check_address,
                    example='"192.0.2.1"')
DIRECTORY = ValueType("directory", "DIR", (str,), _identity, _check_path, example='"/"')
FILE = ValueType("file name", "FILE", (str,), _identity, _check_path,
                 example='"/etc/peernix/peernix.toml"')
PEER_URL = ValueType("peer URL", "URL", (str,), _identity, _check_peer_url,
                     example='"http://192.0.2.7:9999"')
PUBLIC_KEY = ValueType("public key", "NAME:KEY", (str,), _identity, _check_public_key,
                       example='"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="')
NETWORK = ValueType("network", "CIDR", (str,), _identity, _check_network, example='"10.0.0.0/8"')
BOOL = ValueType("boolean", "", (bool,), _text_to_bool, _identity, _show_bool, example="false")


def _check_count(value: int) -> int:
    if value < 1:
        raise ValueError(f"expected a whole number of 1 or more, got {value}")
    return value


COUNT = ValueType("whole number of 1 or more", "N", (int,), _text_to_int, _check_count, example="64")


#: The values of ``--log-format``: ``text`` (the runner's own log lines) or
#: ``json`` (one JSON object per line, see :mod:`peernix.logging`).
LOG_FORMATS = ("text", "json")


def _check_log_format(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return lowered


LOG_FORMAT = ValueType("log format: text or json", "FORMAT", (str,), _identity, _check_log_format,
                       example='"json"')

#: The values of ``--share`` (``trusted`` or ``all``) are defined by the
#: store, which implements them: :data:`peernix.store.share.SHARE_MODES`
#: (imported above).


def _check_share_mode(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in SHARE_MODES:
        raise ValueError(f"expected one of {', '.join(SHARE_MODES)}, got {value!r}")
    return lowered


SHARE_MODE = ValueType("share mode: trusted or all", "MODE", (str,), _identity, _check_share_mode,
                       example='"trusted"')

#: ``--upstream none``: fetch from no upstream at all.
UPSTREAM_NONE = "none"


def _check_upstream_url(value: str) -> str:
    """Normalise an upstream binary cache URL (``http(s)://host[:port][/path]``), or ``none``."""
    text = value.strip()
    if text.lower() == UPSTREAM_NONE:
        return UPSTREAM_NONE
    hint = "expected a binary cache URL such as https://cache.nixos.org, or none"
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port
    except ValueError:
        raise ValueError(f"{hint}, got {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{hint} (http or https only), got {value!r}")
    if parts.username is not None:
        raise ValueError(f"{hint}, without a user name, got {value!r}")
    # A query holds Nix store parameters (?priority=40), not part of the URL.
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def _check_size(value: int | str) -> int:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size of 0 or more bytes, got {value}")
        return value
    return parse_size(value)




def _check_domain(value: str) -> str:
    """Check a DNS domain for ``--dns-sd``: lower-cased, without the trailing dot."""
    name = value.strip().lower().rstrip(".")
    if (not name or len(name) > 253
            or not all(re.fullmatch(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", label) for label in name.split("."))):
        raise ValueError(f"expected a DNS domain such as example.com or lan.example.com, got {value!r}")
    return name


DOMAIN = ValueType("DNS domain", "DOMAIN", (str,), _identity, _check_domain,
                   example='"example.com"')


def _check_tailscale_tag(value: str) -> str:
    """Check a Tailscale ACL tag; ``peernix`` and ``tag:peernix`` both give ``tag:peernix``."""
    tag = value.strip()
    name = tag[len("tag:"):] if tag.startswith("tag:") else tag
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
        raise ValueError(f"expected a Tailscale tag such as tag:peernix, got {value!r}")
    return f"tag:{name}"


TAILSCALE_TAG = ValueType("Tailscale tag", "TAG", (str,), _identity, _check_tailscale_tag,
                          example='"tag:peernix"')


# Sizes and rates (``--max-upload-rate``; also meant for other byte-count
# settings such as a staging size): a number with an optional unit, ``K``,
# ``M``, ``G``, ``T`` for powers of 1000 and ``Ki``, ``Mi``, ``Gi``, ``Ti`` for
# powers of 1024, optionally followed by ``B`` (and ``/s`` for a rate).

_SIZE_UNITS: Mapping[str, int] = {
    "": 1,
    "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?)?\s*b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """
    Read a byte count: ``1500``, ``20M`` (20,000,000), ``1.5Gi``
    (1,610,612,736), ``512KiB``.  ``K``, ``M``, ``G``, ``T`` are powers of
    1000, ``Ki``, ``Mi``, ``Gi``, ``Ti`` powers of 1024 (case-insensitive);
    a trailing ``B`` is allowed.  Fractions are rounded down to whole bytes.

    :raises ValueError: with a message for the user.
    """
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"expected a number of bytes with an optional unit such as 500K, 20M, 1Gi, got {text!r}"
        )
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def parse_rate(text: str) -> int:
    """
    Read a rate in bytes per second: :func:`parse_size`'s syntax, with an
    optional ``/s`` (``20M``, ``20MB/s``, ``2.5Mi/s``).

    :raises ValueError: with a message for the user.
    """
    stripped = text.strip() if isinstance(text, str) else text
    if isinstance(stripped, str) and stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    try:
        return parse_size(stripped)
    except ValueError:
        raise ValueError(
            f"expected bytes per second with an optional unit such as 500K, 20M, 1Gi, got {text!r}"
        ) from None


def format_size(value: int) -> str:
    """:returns: ``value`` bytes in :func:`parse_size`'s syntax, exactly (``20M``, ``512Ki``, ``1500``)."""
    for unit in ("Ti", "T", "Gi", "G", "Mi", "M", "Ki", "K"):
        factor = _SIZE_UNITS[unit.lower()]
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def _text_to_rate(text: str) -> int | None:
    if text.strip().lower() in ("unlimited", "none"):
        return None
    return parse_rate(text)


def _check_rate(value: int | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = _text_to_rate(value)
        if value is None:
            return None
    if value < 1:
        raise ValueError(f"expected a rate of at least 1 byte per second, got {value}")
    return value


def _show_rate(value: Any) -> str:
    return "unlimited" if value is None else f"{format_size(value)} bytes/s"


def _text_to_yes_no(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def _check_yes_no(value: bool | str) -> bool:
    if isinstance(value, str):
        return _text_to_yes_no(value)
    return bool(value)


def _show_yes_no(value: Any) -> str:
    return "yes" if value else "no"


RATE = ValueType("rate in bytes per second (K, M, G: powers of 1000; Ki, Mi, Gi: of 1024)", "RATE",
                 (int, str), _text_to_rate, _check_rate, _show_rate, example='"20M"')
YES_NO = ValueType("yes or no", "yes|no", (bool, str), _text_to_yes_no, _check_yes_no, _show_yes_no,
                   example="false")
UPSTREAM_URL = ValueType("binary cache URL or none", "URL", (str,), _identity, _check_upstream_url,
                         example='"https://cache.nixos.org"')
SIZE = ValueType("size (K, M, G: powers of 1000; Ki, Mi, Gi: powers of 1024)", "SIZE", (int, str),
                 _identity, _check_size, format_size, example='"4Gi"')


def _check_fp_rate(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 0.5:
        raise ValueError(f"expected a false-positive rate above 0 and at most 0.5, such as 0.01, got {value!r}")
    return value


FP_RATE = ValueType("false-positive rate", "RATE", (int, float), _text_to_float, _check_fp_rate,
                    example="0.01")


# --------------------------------------------------------------------------
# The table.


@attrs.frozen
class Setting:
    """
    One setting: the :class:`Config` attribute and config-file key ``name``,
    the command-line option ``--flag``.

    :ivar type: the value's :class:`ValueType`.
    :ivar default: the value :class:`Config` holds when the setting is given
        nowhere (already checked and normalised).
    :ivar help: one sentence for ``--help`` and the docs.
    :ivar repeatable: a list: ``--flag`` may be given many times, the file
        holds a TOML array, :class:`Config` a tuple.
    :ivar in_file: whether a config file may set it (not ``--config`` itself).
    :ivar group: the section of the docs it is listed under.
    :ivar default_text: how the docs describe the default, when a plain
        rendering of ``default`` would not say what it means.
    :ivar example: a TOML literal for the docs, instead of the type's.
    """

    name: str
    flag: str
    type: ValueType
    default: Any
    help: str
    repeatable: bool = False
    in_file: bool = True
    group: str = "serving"
    default_text: str | None = None
    example: str | None = None

    def describe_default(self) -> str:
        """:returns: the default as help and docs show it."""
        if self.default_text is not None:
            return self.default_text
        if self.repeatable:
            return ", ".join(self.type.show(v) for v in self.default) or "none"
        return self.type.show(self.default)

    def toml_example(self) -> str:
        """:returns: a line of a config file setting this, for the docs."""
        if self.example is not None:
            value = self.example
        elif self.repeatable:
            items = [json.dumps(self.type.show(v)) for v in self.default or ()]
            value = f"[{', '.join(items or [self.type.example])}]"
        elif self.default is None:
            value = self.type.example
        elif isinstance(self.default, bool):
            value = "true" if self.default else "false"
        elif isinstance(self.default, str):
            value = json.dumps(self.default)
        else:
            value = repr(self.default)
        return f"{self.name} = {value}"

    @property
    def flags(self) -> tuple[str, ...]:
        """:returns: the command-line spellings (``--no-X`` too for a boolean)."""
        if self.type is BOOL:
            return (f"--{self.flag}", f"--no-{self.flag}")
        return (f"--{self.flag} {self.type.metavar}",)


SETTINGS: tuple[Setting, ...] = (
    # Serving the local store (issue A).
    Setting("port", "port", PORT, DEFAULT_PORT,
            "TCP port of the HTTP binary cache (0: any free port)."),
    Setting("interface", "interface", ADDRESS, None,
            "Listen on this IPv4 or IPv6 address only.",
            default_text="all addresses, IPv4 and IPv6"),
    Setting("store_root", "store-root", DIRECTORY, "/",
            "Serve the Nix store below DIR: store paths in DIR/nix/store, "
            "database in DIR/nix/var/nix/db/db.sqlite."),
    Setting("secret_key_file", "secret-key-file", FILE, None,
            "Sign served narinfos with this Nix secret key "
            "(made by nix-store --generate-binary-cache-key).",
            example='"/etc/peernix/secret-key"',
            default_text="none: serve only the signatures already in the store"),
    Setting("priority", "priority", PRIORITY, 30,
            "Priority announced in nix-cache-info (lower is preferred by Nix)."),
    Setting("access_log", "access-log", BOOL, False,
            "Log every HTTP request."),
    Setting("share", "share", SHARE_MODE, "trusted",
            "What peers may download: trusted, only paths whose database signature "
            "verifies against a trusted key (--trusted-public-key) or this node's own "
            "key (what came from cache.nixos.org, and builds Nix signed with "
            "--secret-key-file); all, every valid path (private builds included). "
            "Withheld paths answer as missing; local clients (--proxy-client) always "
            "see the whole store."),
    Setting("config_file", "config", FILE, None,
            "Read settings from this TOML file; the command line wins over it.",
            in_file=False, default_text="none"),
    # Asking peers on behalf of local clients (issue B).
    Setting("peers", "peer", PEER_URL, (),
            "A static peer http://HOST:PORT (IPv6 addresses in brackets), "
            "for peers beyond the broadcast domain.",
            repeatable=True, group="peers"),
    Setting("trusted_public_keys", "trusted-public-key", PUBLIC_KEY, None,
            "Only pass on a peer's narinfo signed by one of these keys (or content-addressed).",
            repeatable=True, group="peers",
            default_text="the local Nix's trusted-public-keys"),
    Setting("proxy_clients", "proxy-client", NETWORK,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
            "Clients in this network get answers from peers; all others only "
            "from the local store.",
            repeatable=True, group="peers"),
    Setting("negative_ttl", "negative-ttl", SECONDS, 10.0,
            "Remember for this long that no peer has a path.", group="peers"),
    Setting("peer_timeout", "peer-timeout", SECONDS, 2.0,
            "Give up on a peer's answer after this long.", group="peers"),
    # Store digests (issue 14): see peernix.store.digest.
    Setting("digest", "digest", BOOL, True,
            "Publish a digest of the shared paths (a Bloom filter of their hash parts) "
            "at /peernix/digest, and ask a peer for a path only when its digest may "
            "hold it (peers without a digest are always asked).", group="peers"),
    Setting("digest_fp_rate", "digest-fp-rate", FP_RATE, 0.01,
            "The false-positive rate this node's digest is sized for: the share of "
            "paths it lacks that peers still ask it for.", group="peers"),
    Setting("digest_interval", "digest-interval", SECONDS, 30.0,
            "Fetch each peer's digest at least this often (and within seconds of an "
            "announcement saying it changed).", group="peers"),
    # Finding peers (issue C).
    Setting("udp_port", "udp-port", PORT, None,
            "UDP port for announcements and queries.", group="discovery",
            default_text="the same as --port"),
    Setting("broadcast", "broadcast", BOOL, True,
            "Find peers with UDP broadcast announcements.", group="discovery"),
    Setting("mdns", "mdns", BOOL, True,
            "Find peers with mDNS (_peernix._tcp).", group="discovery"),
    Setting("announce_interval", "announce-interval", SECONDS, 30.0,
            "Announce this node this often.", group="discovery"),
    Setting("peer_ttl", "peer-ttl", SECONDS, 120.0,
            "Forget a discovered peer not heard from for this long.", group="discovery"),
    # Beyond the broadcast domain (issue 14); see peernix.discovery.dnssd
    # and peernix.discovery.tailscale.
    Setting("dns_sd", "dns-sd", DOMAIN, (),
            "Find peers by unicast DNS-SD in this domain: the PTR records of "
            "_peernix._tcp.DOMAIN, their SRV, TXT and A/AAAA records, asked of the "
            "system resolver (/etc/resolv.conf).", repeatable=True, group="discovery"),
    Setting("dns_sd_interval", "dns-sd-interval", SECONDS, 60.0,
            "Resolve the --dns-sd domains again this often; peers gone from the "
            "zone are dropped then.", group="discovery"),
    Setting("tailscale", "tailscale", BOOL, False,
            "Find peers on this machine's tailnet (Tailscale or Headscale): the online "
            "peers that tailscale status --json lists, at their Tailscale address and --port.",
            group="discovery"),
    Setting("tailscale_tags", "tailscale-tag", TAILSCALE_TAG, (),
            "With --tailscale, only peers carrying one of these ACL tags "
            "(tag:peernix; the tag: prefix may be left out).",
            repeatable=True, group="discovery", default_text="none: every online peer"),
    Setting("tailscale_interval", "tailscale-interval", SECONDS, 60.0,
            "With --tailscale, read the tailnet's peers again this often.", group="discovery"),
    # Logging (issue 7).
    Setting("log_format", "log-format", LOG_FORMAT, "text",
            "Write the log as text lines, or as one JSON object per line "
            "(for journald or Loki).", group="logging"),
    # Bounds on what strangers can make the HTTP server hold (issue 8);
    # see peernix.web.limits.
    Setting("header_timeout", "header-timeout", SECONDS, 10.0,
            "Close a connection whose request (line, headers and any body) has "
            "not arrived whole this long after its first byte (slowloris).",
            group="limits"),
    Setting("max_connections", "max-connections", COUNT, 1024,
            "Open HTTP connections at most; past it peers get 503 with Retry-After. "
            "Local clients (--proxy-client) are counted but never refused.",
            group="limits"),
    Setting("max_connections_per_client", "max-connections-per-client", COUNT, 64,
            "Open HTTP connections from one peer address at most; past it that "
            "peer gets 503 with Retry-After.  Local clients are not capped.",
            group="limits"),
    # What this machine gives and what it keeps (issue 15).
    Setting("max_upload_rate", "max-upload-rate", RATE, None,
            "Serve peers at most RATE bytes per second in all (NARs, narinfos, "
            "listings, logs), shared evenly among concurrent peer downloads; "
            "K, M, G are powers of 1000 and Ki, Mi, Gi powers of 1024, so 20M is "
            "20,000,000.  Local clients are never limited.",
            group="giving", default_text="unlimited"),
    Setting("serve_peers", "serve-peers", YES_NO, True,
            "no: consume only.  Peers get 404 for everything (nix-cache-info "
            "still answers, saying so), and this node's announcements and health "
            "answers tell peers not to ask it; it still asks them.",
            group="giving", example="false"),
    Setting("state_dir", "state-dir", DIRECTORY, "/var/lib/peernix",
            "Keep state that survives restarts here (the savings figures of the "
            "status page, savings.json); a directory that cannot be written is "
            "a warning, not an error.",
            group="giving", example='"/var/lib/peernix"'),
    # Fetching from upstream caches for the LAN (issue 13); see peernix.upstream.
    Setting("upstream", "upstream", UPSTREAM_URL, None,
            "A binary cache this node may fetch from on the LAN's behalf when no "
            "peer has a path (only paths whose narinfo passes the same trust filter "
            "as a peer's).  Given at all, the list replaces the default; "
            "--upstream none turns fetching for the LAN off.",
            repeatable=True, group="upstream",
            default_text="the local Nix's substituters and extra-substituters, "
                         "minus any that reach this daemon or a peer"),
    Setting("fetch_for_lan", "fetch-for-lan", YES_NO, True,
            "Offer to fetch paths from the upstreams for the whole LAN (announced "
            "to peers).  Say no on a laptop on Wi-Fi or a metered link: it still "
            "gets paths the others fetch.", group="upstream"),
    Setting("staging_dir", "staging-dir", DIRECTORY, "/var/cache/peernix/staging",
            "Keep NARs fetched from an upstream here while they stream to every "
            "waiting node, and afterwards for late comers.", group="upstream",
            example='"/var/cache/peernix/staging"'),
    Setting("staging_max_size", "staging-max-size", SIZE, 4 * 1024**3,
            "Most bytes the staging directory holds; least recently used NARs "
            "are dropped first.", group="upstream"),
)

#: The settings by name.
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}

#: Headings of the groups, in order, for help and docs.
GROUPS: Mapping[str, str] = {
    "serving": "Serving the local store",
    "peers": "Asking peers",
    "discovery": "Finding peers",
    "logging": "Logging",
    "limits": "Limits",
    "giving": "What this machine gives and keeps",
    "upstream": "Fetching for the LAN",
}


def _drop_none(upstreams: Iterable[str] | None) -> tuple[str, ...] | None:
    """:returns: ``upstreams`` without ``none`` items (``None`` stays ``None``: the default)."""
    return None if upstreams is None else tuple(u for u in upstreams if u != UPSTREAM_NONE)


def _default(name: str) -> Any:
    return SETTINGS_BY_NAME[name].default


@attrs.frozen(kw_only=True)
class Config:
    """
    The daemon's settings, checked and normalised; see :data:`SETTINGS` for
    what each one means.  Paths are absolute.
    """

    port: int = _default("port")
    interface: str | None = _default("interface")
    store_root: str = _default("store_root")
    secret_key_file: str | None = _default("secret_key_file")
    priority: int = _default("priority")
    access_log: bool = _default("access_log")
    #: ``"trusted"`` or ``"all"``; see :mod:`peernix.store.share`.
    share: str = _default("share")
    config_file: str | None = _default("config_file")
    peers: tuple[str, ...] = _default("peers")
    #: ``None``: use the local Nix's ``trusted-public-keys``.
    trusted_public_keys: tuple[str, ...] | None = _default("trusted_public_keys")
    proxy_clients: tuple[IPNetwork, ...] = _default("proxy_clients")
    negative_ttl: float = _default("negative_ttl")
    peer_timeout: float = _default("peer_timeout")
    digest: bool = _default("digest")
    digest_fp_rate: float = _default("digest_fp_rate")
    digest_interval: float = _default("digest_interval")
    #: ``None``: the same as :attr:`port`; see :attr:`effective_udp_port`.
    udp_port: int | None = _default("udp_port")
    broadcast: bool = _default("broadcast")
    mdns: bool = _default("mdns")
    announce_interval: float = _default("announce_interval")
    peer_ttl: float = _default("peer_ttl")
    dns_sd: tuple[str, ...] = _default("dns_sd")
    dns_sd_interval: float = _default("dns_sd_interval")
    tailscale: bool = _default("tailscale")
    tailscale_tags: tuple[str, ...] = _default("tailscale_tags")
    tailscale_interval: float = _default("tailscale_interval")
    #: ``"text"`` or ``"json"``; see :mod:`peernix.logging`.
    log_format: str = _default("log_format")
    header_timeout: float = _default("header_timeout")
    max_connections: int = _default("max_connections")
    max_connections_per_client: int = _default("max_connections_per_client")
    #: Bytes per second served to peers at most; ``None``: unlimited.
    max_upload_rate: int | None = _default("max_upload_rate")
    #: ``False``: consume only (``--serve-peers no``).
    serve_peers: bool = _default("serve_peers")
    state_dir: str = _default("state_dir")
    #: ``None``: the local Nix's substituters (see
    #: :func:`peernix.upstream.config.default_upstreams`); ``()``: none.
    #: ``none`` items (``--upstream none``) are dropped here.
    upstream: tuple[str, ...] | None = attrs.field(
        default=_default("upstream"),
        converter=_drop_none,
    )
    fetch_for_lan: bool = _default("fetch_for_lan")
    staging_dir: str = _default("staging_dir")
    staging_max_size: int = _default("staging_max_size")

    @property
    def effective_udp_port(self) -> int:
        """:returns: the UDP port to use: :attr:`udp_port`, else :attr:`port`."""
        return self.port if self.udp_port is None else self.udp_port


# --------------------------------------------------------------------------
# Reading values.


def parse_text(setting: Setting, text: str) -> Any:
    """
    Read one command-line value of ``setting`` (one item, for a list).

    :raises ConfigError: naming ``--flag`` and what is expected.
    """
    try:
        return setting.type.check(setting.type.from_text(text))
    except ValueError as e:
        raise ConfigError(f"--{setting.flag}: {e}") from None


def _native_ok(setting: Setting, value: object) -> bool:
    # TOML booleans are ints to Python; only a setting taking booleans takes them.
    if isinstance(value, bool) and bool not in setting.type.native:
        return False
    return isinstance(value, setting.type.native)


def _toml_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def parse_file_value(setting: Setting, value: object, where: str) -> Any:
    """
    Read the config-file value of ``setting``.

    :param where: the file's name, for messages.
    :raises ConfigError: naming the file, the key and what is expected.
    """

    def one(item: object) -> Any:
        if not _native_ok(setting, item):
            name = setting.type.name
            expected = f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"
            if setting.type.native == (str,):
                expected += " in quotes"
            raise ConfigError(
                f"{where}: {setting.name}: expected {expected}, got {_toml_kind(item)} {item!r}"
            )
        try:
            return setting.type.check(item)
        except ValueError as e:
            raise ConfigError(f"{where}: {setting.name}: {e}") from None

    if setting.repeatable:
        if not isinstance(value, list):
            raise ConfigError(
                f"{where}: {setting.name}: expected an array such as "
                f"{setting.name} = [\"...\"], got {_toml_kind(value)} {value!r}"
            )
        return tuple(one(item) for item in value)
    return one(value)


def read_config_file(path: str) -> dict[str, Any]:
    """
    Read a TOML config file.

    :returns: the checked values of the settings it sets, by name.
    :raises ConfigError: when the file cannot be read, is not valid TOML (the
        message gives the line), has an unknown key, or a bad value.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not valid UTF-8 TOML: {e}") from None
    known = [s.name for s in SETTINGS if s.in_file]
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = SETTINGS_BY_NAME.get(key)
        if setting is None or not setting.in_file:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        values[key] = parse_file_value(setting, value, f"config file {path}")
    return values


def make_config(
    command_line: Mapping[str, Any], file_values: Mapping[str, Any] | None = None
) -> Config:
    """
    Merge checked values into a :class:`Config`: ``command_line`` wins over
    ``file_values``, which win over the defaults.

    :param command_line: checked values by setting name (only those given).
    :param file_values: as :func:`read_config_file` returns them.
    """
    merged: dict[str, Any] = dict(file_values or {})
    merged.update(command_line)
    return Config(**merged)


def config_from_file(path: str | None) -> Config:
    """
    :returns: the settings of the TOML file at ``path`` (``None``: defaults).
    :raises ConfigError: see :func:`read_config_file`.
    """
    if path is None:
        return Config()
    path = _check_path(path)
    return make_config({"config_file": path}, read_config_file(path))


# --------------------------------------------------------------------------
# The command line.


def _help(setting: Setting) -> str:
    text = setting.help
    if setting.repeatable:
        text += " May be given many times."
    return f"{text} (default: {setting.describe_default()})"


def _parameters() -> list[list[Any]]:
    # Defaults are None so postOptions can tell an option that was given
    # from one that was not (the file's value must survive the latter).
    return [
        [s.flag, None, None, _help(s)]
        for s in SETTINGS
        if s.type is not BOOL and not s.repeatable
    ]


def _flags() -> list[list[Any]]:
    flags: list[list[Any]] = []
    for s in SETTINGS:
        if s.type is BOOL:
            flags.append([s.flag, None, _help(s)])
            flags.append([f"no-{s.flag}", None, f"Turn --{s.flag} off."])
    return flags


class PeernixOptions(usage.Options):
    """
    ``twistd peernix`` options, generated from :data:`SETTINGS`.

    After :meth:`parseOptions`, :attr:`config` holds the merged
    :class:`Config`.  Every problem, including those of the config file, is
    raised as a one-line :class:`usage.UsageError`.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve this machine's Nix store to its LAN peers and substitute from "
        "theirs.  Point nix.conf's substituters at http://127.0.0.1:PORT/nix-cache."
    )
    optParameters = _parameters()
    optFlags = _flags()

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        #: Items of repeatable options, by setting name, as given.
        self.repeated: dict[str, list[Any]] = {}
        #: The result; the defaults until :meth:`parseOptions` ran.
        self.config = Config()

    def opt_version(self) -> None:
        """Display peernix's and Twisted's versions and exit."""
        import twisted

        from peernix import __version__

        print(f"peernix {__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

    def given(self) -> dict[str, Any]:
        """
        :returns: the checked values of the settings given on the command
            line, by name.
        :raises ConfigError: for a bad value or contradicting flags.
        """
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if s.type is BOOL:
                on, off = self[s.flag], self[f"no-{s.flag}"]
                if on and off:
                    raise ConfigError(f"--{s.flag} and --no-{s.flag} contradict each other")
                if on or off:
                    values[s.name] = bool(on)
            elif s.repeatable:
                if s.name in self.repeated:
                    values[s.name] = tuple(self.repeated[s.name])
            elif self[s.flag] is not None:
                values[s.name] = parse_text(s, self[s.flag])
        return values

    def postOptions(self) -> None:
        """Check every value, read the config file, and set :attr:`config`."""
        try:
            given = self.given()
            path = given.get("config_file")
            self.config = make_config(given, read_config_file(path) if path else None)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _make_appender(setting: Setting) -> Callable[[PeernixOptions, str], None]:
    def opt(self: PeernixOptions, value: str) -> None:
        try:
            item = parse_text(setting, value)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.repeated.setdefault(setting.name, []).append(item)

    opt.__doc__ = _help(setting)
    opt.__name__ = "opt_" + setting.flag.replace("-", "_")
    return opt


# usage.Options finds option handlers as opt_* methods of the class.
for _setting in SETTINGS:
    if _setting.repeatable:
        setattr(PeernixOptions, "opt_" + _setting.flag.replace("-", "_"), _make_appender(_setting))
del _setting


def parse_args(argv: Sequence[str]) -> Config:
    """
    Parse ``twistd peernix`` arguments (and the config file they name).

    :returns: the merged :class:`Config`.
    :raises usage.UsageError: one line saying what is wrong.
    """
    options = PeernixOptions()
    options.parseOptions(list(argv))  # type: ignore[no-untyped-call]
    return options.config


# --------------------------------------------------------------------------
# Documentation.


def render_settings_rst(settings: Iterable[Setting] = SETTINGS) -> str:
    """
    :returns: reStructuredText describing ``settings``, grouped, each with its
        command-line spelling, config-file key and default (used by the docs).
    """
    by_group: dict[str, list[Setting]] = {}
    for s in settings:
        by_group.setdefault(s.group, []).append(s)
    out: list[str] = []
    for group, title in GROUPS.items():
        if group not in by_group:
            continue
        out += [title, "-" * len(title), ""]
        for s in by_group[group]:
            out.append(", ".join(f"``{f}``" for f in s.flags))
            body = s.help
            if s.repeatable:
                body += " May be given many times; a list given on the command line replaces the file's."
            out.append(f"   {body}")
            out.append("")
            if s.in_file:
                kind = f"a list of {s.type.name}s" if s.repeatable else s.type.name
                out.append(f"   Config file: ``{s.toml_example()}`` ({kind}).")
            else:
                out.append("   Command line only.")
            out.append(f"   Default: {s.describe_default()}.")
            out.append("")
    return "\n".join(out)
