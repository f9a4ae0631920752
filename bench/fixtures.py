"""
The benchmark's fixture: a chroot Nix store built with the real Nix CLI,
signed with a ``bench-1`` key, plus a ``file://`` binary cache copy of it
(``compression=none``) for nginx to serve, and an empty store for the
proxying peernix.

Everything lives under ``bench/fixtures/<profile>-<parameters>/`` (ignored by
git).  A fixture whose ``manifest.json`` exists was completed with the same
parameters and is reused as is; a half-built one is deleted and rebuilt.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

from attrs import asdict, frozen

# The private Nix environment of the test fixtures: the same isolation here.
from peernix.test.nixenv import isolated_env
from peernix.test.nixenv import remove_tree as remove_tree  # re-exported: bench.load, bench.soak

#: Where fixtures are kept (``bench/fixtures``, git-ignored).
FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

#: The static busybox used as the only builder tool of the chain derivations.
BUSYBOX = "/bin/busybox"

#: Bumped whenever the way a fixture is built changes, so old ones are rebuilt.
FIXTURE_VERSION = 3

_NIX_COMMAND = ("--extra-experimental-features", "nix-command")


# A small vocabulary so small paths are realistic, compressible text.
_WORDS = (
    "nix store path derivation closure reference narinfo substituter signature "
    "build output hash peer cache network lan download daemon twisted reactor "
    "deferred protocol request response header body stream chunk compress "
    "zstd gzip latency throughput benchmark fixture chain busybox sqlite"
).split()


class FixtureError(Exception):
    """Building the fixture failed; the message says which command and why."""


@frozen
class FixtureParams:
    """
    What a fixture contains.

    :ivar small_count: number of small text paths.
    :ivar small_bytes: approximate size of each small path's file.
    :ivar big_mb: cap of the big directory path, in MiB.
    :ivar chain_length: number of chained derivations (the closure has one
        more path: the busybox source directory the first one refers to).
    :ivar compressible_mb: cap of the compressible path (real text files:
        Python sources, scripts, documentation), in MiB.
    """

    small_count: int
    small_bytes: int
    big_mb: int
    chain_length: int
    compressible_mb: int

    @property
    def key(self) -> str:
        """:returns: the fixture directory name for these parameters."""
        return (f"v{FIXTURE_VERSION}-s{self.small_count}x{self.small_bytes}"
                f"-b{self.big_mb}-c{self.chain_length}-z{self.compressible_mb}")


#: The full suite's fixture (the issue's sizes).
FULL = FixtureParams(small_count=2000, small_bytes=2048, big_mb=500, chain_length=50, compressible_mb=100)
#: The ``--quick`` fixture.
QUICK = FixtureParams(small_count=100, small_bytes=2048, big_mb=20, chain_length=10, compressible_mb=5)


@frozen
class Fixture:
    """
    A built fixture (all paths absolute; store paths are ``/nix/store/...``).

    :ivar root: the fixture directory.
    :ivar store: the chroot store root holding everything (signed by bench-1).
    :ivar empty_store: a chroot store with nothing in it.
    :ivar canary_store: a chroot store holding only :attr:`canary` (signed
        by bench-1): the fan-out peers serve it, so the benchmark can check
        that a client peernix really asks its peers.
    :ivar canary: the one path of :attr:`canary_store` (in no other store).
    :ivar file_cache: the ``file://`` binary cache copy (``compression=none``).
    :ivar secret_key_file: the bench-1 secret key.
    :ivar public_key: the bench-1 public key text, ``bench-1:...``.
    :ivar small: the small paths.
    :ivar big: the big directory path.
    :ivar chain_top: the last chain derivation output.
    :ivar chain_closure: the chain's whole closure (``chain_length + 1`` paths).
    :ivar big_nar_size: the big path's NAR size in bytes.
    :ivar compressible: the compressible directory path (text files).
    :ivar compressible_nar_size: its NAR size in bytes.
    :ivar build_seconds: how long building took (0 when reused).
    """

    root: str
    store: str
    empty_store: str
    canary_store: str
    canary: str
    file_cache: str
    secret_key_file: str
    public_key: str
    small: tuple[str, ...]
    big: str
    chain_top: str
    chain_closure: tuple[str, ...]
    big_nar_size: int
    compressible: str
    compressible_nar_size: int
    build_seconds: float

    @property
    def all_paths(self) -> tuple[str, ...]:
        """:returns: every store path of the fixture."""
        return (*self.small, self.big, *self.chain_closure, self.compressible)

    def nar_url_in_file_cache(self, store_path: str) -> str:
        """
        :returns: the ``URL:`` line of ``store_path``'s narinfo in the file
            cache (relative to the cache root, e.g. ``nar/<hash>.nar``).
        :raises FixtureError: if the narinfo has no URL line.
        """
        with open(os.path.join(self.file_cache, hash_part(store_path) + ".narinfo")) as f:
            for line in f:
                if line.startswith("URL:"):
                    return line.split(":", 1)[1].strip()
        raise FixtureError(f"no URL in the narinfo of {store_path}")


def hash_part(store_path: str) -> str:
    """:returns: the 32-character hash part of ``/nix/store/<hash>-<name>``."""
    return os.path.basename(store_path)[:32]


def run(args: Sequence[str], env: Mapping[str, str], timeout: float = 1800) -> str:
    """
    Run a command, returning its standard output.

    :raises FixtureError: on a non-zero exit status, with its standard error.
    """
    done = subprocess.run(list(args), env=dict(env), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise FixtureError(f"{' '.join(args[:6])} ... exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode()


def check_tools() -> list[str]:
    """:returns: a message per missing tool the fixture needs (empty when all are there)."""
    missing = []
    for tool in ("nix-store", "nix-build", "nix"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found (Debian: apt-get install nix-bin)")
    if not os.access(BUSYBOX, os.X_OK):
        missing.append(f"{BUSYBOX} not found (Debian: apt-get install busybox-static)")
    return missing


def _small_texts(params: FixtureParams) -> Iterator[tuple[str, str]]:
    rng = random.Random(1)
    for i in range(params.small_count):
        words: list[str] = []
        size = 0
        while size < params.small_bytes:
            w = rng.choice(_WORDS)
            words.append(w)
            size += len(w) + 1
        lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
        yield f"small-{i:05d}.txt", f"# bench small path {i}\n" + "\n".join(lines) + "\n"


def _is_text(path: str) -> bool:
    """:returns: whether ``path``'s first 8 KiB are UTF-8 text without NUL bytes."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # a character cut at the end of the sample
    return True


