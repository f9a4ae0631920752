"""Tests for :mod:`peernix.nix.narinfo`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import stat
import subprocess
import tempfile

import attrs
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import Hash, parse_hash
from peernix.nix.nar import nar_size
from peernix.nix.narinfo import (
    DEFAULT_COMPRESSION,
    MAX_NARINFO_SIZE,
    NarInfo,
    NarInfoError,
    is_valid_ca,
    parse_narinfo,
    render_narinfo,
)
from peernix.nix.pathinfo import PathInfo

# The real ``nix copy --to file://...?compression=none`` output quoted in
# nix-protocol.md section 1.3.
SAMPLE = """\
StorePath: /nix/store/d2ikp5l57nzcwzyn5bih0wamppidhnxm-withref
URL: nar/0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk.nar
Compression: none
FileHash: sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk
FileSize: 216
NarHash: sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk
NarSize: 216
References: n5zkgm04502f8ig8drnkcfs94xpcr6jw-d xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f
Sig: test-1:X7L2H/DdJF0aNuhBynisU99bruoSNVd1d8lW/T/+4Xz637gKyZBcl+FRfQfEji9N2dIdSin3Tv71iXpzDN+7Dw==
CA: text:sha256:0srqmkhx1xwz699vgjfq5g4vhjj3z8db3d32sz6cak48dn1kd1yb
"""
SAMPLE_FINGERPRINT = (
    b"1;/nix/store/d2ikp5l57nzcwzyn5bih0wamppidhnxm-withref;"
    b"sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk;216;"
    b"/nix/store/n5zkgm04502f8ig8drnkcfs94xpcr6jw-d,/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"
)
SAMPLE_SIG = (
    "test-1:X7L2H/DdJF0aNuhBynisU99bruoSNVd1d8lW/T/+4Xz637gKyZBcl+FRfQfEji9N2dIdSin3Tv71iXpzDN+7Dw=="
)

# A real narinfo of a built path with a self-reference, a deriver and a Sig
# by the key host-a-1 (nix-build with secret-key-files, then nix copy).
BUILT = """\
StorePath: /nix/store/kgc7s0fl7qfkwh1mcg2armv91dya7ajf-withref
URL: nar/04a27wwl38jw6f2mjp2pkyksqh8xsrsj4y8vxb403jwwnjpwdsx3.nar
Compression: none
FileHash: sha256:04a27wwl38jw6f2mjp2pkyksqh8xsrsj4y8vxb403jwwnjpwdsx3
FileSize: 568
NarHash: sha256:04a27wwl38jw6f2mjp2pkyksqh8xsrsj4y8vxb403jwwnjpwdsx3
NarSize: 568
References: 8khmaj1p3b5rg2bvk8ybhrxwsp6wvdmd-dep kgc7s0fl7qfkwh1mcg2armv91dya7ajf-withref
Deriver: i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv
Sig: host-a-1:HxRmsdBpAamF7OiekN0w1od9D/de5kvlwXGQkWtvnxdIUUQDnR1Tba4YME4iHEJuI1xS7b+o83oFyw+muMOdAQ==
"""

HELLO_HASH = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
HELLO_HEX = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
PATH = "/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"

MINIMAL = f"StorePath: {PATH}\nURL: nar/x.nar\nNarHash: {HELLO_HASH}\nNarSize: 120\n"


def _replace(text: str, key: str, line: str | None) -> str:
    """:returns: ``text`` with the line of ``key`` replaced by ``line`` (or removed)."""
    out = []
    for old in text.splitlines(keepends=True):
        if old.startswith(key + ":"):
            if line is not None:
                out.append(line + "\n")
        else:
            out.append(old)
    return "".join(out)


# -- real Nix helpers (also imported by the other peernix.nix tests) --------

NIX_MISSING = shutil.which("nix-store") is None
NIX_SKIP = "nix-store not installed"


def _rmtree(path: str) -> None:
    """Remove a tree that contains read-only store directories."""

    def onerror(func: object, p: str, exc: object) -> None:
        parent = os.path.dirname(p)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
            shutil.rmtree(p, onerror=onerror)
        else:
            os.unlink(p)

    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, stat.S_IRWXU)
    shutil.rmtree(path, onerror=onerror)


def scratch_dir(prefix: str) -> str:
    """:returns: a new temporary directory removed when the test process exits."""
    path = tempfile.mkdtemp(prefix=f"peernix-{prefix}-")
    atexit.register(_rmtree, path)
    return path


class NixEnv:
    """A chroot store plus the environment that keeps Nix away from the user's config and caches."""

    def __init__(self, prefix: str) -> None:
        self.root = scratch_dir(prefix)
        self.store = os.path.join(self.root, "store")
        conf = os.path.join(self.root, "conf")
        os.mkdir(conf)
        with open(os.path.join(conf, "nix.conf"), "w") as f:
            f.write("substituters =\nsandbox = false\nbuild-users-group =\n")
        self.env = dict(os.environ)
        self.env.update(
            NIX_CONF_DIR=conf,
            XDG_CACHE_HOME=os.path.join(self.root, "cache"),
            XDG_CONFIG_HOME=os.path.join(self.root, "config"),
            XDG_DATA_HOME=os.path.join(self.root, "data"),
            HOME=self.root,
        )

    def run(self, *args: str) -> str:
        """Run a Nix command; :returns: its stdout.  Raises on failure with stderr in the message."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def add(self, fs_path: str) -> str:
        """Add a file or tree to the chroot store; :returns: its store path."""
        return self.run("nix-store", "--store", self.store, "--add", fs_path).strip()

    def real_path(self, store_path: str) -> str:
        """:returns: where ``store_path`` lives on disk."""
        return self.store + store_path

    def build_with_refs(self, secret_key_file: str | None = None) -> str:
        """Build a path that refers to itself and to a dependency; :returns: its store path."""
        src = os.path.join(self.root, "src")
        os.makedirs(os.path.join(src, "bb"))
        shutil.copy("/bin/busybox", os.path.join(src, "bb", "busybox"))
        with open(os.path.join(src, "r.nix"), "w") as f:
            f.write(
                "let dep = derivation { name = \"dep\"; system = builtins.currentSystem;"
                " builder = \"${./bb}/busybox\"; args = [\"sh\" \"-c\" \"echo dep > $out\"]; };\n"
                "in derivation { name = \"withref\"; system = builtins.currentSystem;"
                " builder = \"${./bb}/busybox\"; args = [\"sh\" \"-c\""
                " \"mkdir $out; echo ${dep} > $out/r; echo $out > $out/self\"]; }\n"
            )
        args = ["nix-build", "--store", self.store, "--no-out-link"]
        if secret_key_file is not None:
            args += ["--option", "secret-key-files", secret_key_file]
        return self.run(*args, os.path.join(src, "r.nix")).strip().splitlines()[-1]

    def copy_to_file_cache(self, store_path: str, *, listing: bool = False) -> str:
        """``nix copy`` a path to a new ``file://`` cache with ``compression=none``; :returns: the cache dir."""
        cache = scratch_dir("cache")
        url = f"file://{cache}?compression=none"
        if listing:
            url += "&write-nar-listing=true"
        self.run(
            "nix", "--extra-experimental-features", "nix-command",
            "copy", "--to", url, "--store", self.store, store_path,
        )
        return cache

    def generate_key(self, name: str) -> tuple[str, str]:
        """Make a key pair with the real Nix; :returns: (secret key file, public key file)."""
        sk = os.path.join(self.root, f"{name}.sk")
        pk = os.path.join(self.root, f"{name}.pk")
        self.run("nix-store", "--generate-binary-cache-key", name, sk, pk)
        return sk, pk


