"""
The soak test's three stores, built with the real Nix CLI through
:mod:`peernix.test.nixenv` and kept in ``bench/fixtures/soak-v<N>/``
(git-ignored) for the next run:

- store ``a``: small text paths, a three-path closure built with busybox and
  a few MB-sized paths (random, hence incompressible, and one of text);
- store ``b``: a different set of the same kinds;
- store ``c``: empty.

Every path of ``a`` and ``b`` is signed by the ``soak-1`` key, which every
daemon trusts, so each path is reachable from every daemon: locally from its
holder, through a peer from the two others.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence

from attrs import asdict, frozen

from bench.fixtures import FIXTURES_DIR, remove_tree
from peernix.test.nixenv import ChrootStore, generate_key, run_nix

#: Bumped whenever the way the fixture is built changes, so an old one is rebuilt.
SOAK_FIXTURE_VERSION = 1

_WORDS = ("peer cache store path narinfo signature closure daemon chaos soak freeze thaw restart "
          "latency descriptor memory stream relay trusted answer miss hit nix lan").split()


@frozen
class SoakPath:
    """
    One store path of the fixture and what a correct answer about it says.

    :ivar path: ``/nix/store/<hash>-<name>``.
    :ivar nar_hash: its NarHash as Nix prints it (``sha256:...``).
    :ivar nar_size: its NAR size in bytes.
    :ivar holder: the index of the daemon whose store holds it (0 = a, 1 = b).
    """

    path: str
    nar_hash: str
    nar_size: int
    holder: int

    @property
    def hash_part(self) -> str:
        """:returns: the 32-character hash part of :attr:`path`."""
        return os.path.basename(self.path)[:32]


@frozen
class SoakFixture:
    """
    The built fixture.

    :ivar root: its directory.
    :ivar stores: the three store roots (a, b, c; c is empty).
    :ivar public_key: the ``soak-1:...`` public key every daemon trusts.
    :ivar paths: every path of stores a and b.
    :ivar build_seconds: how long building took (0 when reused).
    """

    root: str
    stores: tuple[str, str, str]
    public_key: str
    paths: tuple[SoakPath, ...]
    build_seconds: float


@frozen
class SoakFixtureParams:
    """
    What the fixture holds.

    :ivar small_count: small text paths per non-empty store.
    :ivar big_mib: sizes in MiB of the MB-sized paths of store a and of store b.
    """

    small_count: int = 150
    big_mib: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 4, 8), (2, 6))

    @property
    def key(self) -> str:
        """:returns: the fixture directory name for these parameters."""
        sizes = "_".join("-".join(str(m) for m in group) for group in self.big_mib)
        return f"soak-v{SOAK_FIXTURE_VERSION}-s{self.small_count}-b{sizes}"


def _log(msg: str) -> None:
    print(f"[soak fixture] {msg}", flush=True)


def _add_small(store: ChrootStore, tag: str, count: int, scratch: str, rng: random.Random) -> list[str]:
    """Add ``count`` small text files (1-8 KiB) in a few ``nix-store --add`` calls."""
    directory = os.path.join(scratch, f"small-{tag}")
    os.makedirs(directory)
    names = []
    for i in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(150, 1200))]
        name = os.path.join(directory, f"soak-{tag}-{i:04d}.txt")
        with open(name, "w") as f:
            f.write(f"# soak path {tag} {i}\n" + " ".join(words) + "\n")
        names.append(name)
    added: list[str] = []
    # One nix-store process per path would take a minute; 100 per call.
    for i in range(0, len(names), 100):
        out = run_nix(["nix-store", "--store", store.root, "--add", *names[i:i + 100]], store.env).stdout
        added += [line for line in out.decode().splitlines() if line]
    if len(added) != count:
        raise RuntimeError(f"expected {count} small paths in store {tag}, got {len(added)}")
    return added


def _add_text_mib(store: ChrootStore, tag: str, mib: int, rng: random.Random) -> str:
    """Add one compressible text file of ``mib`` MiB (written in pieces, never whole in memory)."""
    scratch = os.path.join(store.env_dir, "work", f"text-{tag}")
    os.makedirs(scratch, exist_ok=True)
    full = os.path.join(scratch, f"soak-{tag}-text-{mib}m.txt")
    with open(full, "w") as f:
        written = 0
        while written < mib << 20:
            line = " ".join(rng.choice(_WORDS) for _ in range(16)) + "\n"
            f.write(line)
            written += len(line)
    try:
        return store.add_file(full)
    finally:
        os.unlink(full)


def _fill(store: ChrootStore, tag: str, params: SoakFixtureParams, sizes: Sequence[int], sk: str,
          seed: int) -> list[str]:
    rng = random.Random(seed)
    scratch = os.path.join(store.env_dir, "work", "soak")
    os.makedirs(scratch, exist_ok=True)
    paths = _add_small(store, tag, params.small_count, scratch, rng)
    paths += list(store.build_closure(secret_key_file=sk, tag=f"soak-{tag}").outputs)
    for i, mib in enumerate(sizes):
        paths.append(store.make_big_path(mib << 20, name=f"soak-{tag}-random-{mib}m", seed=seed * 100 + i))
    paths.append(_add_text_mib(store, tag, 1, rng))
    store.sign(paths, sk)
    return paths


def build(params: SoakFixtureParams = SoakFixtureParams(), fixtures_dir: str = FIXTURES_DIR) -> SoakFixture:
    """
    Build the fixture, or reuse it when ``manifest.json`` says it was
    completed with the same parameters.

    :returns: the fixture.
    :raises peernix.test.nixenv.NixCommandError: when a Nix command fails.
    """
    root = os.path.join(os.path.abspath(fixtures_dir), params.key)
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            data = json.load(f)
        if data.get("key") == params.key:
            _log(f"reusing {root}")
            return SoakFixture(root=data["root"], stores=tuple(data["stores"]),  # type: ignore[arg-type]
                               public_key=data["public_key"],
                               paths=tuple(SoakPath(**p) for p in data["paths"]), build_seconds=0.0)
    remove_tree(root)
    os.makedirs(root)
    started = time.monotonic()
    _log(f"building {root}")
    sk, _, public_key = generate_key(os.path.join(root, "keys"), "soak-1")
    stores = [ChrootStore(os.path.join(root, name)) for name in ("store-a", "store-b", "store-c")]
    paths: list[SoakPath] = []
    for holder, (tag, sizes) in enumerate(zip(("a", "b"), params.big_mib)):
        _log(f"filling store {tag}")
        made = _fill(stores[holder], tag, params, sizes, sk, seed=holder + 1)
        for info in stores[holder].path_info_json(made):
            paths.append(SoakPath(path=str(info["path"]), nar_hash=str(info["narHash"]),
                                  nar_size=int(str(info["narSize"])), holder=holder))
    fixture = SoakFixture(root=root, stores=(stores[0].root, stores[1].root, stores[2].root),
                          public_key=public_key, paths=tuple(paths),
                          build_seconds=time.monotonic() - started)
    data = {"key": params.key, "root": root, "stores": list(fixture.stores), "public_key": public_key,
            "paths": [asdict(p) for p in paths]}
    with open(manifest + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.rename(manifest + ".tmp", manifest)
    _log(f"built {len(paths)} paths in {fixture.build_seconds:.1f} s")
    return fixture
