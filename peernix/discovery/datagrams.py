"""
The UDP datagrams peernix nodes exchange, parsed and rendered (pure code).

Wire-compatible with the Go predecessor zw3rk/peernix (``main.go``):

* ``{"cmd":"announce","peernix_version":...,"nix_version":...,"platform":...,
  "features":[...],"public_key":"name:base64","port":N}`` -- a node's
  self-description, broadcast and answered unicast.  Go marshals every field
  but ``cmd`` and ``peernix_version`` with ``omitempty`` and unmarshals with
  ``encoding/json`` into a struct, which ignores unknown fields and matches
  field names case-insensitively.  We add two fields of our own that Go
  ignores: ``node_id`` (random per process; recognises our own broadcasts and
  a restarted peer), ``reply`` (``true`` on an answer, which is never
  answered again) and ``serve_peers`` (``false`` from a node that serves no
  peers, ``--serve-peers no``: do not ask it; absent means it serves) and
  ``max_upload_rate`` (bytes per second it serves peers at most, when
  limited; informative).  Optionally signed (see :mod:`.signed`): ``ts`` (unix
  seconds, an integer) and ``sig`` (``name:base64`` ed25519 signature of
  :func:`signing_payload`, the canonical JSON of the announce without
  ``sig``).  ``digest`` (optional): the version of the sender's store
  digest (``<generation>-<version>``, see :mod:`peernix.store.digest`); a
  receiver holding another version fetches the digest soon.
* ``ping`` -> ``pong`` (legacy discovery).
* ``has_path?<hash32>`` -> ``yes`` | ``not_found``.
* ``has_path_with_narhash?<hash32>:<narhash>`` -> ``yes`` |
  ``narhash_mismatch`` | ``not_found``; Go sends the NarHash as 52 nix32
  characters without ``sha256:``, and answers ``invalid_format`` when the
  colon is missing.

Go's UDP server reads into a 1024-byte buffer, so a datagram we send must not
be longer (:data:`GO_MAX_DATAGRAM`).  We accept up to :data:`MAX_DATAGRAM`.

:func:`parse_datagram` raises only :class:`DatagramError`, whatever the bytes.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Union

import attrs
from attrs import field, frozen

from peernix.discovery.digesttag import is_digest_tag
from peernix.nix.hashes import Hash, HashError, parse_hash
from peernix.nix.signing import SecretKey, parse_public_key
from peernix.nix.storepath import is_hash_part

#: Longest datagram we accept.
MAX_DATAGRAM = 2048
#: Longest datagram the Go predecessor reads whole (its read buffer).
GO_MAX_DATAGRAM = 1024
#: Bounds on announce contents (beyond the datagram size).
MAX_TEXT = 256
MAX_FEATURES = 32
MAX_FEATURE_LEN = 64
#: Largest ``ts`` accepted (JavaScript's safe integers; far beyond any clock).
MAX_TS = 2**53 - 1

_HAS_PATH = "has_path?"
_HAS_PATH_NARHASH = "has_path_with_narhash?"


class DatagramError(ValueError):
    """
    A datagram is malformed.

    :ivar reason: a short machine-friendly reason (``"oversized"``,
        ``"encoding"``, ``"json"``, ``"field"``, ``"hash"``, ``"port"``,
        ``"cmd"``, ``"unknown"``), used as a metric label.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _tuple(items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(items)


@frozen
class Announce:
    """
    A node's self-description.

    :ivar port: the node's HTTP port; ``None`` when absent (Go omits 0).
    :ivar public_key: ``name:base64`` or ``""`` when the node has no key.
    :ivar node_id: ``None`` for nodes that do not send one (the Go predecessor).
    :ivar reply: whether this is an answer to an announce (never answered).
    :ivar serve_peers: ``False`` when the node serves no peers (sent only
        then, as ``"serve_peers": false``).
    :ivar max_upload_rate: the node's ``--max-upload-rate`` in bytes per
        second; ``None`` (not sent) when unlimited.
    :ivar ts: the signing time, unix seconds, for signed announces.
    :ivar sig: ``name:base64`` signature of :attr:`signed_payload`.
    :ivar digest: the version of the sender's store digest, ``None`` when
        it names none (the Go predecessor, older peernix, digests off).
    :ivar fetch_for_lan: the node offers to fetch from upstreams for the
        LAN (JSON ``"fetch_for_lan": true``; absent, as from the Go
        predecessor and older peernix: ``False``).
    :ivar signed_payload: what ``sig`` signs: set by :func:`parse_datagram`
        from the received JSON when it has a ``sig``, and by
        :func:`sign_announce`; not part of equality.
    """

    peernix_version: str
    nix_version: str = ""
    platform: str = ""
    features: tuple[str, ...] = field(default=(), converter=_tuple)
    public_key: str = ""
    port: int | None = None
    node_id: str | None = None
    reply: bool = False
    serve_peers: bool = True
    max_upload_rate: int | None = None
    ts: int | None = None
    sig: str | None = None
    fetch_for_lan: bool = False
    signed_payload: bytes | None = field(default=None, eq=False, repr=False)
    digest: str | None = None


@frozen
class Ping:
    """Legacy discovery request; answered with :class:`Pong`."""


@frozen
class Pong:
    """Legacy discovery answer."""


@frozen
class HasPathQuery:
    """``has_path?<hash_part>``: does the node have a valid path with that hash part?"""

    hash_part: str


@frozen
class HasPathWithNarHashQuery:
    """``has_path_with_narhash?<hash_part>:<nar_hash>``: ... and exactly that NarHash?"""

    hash_part: str
    nar_hash: Hash


class Answer(enum.Enum):
    """Answers to queries, as sent on the wire."""

    YES = "yes"
    NOT_FOUND = "not_found"
    NARHASH_MISMATCH = "narhash_mismatch"
    INVALID_FORMAT = "invalid_format"


@frozen
class QueryAnswer:
    """An answer to a query (only ever expected by a node that sent a query)."""

    answer: Answer


Datagram = Union[Announce, Ping, Pong, HasPathQuery, HasPathWithNarHashQuery, QueryAnswer]
Query = Union[HasPathQuery, HasPathWithNarHashQuery]

_ANSWERS = {a.value: a for a in Answer}


def _text(obj: dict[str, object], key: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DatagramError("field", f"announce lacks {key!r}")
        return ""
    if not isinstance(value, str):
        raise DatagramError("field", f"announce field {key!r} must be a string")
    if len(value) > MAX_TEXT or not value.isprintable():
        raise DatagramError("field", f"announce field {key!r} is too long or not printable")
    return value


def _features(obj: dict[str, object]) -> tuple[str, ...]:
    value = obj.get("features")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_FEATURES:
        raise DatagramError("field", "announce field 'features' must be a short list")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_FEATURE_LEN or not item.isprintable():
            raise DatagramError("field", "announce features must be short printable strings")
    return tuple(value)


def _port(obj: dict[str, object]) -> int | None:
    value = obj.get("port")
    if value is None:
        return None
    # bool is an int in Python; Go rejects true/false for an int field.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatagramError("port", "announce field 'port' must be an integer")
    if not 1 <= value <= 65535:
        raise DatagramError("port", f"announce port {value} out of range")
    return value


def is_valid_public_key(text: str) -> bool:
    """:returns: whether ``text`` is a Nix public key ``name:base64(32 bytes)``, exactly."""
    if text != text.strip():
        return False
    try:
        parse_public_key(text)
    except ValueError:
        return False
    return True


def signing_payload(obj: Mapping[str, object]) -> bytes:
    """
    The bytes an announce signature covers: the canonical JSON of the
    announce object without its ``sig`` member -- keys sorted, no spaces,
    ASCII only (``\\u`` escapes with four hex digits).

    Computed from the *parsed* object on receipt, so what is verified is
    exactly what is interpreted (duplicate keys, spacing and escapes in the
    received bytes do not matter).

    :param obj: a JSON object as :func:`json.loads` returns it.
    :raises DatagramError: (reason ``"json"``) if it cannot be rendered
        (nesting too deep).
    """
    try:
        text = json.dumps(
            {k: v for k, v in obj.items() if k != "sig"},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
    except (ValueError, TypeError, RecursionError):
        raise DatagramError("json", "announce cannot be canonicalised") from None
    return text.encode("ascii")


def _ts(obj: dict[str, object]) -> int | None:
    value = obj.get("ts")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TS:
        raise DatagramError("field", "announce field 'ts' must be a non-negative integer")
    return value


def _sig(obj: dict[str, object]) -> str | None:
    value = obj.get("sig")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT or not value.isprintable():
        raise DatagramError("field", "announce field 'sig' must be a short printable string")
    return value


def _digest_tag(obj: dict[str, object]) -> str | None:
    value = obj.get("digest")
    if value is None:
        return None
    if not is_digest_tag(value):
        raise DatagramError("field", "announce field 'digest' must be a short string of letters, digits and '-'")
    assert isinstance(value, str)
    return value


def _reject_constant(name: str) -> object:
    raise DatagramError("json", f"non-standard JSON constant {name}")


def _parse_announce(text: str) -> Announce:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except DatagramError:
        raise
    except (ValueError, RecursionError):
        raise DatagramError("json", "invalid JSON") from None
    if not isinstance(obj, dict):
        raise DatagramError("json", "JSON datagram is not an object")
    cmd = obj.get("cmd")
    if cmd != "announce":
        raise DatagramError("cmd", f"unknown JSON command {cmd!r:.40}")
    public_key = _text(obj, "public_key")
    if public_key and not is_valid_public_key(public_key):
        raise DatagramError("field", "announce public_key is not name:base64(32 bytes)")
    node_id = obj.get("node_id")
    if node_id is not None:
        if not isinstance(node_id, str) or not 1 <= len(node_id) <= 64 or not node_id.isprintable():
            raise DatagramError("field", "announce node_id must be a short printable string")
    reply = obj.get("reply", False)
    if reply is None:
        reply = False
    if not isinstance(reply, bool):
        raise DatagramError("field", "announce field 'reply' must be a boolean")
    serve_peers = obj.get("serve_peers", True)
    if serve_peers is None:
        serve_peers = True
    if not isinstance(serve_peers, bool):
        raise DatagramError("field", "announce field 'serve_peers' must be a boolean")
    max_upload_rate = obj.get("max_upload_rate")
    if max_upload_rate is not None and (
        not isinstance(max_upload_rate, int) or isinstance(max_upload_rate, bool) or not 0 < max_upload_rate < 2**63
    ):
        raise DatagramError("field", "announce field 'max_upload_rate' must be a positive integer")
    ts = _ts(obj)
    sig = _sig(obj)
    fetch_for_lan = obj.get("fetch_for_lan", False)
    if fetch_for_lan is None:
        fetch_for_lan = False
    if not isinstance(fetch_for_lan, bool):
        raise DatagramError("field", "announce field 'fetch_for_lan' must be a boolean")
    return Announce(
        peernix_version=_text(obj, "peernix_version", required=True),
        nix_version=_text(obj, "nix_version"),
        platform=_text(obj, "platform"),
        features=_features(obj),
        public_key=public_key,
        port=_port(obj),
        node_id=node_id,
        reply=reply,
        serve_peers=serve_peers,
        max_upload_rate=max_upload_rate,
        ts=ts,
        sig=sig,
        fetch_for_lan=fetch_for_lan,
        signed_payload=signing_payload(obj) if sig is not None else None,
        digest=_digest_tag(obj),
    )


def _hash_part(text: str) -> str:
    if not is_hash_part(text):
        raise DatagramError("hash", "query hash is not 32 nix32 characters")
    return text


def parse_datagram(data: bytes) -> Datagram:
    """
    Parse one received datagram.

    A JSON datagram starts with ``{`` (as Go tells them apart).  Text
    commands are matched exactly; one trailing newline is tolerated, so
    ``echo ping | nc -u`` works.

    :param data: the datagram's bytes.
    :raises DatagramError: for anything that is not a well-formed datagram of
        a known kind; never any other exception.
    """
    if len(data) > MAX_DATAGRAM:
        raise DatagramError("oversized", f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatagramError("encoding", "datagram is not UTF-8") from None
    if text.startswith("{"):
        return _parse_announce(text)
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if text == "ping":
        return Ping()
    if text == "pong":
        return Pong()
    answer = _ANSWERS.get(text)
    if answer is not None:
        return QueryAnswer(answer)
    if text.startswith(_HAS_PATH_NARHASH):
        hash_part, colon, nar_hash = text[len(_HAS_PATH_NARHASH):].partition(":")
        if not colon:
            raise DatagramError("hash", "has_path_with_narhash query lacks ':'")
        try:
            parsed = parse_hash(nar_hash, "sha256")
        except HashError:
            raise DatagramError("hash", "query NarHash is not a sha256 hash") from None
        return HasPathWithNarHashQuery(_hash_part(hash_part), parsed)
    if text.startswith(_HAS_PATH):
        return HasPathQuery(_hash_part(text[len(_HAS_PATH):]))
    raise DatagramError("unknown", "unknown datagram")


def _announce_object(a: Announce) -> dict[str, object]:
    # Field order and omissions as Go's json.Marshal of its struct, so a Go
    # node sees exactly the shape it sends itself; our fields follow.
    obj: dict[str, object] = {"cmd": "announce", "peernix_version": a.peernix_version}
    if a.nix_version:
        obj["nix_version"] = a.nix_version
    if a.platform:
        obj["platform"] = a.platform
    if a.features:
        obj["features"] = list(a.features)
    if a.public_key:
        obj["public_key"] = a.public_key
    if a.port is not None:
        obj["port"] = a.port
    if a.node_id is not None:
        obj["node_id"] = a.node_id
    if a.fetch_for_lan:
        obj["fetch_for_lan"] = True
    if a.reply:
        obj["reply"] = True
    if not a.serve_peers:
        obj["serve_peers"] = False
    if a.max_upload_rate is not None:
        obj["max_upload_rate"] = a.max_upload_rate
    if a.digest is not None:
        obj["digest"] = a.digest
    if a.ts is not None:
        obj["ts"] = a.ts
    if a.sig is not None:
        obj["sig"] = a.sig
    return obj


def _render_announce(a: Announce) -> bytes:
    return json.dumps(_announce_object(a), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_announce(announce: Announce, key: SecretKey, ts: int) -> Announce:
    """
    :param announce: the announce to sign (any ``ts``/``sig`` is replaced).
    :param key: this node's Nix secret key; the announce's ``public_key``
        should be its public key, or a receiver cannot verify it.
    :param ts: the signing time, unix seconds.
    :returns: ``announce`` with ``ts``, ``sig`` and ``signed_payload`` set.
    """
    unsigned = attrs.evolve(announce, ts=ts, sig=None, signed_payload=None)
    payload = signing_payload(_announce_object(unsigned))
    return attrs.evolve(unsigned, sig=key.sign(payload), signed_payload=payload)


def render_datagram(datagram: Datagram) -> bytes:
    """
    Render a datagram for sending.

    :raises DatagramError: (reason ``"oversized"``) if the result would be
        longer than :data:`GO_MAX_DATAGRAM`, which a Go node would truncate.
    """
    if isinstance(datagram, Announce):
        data = _render_announce(datagram)
    elif isinstance(datagram, Ping):
        data = b"ping"
    elif isinstance(datagram, Pong):
        data = b"pong"
    elif isinstance(datagram, HasPathQuery):
        data = (_HAS_PATH + datagram.hash_part).encode("ascii")
    elif isinstance(datagram, HasPathWithNarHashQuery):
        data = f"{_HAS_PATH_NARHASH}{datagram.hash_part}:{datagram.nar_hash.nix32()}".encode("ascii")
    else:
        data = datagram.answer.value.encode("ascii")
    if len(data) > GO_MAX_DATAGRAM:
        raise DatagramError("oversized", f"rendered datagram of {len(data)} bytes exceeds {GO_MAX_DATAGRAM}")
    return data