def _copy_mixed_files(dest: str, cap_bytes: int, text_only: bool = False) -> int:
    """
    Copy real files from ``/usr/lib`` and ``/usr/share`` into ``dest`` until
    ``cap_bytes`` are copied (regular files and symlinks; no file over a
    quarter of the cap, so the mix stays varied).

    :param text_only: copy only text files (and no symlinks): a compressible path.
    :returns: the number of bytes copied.
    """
    total = 0
    for source in ("/usr/share", "/usr/lib"):
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            # Our own fixtures may sit below /usr in odd set-ups; never recurse into /nix.
            dirnames[:] = [d for d in dirnames if d != "nix"]
            rel = os.path.relpath(dirpath, "/usr")
            for name in sorted(filenames):
                src = os.path.join(dirpath, name)
                target_dir = os.path.join(dest, rel)
                try:
                    st = os.lstat(src)
                    if stat.S_ISLNK(st.st_mode) and not text_only:
                        os.makedirs(target_dir, exist_ok=True)
                        os.symlink(os.readlink(src), os.path.join(target_dir, name))
                        continue
                    if not stat.S_ISREG(st.st_mode) or st.st_size > cap_bytes // 4:
                        continue
                    if text_only and not _is_text(src):
                        continue
                    if total + st.st_size > cap_bytes:
                        return total
                    os.makedirs(target_dir, exist_ok=True)
                    shutil.copyfile(src, os.path.join(target_dir, name))
                    if st.st_mode & 0o111:
                        os.chmod(os.path.join(target_dir, name), 0o755)
                    total += st.st_size
                except OSError:
                    continue
    return total


_CHAIN_EXPR = """\
let
  mk = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "${{./bb}}/busybox";
    args = [ "sh" "-c" script ];
    PATH = "${{./bb}}";
  }};
  step = i: prev: mk "chain-${{toString i}}"
    "mkdir $out; echo ${{prev}} > $out/prev; echo link ${{toString i}} > $out/data";
  go = i: prev: if i > {n} then prev else go (i + 1) (step i prev);
in go 1 "${{./bb}}"
"""


def _log(msg: str) -> None:
    print(f"[fixture] {msg}", flush=True)