def read_cache_file(cache: str, store_path: str, suffix: str) -> bytes:
    """:returns: ``<hash>.<suffix>`` of ``store_path`` from a file cache."""
    hash_part = os.path.basename(store_path)[:32]
    with open(os.path.join(cache, f"{hash_part}.{suffix}"), "rb") as f:
        return f.read()


def make_tree(root: str) -> None:
    """Create the directory of nix-protocol.md section 1.6 plus edge cases at ``root``."""
    os.makedirs(os.path.join(root, "sub"))
    with open(os.path.join(root, "B"), "w") as f:
        f.write("x")
    os.symlink("sub/a", os.path.join(root, "link"))
    with open(os.path.join(root, "run.sh"), "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(os.path.join(root, "run.sh"), 0o755)
    with open(os.path.join(root, "sub", "a"), "w") as f:
        f.write("data")


@functools.lru_cache(maxsize=None)
def built_closure() -> tuple[NixEnv, str, str, str]:
    """
    Build, once per test run, a signed path with references.

    :returns: (env, store path, file cache dir, public key file).
    """
    env = NixEnv("built")
    sk, pk = env.generate_key("peernix-test-1")
    path = env.build_with_refs(sk)
    return env, path, env.copy_to_file_cache(path, listing=True), pk


# -- tests --------------------------------------------------------------------


class ParseTests(SynchronousTestCase):
    """parse_narinfo on well-formed input."""

    def test_sample(self) -> None:
        """The real sample from nix-protocol.md parses into the expected fields."""
        info = parse_narinfo(SAMPLE)
        self.assertEqual(info.store_path, "/nix/store/d2ikp5l57nzcwzyn5bih0wamppidhnxm-withref")
        self.assertEqual(info.url, "nar/0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk.nar")
        self.assertEqual(info.compression, "none")
        self.assertEqual(info.file_hash, parse_hash("sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk"))
        self.assertEqual(info.file_size, 216)
        self.assertEqual(info.nar_hash, info.file_hash)
        self.assertEqual(info.nar_size, 216)
        self.assertEqual(
            info.references,
            ("n5zkgm04502f8ig8drnkcfs94xpcr6jw-d", "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"),
        )
        self.assertIsNone(info.deriver)
        self.assertEqual(info.sigs, (SAMPLE_SIG,))
        self.assertEqual(info.ca, "text:sha256:0srqmkhx1xwz699vgjfq5g4vhjj3z8db3d32sz6cak48dn1kd1yb")

    def test_bytes_and_str(self) -> None:
        """bytes, bytearray, memoryview and str input give the same result."""
        expected = parse_narinfo(SAMPLE)
        for data in (SAMPLE.encode(), bytearray(SAMPLE.encode()), memoryview(SAMPLE.encode())):
            self.assertEqual(parse_narinfo(data), expected)

    def test_built(self) -> None:
        """A built path keeps its self-reference, deriver basename and Sig."""
        info = parse_narinfo(BUILT)
        self.assertIn("kgc7s0fl7qfkwh1mcg2armv91dya7ajf-withref", info.references)
        self.assertEqual(info.deriver, "i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv")
        self.assertEqual(len(info.sigs), 1)

    def test_minimal(self) -> None:
        """Only StorePath, URL, NarHash and NarSize are required; Compression defaults to bzip2."""
        info = parse_narinfo(MINIMAL)
        self.assertEqual(info.compression, DEFAULT_COMPRESSION)
        self.assertEqual(info.compression, "bzip2")
        self.assertEqual(info.references, ())
        self.assertEqual(info.sigs, ())
        self.assertIsNone(info.ca)
        self.assertIsNone(info.deriver)
        self.assertIsNone(info.file_hash)
        self.assertIsNone(info.file_size)

    def test_empty_compression_is_bzip2(self) -> None:
        """An empty Compression value means bzip2, as in Nix."""
        self.assertEqual(parse_narinfo(MINIMAL + "Compression: \n").compression, "bzip2")

    def test_nar_hash_forms(self) -> None:
        """NarHash may be base16, nix32, base64 or SRI; all give the same hash."""
        h = parse_hash(HELLO_HASH)
        for form in (HELLO_HASH, "sha256:" + HELLO_HEX, h.sri(), "sha256:" + h.sri()[7:]):
            info = parse_narinfo(_replace(MINIMAL, "NarHash", f"NarHash: {form}"))
            self.assertEqual(info.nar_hash, h, form)

    def test_unknown_keys_ignored(self) -> None:
        """Unknown keys, including the old System field, are ignored."""
        text = "System: x86_64-linux\n" + MINIMAL + "Foo: bar: baz\nX-Peer: 1\n"
        self.assertEqual(parse_narinfo(text), parse_narinfo(MINIMAL))

    def test_later_value_wins(self) -> None:
        """Repeated keys other than References and CA overwrite earlier ones, as in Nix."""
        info = parse_narinfo(MINIMAL + "URL: nar/y.nar\nNarSize: 121\n")
        self.assertEqual(info.url, "nar/y.nar")
        self.assertEqual(info.nar_size, 121)

    def test_references_whitespace(self) -> None:
        """Runs of spaces separate references; an empty References line means none."""
        refs = "  n5zkgm04502f8ig8drnkcfs94xpcr6jw-d   xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f "
        info = parse_narinfo(MINIMAL + f"References: {refs}\n")
        self.assertEqual(len(info.references), 2)
        self.assertEqual(parse_narinfo(MINIMAL + "References: \n").references, ())

    def test_references_sorted_and_unique(self) -> None:
        """References come out sorted and without duplicates."""
        info = parse_narinfo(
            MINIMAL + "References: xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f n5zkgm04502f8ig8drnkcfs94xpcr6jw-d"
            " xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f\n"
        )
        self.assertEqual(
            info.references,
            ("n5zkgm04502f8ig8drnkcfs94xpcr6jw-d", "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"),
        )

    def test_unknown_deriver(self) -> None:
        """``Deriver: unknown-deriver`` means no deriver."""
        self.assertIsNone(parse_narinfo(MINIMAL + "Deriver: unknown-deriver\n").deriver)

    def test_malformed_sigs_dropped(self) -> None:
        """Malformed Sig lines are dropped, duplicates kept once, good ones kept in order."""
        other = "other-1:" + "A" * 86 + "=="
        text = MINIMAL + "".join(
            f"Sig: {s}\n"
            for s in (
                "garbage",
                SAMPLE_SIG,
                "test-1:" + "A" * 10,
                ":" + SAMPLE_SIG.split(":", 1)[1],
                "na me:" + SAMPLE_SIG.split(":", 1)[1],
                SAMPLE_SIG,
                other,
                "",
            )
        )
        self.assertEqual(parse_narinfo(text).sigs, (SAMPLE_SIG, other))

    def test_empty_ca_is_none(self) -> None:
        """An empty CA value means no content address, as in Nix."""
        self.assertIsNone(parse_narinfo(MINIMAL + "CA: \n").ca)

    def test_file_size_zero(self) -> None:
        """FileSize may be zero (only NarSize must not)."""
        self.assertEqual(parse_narinfo(MINIMAL + "FileSize: 0\n").file_size, 0)

    def test_other_file_hash_algorithm(self) -> None:
        """FileHash accepts any algorithm Nix knows (it is never verified)."""
        info = parse_narinfo(MINIMAL + "FileHash: sha512:" + "0" * 128 + "\n")
        self.assertEqual(info.file_hash, Hash("sha512", b"\0" * 64))

    def test_names_with_special_characters(self) -> None:
        """Store names with ``+ = ? . _ -`` parse."""
        path = "/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-a+b=c?d.e_f-g"
        info = parse_narinfo(_replace(MINIMAL, "StorePath", f"StorePath: {path}"))
        self.assertEqual(info.store_path, path)


class ParseErrorTests(SynchronousTestCase):
    """parse_narinfo rejects malformed input with NarInfoError only."""

    def assertBad(self, data: bytes | str) -> None:
        """``data`` raises NarInfoError."""
        self.assertRaises(NarInfoError, parse_narinfo, data)

    def test_missing_required(self) -> None:
        """A narinfo without StorePath, URL, NarHash or NarSize is rejected."""
        for key in ("StorePath", "URL", "NarHash", "NarSize"):
            self.assertBad(_replace(MINIMAL, key, None))

    def test_empty_url(self) -> None:
        """An empty URL is rejected."""
        self.assertBad(_replace(MINIMAL, "URL", "URL: "))

    def test_url_with_control_characters(self) -> None:
        """A URL with spaces, tabs, CR or non-ASCII is rejected."""
        for url in ("nar/x .nar", "nar/x.nar\r", "nar/\tx", "nar/é.nar"):
            self.assertBad(_replace(MINIMAL, "URL", f"URL: {url}"))

    def test_nar_size_zero(self) -> None:
        """NarSize 0 is rejected, as Nix says "NarSize missing or zero"."""
        self.assertBad(_replace(MINIMAL, "NarSize", "NarSize: 0"))

    def test_bad_numbers(self) -> None:
        """Sizes that are not plain decimal u64 numbers are rejected."""
        for value in ("-1", "+1", "1.0", "0x10", "", " 1", "1 ", "١٢", "18446744073709551616", "9" * 30):
            self.assertBad(_replace(MINIMAL, "NarSize", f"NarSize: {value}"))
            self.assertBad(MINIMAL + f"FileSize: {value}\n")

    def test_largest_size(self) -> None:
        """The largest u64 is accepted as a size."""
        info = parse_narinfo(_replace(MINIMAL, "NarSize", f"NarSize: {2**64 - 1}"))
        self.assertEqual(info.nar_size, 2**64 - 1)

    def test_bad_nar_hash(self) -> None:
        """A malformed or non-sha256 NarHash is rejected."""
        for value in (
            "sha256:xyz",
            HELLO_HASH[7:],
            "sha1:" + "0" * 40,
            "sha512:" + "0" * 128,
            "md5:" + "0" * 32,
            HELLO_HASH + " ",
        ):
            self.assertBad(_replace(MINIMAL, "NarHash", f"NarHash: {value}"))

    def test_bad_file_hash(self) -> None:
        """A malformed FileHash is rejected."""
        self.assertBad(MINIMAL + "FileHash: sha256:nope\n")

    def test_bad_store_path(self) -> None:
        """A StorePath that is not a valid path under /nix/store is rejected."""
        for value in (
            "/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c",
            "/gnu/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f",
            "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f",
            "/nix/store/ep0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f",
            PATH + " ",
            PATH + "/bin",
        ):
            self.assertBad(_replace(MINIMAL, "StorePath", f"StorePath: {value}"))

    def test_bad_references(self) -> None:
        """References that are not valid basenames (full paths included) are rejected."""
        for value in (PATH, "foo", "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-", "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f,x"):
            self.assertBad(MINIMAL + f"References: {value}\n")

    def test_references_twice(self) -> None:
        """A second References line is rejected."""
        self.assertBad(MINIMAL + "References: \nReferences: \n")

    def test_ca_twice(self) -> None:
        """A second CA line is rejected."""
        ca = "fixed:r:sha256:0ba7mwn6wz5h8v1hlcc8bz4nvg9jhplgjzvj06lj39b47qp5qfya"
        self.assertBad(MINIMAL + f"CA: {ca}\nCA: {ca}\n")

    def test_bad_ca(self) -> None:
        """A CA value Nix cannot parse is rejected."""
        for value in ("text:sha1:" + "0" * 40, "fixed", "foo:sha256:" + HELLO_HEX, "fixed:r:", "text:" + HELLO_HEX):
            self.assertBad(MINIMAL + f"CA: {value}\n")

    def test_bad_deriver(self) -> None:
        """A Deriver that is not a basename is rejected."""
        for value in ("", "/nix/store/i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv", "x.drv"):
            self.assertBad(MINIMAL + f"Deriver: {value}\n")

    def test_no_final_newline(self) -> None:
        """The last line must end in a newline."""
        self.assertBad(MINIMAL.rstrip("\n"))

    def test_references_without_space(self) -> None:
        """``References:`` without the space (which makes Nix eat the next line) is rejected."""
        self.assertBad(MINIMAL + "References:\nSig: " + SAMPLE_SIG + "\n")

    def test_line_grammar(self) -> None:
        """Lines without ``: ``, with an empty key, or empty lines are rejected."""
        for extra in ("Foo\n", "Foo:bar\n", ": x\n", "\n", "Foo:\n", "Foo:\tbar\n"):
            self.assertBad(MINIMAL + extra)
            self.assertBad(extra + MINIMAL)

    def test_crlf(self) -> None:
        """CRLF line endings are rejected (the CR would end up in the values)."""
        self.assertBad(MINIMAL.replace("\n", "\r\n"))

    def test_empty(self) -> None:
        """Empty input is rejected."""
        self.assertBad(b"")
        self.assertBad("")

    def test_too_large(self) -> None:
        """Input over the size cap is rejected before parsing."""
        padding = "X-Pad: " + "a" * 1000 + "\n"
        big = MINIMAL + padding * (MAX_NARINFO_SIZE // len(padding) + 1)
        self.assertBad(big)
        self.assertBad(big.encode())
        ok = MINIMAL + "X-Pad: " + "a" * (MAX_NARINFO_SIZE - len(MINIMAL) - 8) + "\n"
        self.assertEqual(len(ok), MAX_NARINFO_SIZE)
        self.assertEqual(parse_narinfo(ok), parse_narinfo(MINIMAL))

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are rejected."""
        self.assertBad(MINIMAL.encode() + b"X: \xff\xfe\n")

    def test_lone_surrogate(self) -> None:
        """A str with a lone surrogate (not encodable as UTF-8) is rejected."""
        self.assertBad(MINIMAL + "Sig: \ud800-1:" + "A" * 86 + "==\n")

    def test_wrong_type(self) -> None:
        """Input that is neither bytes nor str is rejected with NarInfoError."""
        self.assertBad(None)  # type: ignore[arg-type]
        self.assertBad(42)  # type: ignore[arg-type]

    def test_error_is_value_error(self) -> None:
        """NarInfoError is a ValueError, so generic input-error handlers catch it."""
        self.assertTrue(issubclass(NarInfoError, ValueError))


class RenderTests(SynchronousTestCase):
    """render_narinfo writes what Nix writes."""

    def test_sample_byte_exact(self) -> None:
        """Rendering the parsed real samples reproduces them byte for byte."""
        for text in (SAMPLE, BUILT):
            self.assertEqual(render_narinfo(parse_narinfo(text)), text)

    def test_minimal(self) -> None:
        """Optional fields are left out; References is always written with its trailing space."""
        info = NarInfo(
            store_path=PATH,
            url="nar/x.nar",
            compression="none",
            nar_hash=parse_hash("sha256:" + HELLO_HEX),
            nar_size=120,
        )
        self.assertEqual(
            render_narinfo(info),
            f"StorePath: {PATH}\nURL: nar/x.nar\nCompression: none\n"
            f"NarHash: {HELLO_HASH}\nNarSize: 120\nReferences: \n",
        )

    def test_field_order(self) -> None:
        """Fields come in Nix's order, one Sig line per signature."""
        info = attrs.evolve(
            parse_narinfo(SAMPLE),
            deriver="i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv",
            sigs=(SAMPLE_SIG, "b-1:" + "B" * 86 + "=="),
        )
        keys = [line.split(":", 1)[0] for line in render_narinfo(info).splitlines()]
        self.assertEqual(
            keys,
            ["StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
             "References", "Deriver", "Sig", "Sig", "CA"],
        )

    def test_round_trip(self) -> None:
        """parse(render(x)) == x, with a hash given in base16 rendered as nix32."""
        info = NarInfo(
            store_path=PATH,
            url="nar/x.nar?hash=xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c",
            compression="zstd",
            nar_hash=parse_hash("sha256:" + HELLO_HEX),
            nar_size=120,
            references=(PATH.rsplit("/", 1)[1], "n5zkgm04502f8ig8drnkcfs94xpcr6jw-d"),
            deriver="i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv",
            sigs=(SAMPLE_SIG,),
            ca="fixed:sha256:" + HELLO_HEX,
            file_hash=parse_hash("sha256:" + HELLO_HEX),
            file_size=99,
        )
        text = render_narinfo(info)
        self.assertIn(f"NarHash: {HELLO_HASH}\n", text)
        self.assertEqual(parse_narinfo(text), info)
        self.assertEqual(parse_narinfo(text.encode()), info)

    def test_newline_injection(self) -> None:
        """A field containing a newline cannot forge extra lines: rendering raises."""
        info = parse_narinfo(MINIMAL)
        for evil in (
            attrs.evolve(info, url="nar/x.nar\nSig: evil-1:" + "A" * 86 + "=="),
            attrs.evolve(info, compression="none\nX: y"),
            attrs.evolve(info, sigs=("a\nb",)),
            attrs.evolve(info, ca="x\n"),
            attrs.evolve(info, deriver="x\ny"),
        ):
            self.assertRaises(NarInfoError, render_narinfo, evil)


class FingerprintTests(SynchronousTestCase):
    """NarInfo.fingerprint matches Nix's."""

    def test_sample(self) -> None:
        """The sample's fingerprint is the vector of nix-protocol.md 1.5."""
        self.assertEqual(parse_narinfo(SAMPLE).fingerprint(), SAMPLE_FINGERPRINT)

    def test_no_references(self) -> None:
        """Without references the fingerprint ends in ``;``."""
        self.assertEqual(
            parse_narinfo(MINIMAL).fingerprint(),
            f"1;{PATH};{HELLO_HASH};120;".encode(),
        )

    def test_hash_form_irrelevant(self) -> None:
        """The fingerprint always uses nix32, whatever form the narinfo used."""
        info = parse_narinfo(_replace(MINIMAL, "NarHash", f"NarHash: sha256:{HELLO_HEX}"))
        self.assertEqual(info.fingerprint(), f"1;{PATH};{HELLO_HASH};120;".encode())


class FromPathInfoTests(SynchronousTestCase):
    """NarInfo.from_path_info turns DB rows into narinfos."""

    def test_basenames(self) -> None:
        """References and deriver become basenames; everything else is copied."""
        info = NarInfo.from_path_info(
            PathInfo(
                path=PATH,
                nar_hash=parse_hash(HELLO_HASH),
                nar_size=120,
                references=(PATH, "/nix/store/n5zkgm04502f8ig8drnkcfs94xpcr6jw-d"),
                deriver="/nix/store/i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv",
                sigs=(SAMPLE_SIG,),
            ),
            url="nar/x.nar",
        )
        self.assertEqual(info.references, ("n5zkgm04502f8ig8drnkcfs94xpcr6jw-d", PATH[11:]))
        self.assertEqual(info.deriver, "i7a1igq61zb0lbj5qj5nd0lvyb0pxq6s-withref.drv")
        self.assertEqual(info.compression, "none")
        self.assertEqual(parse_narinfo(render_narinfo(info)), info)

    def test_file_fields_uncompressed(self) -> None:
        """With Compression none, FileHash/FileSize equal NarHash/NarSize, in Nix's writer's field order."""
        info = NarInfo.from_path_info(
            PathInfo(path=PATH, nar_hash=parse_hash(HELLO_HASH), nar_size=120, references=(), deriver=None, sigs=()),
            url="x.nar",
        )
        self.assertEqual((info.file_hash, info.file_size), (info.nar_hash, 120))
        lines = render_narinfo(info).splitlines()
        self.assertEqual(
            [line.split(":", 1)[0] for line in lines],
            ["StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References"],
        )
        self.assertIn(f"FileHash: {HELLO_HASH}", lines)
        self.assertIn("FileSize: 120", lines)

    def test_file_fields_left_out_when_compressed(self) -> None:
        """For an on-the-fly compressed file the file hash is unknown: FileHash/FileSize are left out."""
        info = NarInfo.from_path_info(
            PathInfo(path=PATH, nar_hash=parse_hash(HELLO_HASH), nar_size=120, references=(), deriver=None, sigs=()),
            url="x.nar.zst",
            compression="zstd",
        )
        self.assertEqual((info.file_hash, info.file_size), (None, None))
        self.assertNotIn("File", render_narinfo(info))


class CATests(SynchronousTestCase):
    """is_valid_ca accepts the content addresses Nix writes."""

    def test_valid(self) -> None:
        """text, fixed, fixed:r and fixed:git forms with any hash encoding are valid."""
        for ca in (
            "text:sha256:0srqmkhx1xwz699vgjfq5g4vhjj3z8db3d32sz6cak48dn1kd1yb",
            "fixed:r:sha256:0ba7mwn6wz5h8v1hlcc8bz4nvg9jhplgjzvj06lj39b47qp5qfya",
            "fixed:sha256:" + HELLO_HEX,
            "fixed:sha1:" + "0" * 40,
            "fixed:git:sha1:" + "0" * 40,
            "fixed:r:" + parse_hash(HELLO_HASH).sri(),
        ):
            self.assertTrue(is_valid_ca(ca), ca)

    def test_invalid(self) -> None:
        """Other methods, text with a non-sha256 hash and bare digests are invalid."""
        for ca in ("", "text", "text:", "text:md5:" + "0" * 32, "fixed:" + HELLO_HEX, "nar:sha256:" + HELLO_HEX,
                   "fixed:r:r:sha256:" + HELLO_HEX):
            self.assertFalse(is_valid_ca(ca), ca)


class RealNixTests(SynchronousTestCase):
    """Parse and render what a real ``nix copy --to file://`` writes."""

    if NIX_MISSING:
        skip = NIX_SKIP

    def test_added_paths(self) -> None:
        """Narinfos of added files and trees round-trip byte for byte and match the files."""
        env = NixEnv("narinfo")
        src = scratch_dir("src")
        make_tree(os.path.join(src, "tree"))
        with open(os.path.join(src, "a+b=c?d.e"), "w") as f:
            f.write("hello\n")
        with open(os.path.join(src, "empty"), "w"):
            pass
        for name in ("tree", "a+b=c?d.e", "empty"):
            path = env.add(os.path.join(src, name))
            cache = env.copy_to_file_cache(path)
            raw = read_cache_file(cache, path, "narinfo")
            info = parse_narinfo(raw)
            self.assertEqual(info.store_path, path)
            self.assertEqual(info.compression, "none")
            self.assertEqual(info.nar_size, nar_size(env.real_path(path)))
            self.assertIsNotNone(info.ca)
            self.assertEqual(render_narinfo(info).encode(), raw)

    def test_built_path(self) -> None:
        """A built, signed path with a self-reference round-trips byte for byte."""
        env, path, cache, _pk = built_closure()
        raw = read_cache_file(cache, path, "narinfo")
        info = parse_narinfo(raw)
        self.assertIn(os.path.basename(path), info.references)
        self.assertEqual(len(info.references), 2)
        self.assertIsNotNone(info.deriver)
        self.assertEqual(len(info.sigs), 1)
        self.assertTrue(info.sigs[0].startswith("peernix-test-1:"))
        self.assertEqual(render_narinfo(info).encode(), raw)

    def test_nix_accepts_our_rendering(self) -> None:
        """Nix reads back a narinfo we rendered (with hashes we re-encoded) from a file cache."""
        env, path, cache, _pk = built_closure()
        name = os.path.basename(path)[:32] + ".narinfo"
        with open(os.path.join(cache, name), "rb") as f:
            original = f.read()
        info = parse_narinfo(original)
        ours = scratch_dir("ours")
        shutil.copytree(cache, ours, dirs_exist_ok=True)
        # Rewrite with a base16 NarHash to prove we normalise it to nix32.
        text = render_narinfo(info).replace(info.nar_hash.to_string(), "sha256:" + info.nar_hash.base16())
        reparsed = parse_narinfo(text)
        with open(os.path.join(ours, name), "w") as f:
            f.write(render_narinfo(reparsed))
        out = env.run(
            "nix", "--extra-experimental-features", "nix-command", "path-info", "--json",
            "--store", f"file://{ours}", path,
        )
        [seen] = json.loads(out)
        self.assertEqual(parse_hash(seen["narHash"]), info.nar_hash)
        self.assertEqual(seen["narSize"], info.nar_size)
        self.assertEqual(seen["signatures"], list(info.sigs))
