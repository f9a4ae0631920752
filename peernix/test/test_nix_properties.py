"""Property tests (hypothesis) for the pure Nix protocol core."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import os
import shutil
import tempfile

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix import nix32
from peernix.nix.hashes import DIGEST_SIZES, Hash, parse_hash
from peernix.nix.listing import NarListingBuilder, nar_listing
from peernix.nix.nar import NarError, NarReader, NarVerifier, nar_chunks, nar_size
from peernix.nix.narinfo import NarInfo, NarInfoError, parse_narinfo, render_narinfo
from peernix.nix.signing import parse_secret_key, sign_narinfo, verify_any
from peernix.nix.storepath import STORE_DIR
from peernix.test.test_nar import dir_, nar, reg, sym
from peernix.test.test_narinfo import MINIMAL, SAMPLE

BOUNDED = settings(max_examples=200, deadline=None)

_NAME_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-._?="

hash_parts = st.text(nix32.ALPHABET, min_size=32, max_size=32)
names = st.text(_NAME_CHARS, min_size=1, max_size=211).filter(lambda n: n not in (".", ".."))
basenames = st.builds(lambda h, n: f"{h}-{n}", hash_parts, names)
sha256s = st.binary(min_size=32, max_size=32).map(lambda d: Hash("sha256", d))
any_hashes = st.sampled_from(sorted(DIGEST_SIZES)).flatmap(
    lambda algo: st.binary(min_size=DIGEST_SIZES[algo], max_size=DIGEST_SIZES[algo]).map(lambda d: Hash(algo, d))
)
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80)
key_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"), min_size=1,
                    max_size=20)
sigs = st.builds(
    lambda name, raw: f"{name}:{base64.b64encode(raw).decode()}", key_names, st.binary(min_size=64, max_size=64)
)
cas = st.one_of(
    st.none(),
    sha256s.map(lambda h: f"text:{h.to_string()}"),
    st.tuples(st.sampled_from(["fixed:", "fixed:r:", "fixed:git:"]), any_hashes).map(
        lambda t: f"{t[0]}{t[1].to_string()}"
    ),
)


@st.composite
def narinfos(draw: st.DrawFn) -> NarInfo:
    """Valid narinfos: everything a peer may legitimately send."""
    return NarInfo(
        store_path=f"{STORE_DIR}/{draw(basenames)}",
        url=draw(tokens),
        compression=draw(st.sampled_from(["none", "xz", "zstd", "bzip2", "br"]) | tokens),
        nar_hash=draw(sha256s),
        nar_size=draw(st.integers(min_value=1, max_value=2**64 - 1)),
        references=tuple(draw(st.lists(basenames, max_size=5))),
        deriver=draw(st.none() | basenames),
        sigs=tuple(draw(st.lists(sigs, max_size=3, unique=True))),
        ca=draw(cas),
        file_hash=draw(st.none() | any_hashes),
        file_size=draw(st.none() | st.integers(min_value=0, max_value=2**64 - 1)),
    )


@st.composite
def nar_nodes(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Valid NAR nodes built with the hand-made writer."""
    kinds = ["regular", "symlink"] + (["directory"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "regular":
        return reg(draw(st.binary(max_size=40)), draw(st.booleans()))
    if kind == "symlink":
        return sym(draw(st.binary(min_size=1, max_size=30).filter(lambda t: b"\0" not in t)))
    entry_names = draw(
        st.lists(
            st.binary(min_size=1, max_size=12).filter(lambda n: n not in (b".", b"..") and b"/" not in n
                                                      and b"\0" not in n),
            max_size=4, unique=True,
        )
    )
    return dir_(*[(n, draw(nar_nodes(depth + 1))) for n in sorted(entry_names)])


class Nix32Properties(SynchronousTestCase):
    """nix32 round trips."""

    @BOUNDED
    @given(st.binary(max_size=100))
    def test_round_trip(self, data: bytes) -> None:
        """decode(encode(x)) == x and the length is encoded_length(len(x))."""
        text = nix32.encode(data)
        self.assertEqual(len(text), nix32.encoded_length(len(data)))
        self.assertEqual(nix32.decode(text), data)

    @BOUNDED
    @given(st.text(max_size=60))
    def test_decode_raises_only_nix32_error(self, text: str) -> None:
        """decode on arbitrary text either round-trips or raises Nix32Error."""
        try:
            data = nix32.decode(text)
        except nix32.Nix32Error:
            return
        self.assertEqual(nix32.encode(data), text)


class HashProperties(SynchronousTestCase):
    """Hash forms round-trip."""

    @BOUNDED
    @given(any_hashes)
    def test_all_forms(self, h: Hash) -> None:
        """Every rendering parses back to the same hash."""
        for text in (h.to_string(), h.sri(), f"{h.algo}:{h.base16()}",
                     f"{h.algo}:{base64.b64encode(h.digest).decode()}"):
            self.assertEqual(parse_hash(text), h)
        self.assertEqual(parse_hash(h.nix32(), h.algo), h)


class NarInfoProperties(SynchronousTestCase):
    """narinfo parse/render."""

    @BOUNDED
    @given(narinfos())
    def test_round_trip(self, info: NarInfo) -> None:
        """parse(render(x)) == x for valid narinfos, from str and from bytes."""
        text = render_narinfo(info)
        self.assertEqual(parse_narinfo(text), info)
        self.assertEqual(parse_narinfo(text.encode()), info)
        self.assertEqual(render_narinfo(parse_narinfo(text)), text)

    @BOUNDED
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes give a narinfo or NarInfoError, never another exception."""
        try:
            info = parse_narinfo(data)
        except NarInfoError:
            return
        self.assertEqual(parse_narinfo(render_narinfo(info)), info)

    @BOUNDED
    @given(st.sampled_from([MINIMAL, SAMPLE]), st.data())
    def test_mutated_narinfo(self, text: str, data: st.DataObject) -> None:
        """Real narinfos with random edits give a narinfo or NarInfoError only."""
        raw = bytearray(text.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            op = data.draw(st.sampled_from(["set", "delete", "insert"]))
            if op == "set":
                raw[i] = data.draw(st.integers(0, 255))
            elif op == "delete":
                del raw[i]
            else:
                raw.insert(i, data.draw(st.sampled_from(b": \n\0\xff-/=")))
        try:
            parse_narinfo(bytes(raw))
        except NarInfoError:
            pass

    @BOUNDED
    @given(st.text(max_size=300))
    def test_arbitrary_text(self, text: str) -> None:
        """Arbitrary str input (surrogates included) gives a narinfo or NarInfoError only."""
        try:
            parse_narinfo(text)
        except NarInfoError:
            pass


_KEY = parse_secret_key(
    "test-1:7PkklNGdFMvOC2stB1+EhT9Gfh4hBLvpx+HFrKMNWyRYWr4KHNuWa9PDSBHZCGpq6EBYZZdg3RQhSEhSAOKgkA=="
)


class SigningProperties(SynchronousTestCase):
    """Signatures survive rendering and parsing."""

    @BOUNDED
    @given(narinfos())
    def test_signed_round_trip(self, info: NarInfo) -> None:
        """A narinfo we sign still verifies after render and parse, and only for its own fingerprint."""
        signed = parse_narinfo(render_narinfo(sign_narinfo(info, _KEY)))
        keys = {"test-1": _KEY.public_key}
        self.assertTrue(verify_any(signed.fingerprint(), signed.sigs, keys))
        assume(info.nar_size > 1)
        other = NarInfo(
            store_path=info.store_path, url=info.url, compression=info.compression, nar_hash=info.nar_hash,
            nar_size=info.nar_size - 1, references=info.references, sigs=signed.sigs,
        )
        self.assertFalse(verify_any(other.fingerprint(), other.sigs, keys))


def _parse_pieces(data: bytes, cuts: list[int]) -> None:
    reader = NarReader()
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        reader.feed(data[start:cut])
        start = cut
    reader.finish()


class NarReaderProperties(SynchronousTestCase):
    """NarReader raises only NarError, and accepts valid NARs however they are split."""

    @BOUNDED
    @given(nar_nodes(), st.lists(st.integers(min_value=0), max_size=10))
    def test_valid_any_split(self, node: bytes, cuts: list[int]) -> None:
        """A valid NAR is accepted whatever the feed boundaries."""
        _parse_pieces(nar(node), cuts)

    @BOUNDED
    @given(nar_nodes(), st.data())
    def test_truncated(self, node: bytes, data: st.DataObject) -> None:
        """Any proper prefix of a valid NAR raises NarError at finish."""
        whole = nar(node)
        n = data.draw(st.integers(0, len(whole) - 1))
        self.assertRaises(NarError, _parse_pieces, whole[:n], [])

    @BOUNDED
    @given(nar_nodes(), st.data())
    def test_mutated(self, node: bytes, data: st.DataObject) -> None:
        """Random edits to a valid NAR give acceptance or NarError, nothing else."""
        raw = bytearray(nar(node))
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(raw) - 1))
            op = data.draw(st.sampled_from(["set", "delete", "insert"]))
            if op == "set":
                raw[i] = data.draw(st.integers(0, 255))
            elif op == "delete":
                del raw[i]
            else:
                raw.insert(i, data.draw(st.integers(0, 255)))
        try:
            _parse_pieces(bytes(raw), data.draw(st.lists(st.integers(min_value=0), max_size=5)))
        except NarError:
            pass

    @BOUNDED
    @given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=5))
    def test_random_bytes(self, raw: bytes, cuts: list[int]) -> None:
        """Random bytes (with and without a valid magic) raise NarError only."""
        for data in (raw, nar(b"") + raw):
            try:
                _parse_pieces(data, cuts)
            except NarError:
                pass

    @BOUNDED
    @given(nar_nodes(), st.binary(max_size=20))
    def test_verifier(self, node: bytes, junk: bytes) -> None:
        """NarVerifier accepts the exact NAR and rejects it with bytes added or removed."""
        whole = nar(node)
        v = NarVerifier(Hash.sha256_of(whole), len(whole))
        v.feed(whole)
        v.finish()
        for other in (whole + junk, whole[:len(whole) - len(junk)]):
            if other == whole:
                continue
            v = NarVerifier(Hash.sha256_of(whole), len(whole))
            try:
                v.feed(other)
                v.finish()
            except NarError:
                continue
            self.fail("verifier accepted a different NAR")


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> object:
    """A filesystem tree spec: bytes (file), (bytes, True) (executable), str (symlink) or dict (directory)."""
    kinds = ["file", "exe", "link"] + (["dir"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "file":
        return draw(st.binary(max_size=300))
    if kind == "exe":
        return (draw(st.binary(max_size=50)), True)
    if kind == "link":
        return draw(st.text(_NAME_CHARS + "/", min_size=1, max_size=40))
    children = draw(st.dictionaries(st.text(_NAME_CHARS + "é ", min_size=1, max_size=10).filter(
        lambda n: n not in (".", "..")), trees(depth + 1), max_size=4))
    return children


def _materialise(path: str, spec: object) -> None:
    if isinstance(spec, dict):
        os.mkdir(path)
        for name, child in spec.items():
            _materialise(os.path.join(path, name), child)
    elif isinstance(spec, tuple):
        with open(path, "wb") as f:
            f.write(spec[0])
        os.chmod(path, 0o755)
    elif isinstance(spec, bytes):
        with open(path, "wb") as f:
            f.write(spec)
        os.chmod(path, 0o644)
    else:
        assert isinstance(spec, str)
        os.symlink(spec, path)


class WriterProperties(SynchronousTestCase):
    """The writer, size and listing agree with each other and with the reader."""

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(trees(), st.integers(min_value=1, max_value=300))
    def test_writer_reader_agree(self, spec: object, chunk_size: int) -> None:
        """For random trees: the NAR parses, nar_size is its length, listings agree, chunks are sized."""
        base = tempfile.mkdtemp(prefix="peernix-prop-")
        try:
            root = os.path.join(base, "t")
            _materialise(root, spec)
            chunks = list(nar_chunks(root, chunk_size))
            self.assertTrue(all(len(c) == chunk_size for c in chunks[:-1]))
            data = b"".join(chunks)
            self.assertEqual(nar_size(root), len(data))
            builder = NarListingBuilder()
            reader = NarReader(builder)
            reader.feed(data)
            reader.finish()
            self.assertEqual(builder.document(), nar_listing(root))
        finally:
            shutil.rmtree(base)