def build(params: FixtureParams, fixtures_dir: str = FIXTURES_DIR) -> Fixture:
    """
    Build (or reuse) the fixture for ``params``.

    :returns: the fixture.
    :raises FixtureError: if a Nix command fails or a tool is missing.
    """
    missing = check_tools()
    if missing:
        raise FixtureError("; ".join(missing))
    root = os.path.join(os.path.abspath(fixtures_dir), params.key)
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            data = json.load(f)
        if data.get("params") == asdict(params):
            _log(f"reusing {root}")
            fx = data["fixture"]
            fx["build_seconds"] = 0.0
            for k in ("small", "chain_closure"):
                fx[k] = tuple(fx[k])
            return Fixture(**fx)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    # Fixtures of older FIXTURE_VERSIONs are never used again (about 1 GB each).
    for old in os.listdir(os.path.dirname(root)):
        if re.match(r"v\d+-", old) and not old.startswith(f"v{FIXTURE_VERSION}-"):
            _log(f"removing outdated fixture {old}")
            remove_tree(os.path.join(os.path.dirname(root), old))
    remove_tree(root)
    os.makedirs(root)
    started = time.monotonic()
    env = isolated_env(os.path.join(root, "nixenv"))
    store = os.path.join(root, "store")
    empty = os.path.join(root, "empty-store")
    canary_store = os.path.join(root, "canary-store")
    cache = os.path.join(root, "file-cache")
    sk = os.path.join(root, "bench-1.sk")
    pk = os.path.join(root, "bench-1.pk")

    _log(f"building {root}")
    # --store: without it key generation opens (and writes) the host's /nix/var.
    run(["nix-store", "--store", os.path.join(root, "keygen-store"),
         "--generate-binary-cache-key", "bench-1", sk, pk], env)
    remove_tree(os.path.join(root, "keygen-store"))
    with open(pk) as f:
        public_key = f.read().strip()
    run(["nix-store", "--store", store, "--init"], env)
    run(["nix-store", "--store", empty, "--init"], env)
    canary_file = os.path.join(root, "canary.txt")
    with open(canary_file, "w") as f:
        f.write("peernix bench canary: found through a peer\n")
    canary = run(["nix-store", "--store", canary_store, "--add", canary_file], env).split()[-1]
    run(["nix", *_NIX_COMMAND, "store", "sign", "--store", canary_store, "-k", sk, canary], env)
    os.unlink(canary_file)

    work = tempfile.mkdtemp(prefix="work-", dir=root)
    _log(f"adding {params.small_count} small paths")
    small_dir = os.path.join(work, "small")
    os.makedirs(small_dir)
    names = []
    for name, text in _small_texts(params):
        with open(os.path.join(small_dir, name), "w") as f:
            f.write(text)
        names.append(os.path.join(small_dir, name))
    small: list[str] = []
    # Many files per call: one nix-store process per path would take minutes.
    for i in range(0, len(names), 250):
        out = run(["nix-store", "--store", store, "--add", *names[i:i + 250]], env)
        small += [line for line in out.splitlines() if line]
    if len(small) != params.small_count:
        raise FixtureError(f"expected {params.small_count} small paths, got {len(small)}")

    _log(f"copying ~{params.big_mb} MiB of /usr/share and /usr/lib for the big path")
    big_src = os.path.join(work, "big-mixed")
    copied = _copy_mixed_files(big_src, params.big_mb << 20)
    _log(f"adding the big path ({copied >> 20} MiB)")
    big = run(["nix-store", "--store", store, "--add", big_src], env).split()[-1]
    remove_tree(big_src)

    _log(f"copying ~{params.compressible_mb} MiB of text files for the compressible path")
    text_src = os.path.join(work, "text")
    copied = _copy_mixed_files(text_src, params.compressible_mb << 20, text_only=True)
    _log(f"adding the compressible path ({copied >> 20} MiB)")
    compressible = run(["nix-store", "--store", store, "--add", text_src], env).split()[-1]
    remove_tree(text_src)

    _log(f"building a chain of {params.chain_length} derivations")
    chain_dir = os.path.join(work, "chain")
    bb = os.path.join(chain_dir, "bb")
    os.makedirs(bb)
    shutil.copy(BUSYBOX, os.path.join(bb, "busybox"))
    for applet in ("sh", "mkdir", "cat"):
        os.symlink("busybox", os.path.join(bb, applet))
    with open(os.path.join(chain_dir, "default.nix"), "w") as f:
        f.write(_CHAIN_EXPR.format(n=params.chain_length))
    chain_top = run(["nix-build", "--store", store, "--option", "sandbox", "false",
                     "--option", "build-users-group", "", "--option", "substituters", "",
                     "--option", "secret-key-files", sk, "--no-out-link",
                     os.path.join(chain_dir, "default.nix")], env).split()[-1]
    closure = [p for p in run(["nix-store", "--store", store, "-qR", chain_top], env).splitlines() if p]
    if len(closure) != params.chain_length + 1:
        raise FixtureError(f"chain closure has {len(closure)} paths, expected {params.chain_length + 1}")
    remove_tree(work)

    _log("signing every path with bench-1")
    run(["nix", *_NIX_COMMAND, "store", "sign", "--store", store, "-k", sk,
         *small, big, *closure, compressible], env)
    # .drv files and other build leftovers are not part of the benchmark;
    # copy only the benchmark's paths to the file cache.
    _log("copying to the file:// cache (compression=none)")
    run(["nix", *_NIX_COMMAND, "copy", "--store", store, "--to",
         f"file://{cache}?compression=none", *small, big, *closure, compressible], env)
    info = json.loads(run(["nix", *_NIX_COMMAND, "path-info", "--store", store, "--json", big, compressible], env))
    sizes = {i["path"]: int(i["narSize"]) for i in info}
    fixture = Fixture(
        root=root, store=store, empty_store=empty, canary_store=canary_store, canary=canary, file_cache=cache,
        secret_key_file=sk, public_key=public_key, small=tuple(small), big=big,
        chain_top=chain_top, chain_closure=tuple(closure),
        big_nar_size=sizes[big], compressible=compressible, compressible_nar_size=sizes[compressible],
        build_seconds=time.monotonic() - started)
    data = {"params": asdict(params), "fixture": asdict(fixture)}
    with open(manifest + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.rename(manifest + ".tmp", manifest)
    _log(f"built in {fixture.build_seconds:.1f} s")
    return fixture
