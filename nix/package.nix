# peernix, built from this checkout with nixpkgs' Python packages.
#
#   nix build .#default        (the flake)
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./nix/package.nix { }'
#
# $out/bin/peernix runs the daemon in the foreground: it is
# `twistd --nodaemon --pidfile= peernix ARGS...`, so it takes peernix's options
# (`peernix --help`); `peernix doctor ARGS...` checks the set-up (the console
# script of setup.cfg, peernix.cli:main).  The tests do not run here (they need a Nix store and
# loopback sockets); the flake's `checks` run them.
{ lib
, python3Packages
, nix
, busybox
, doCheck ? false
}:

let
  inherit (python3Packages) python;
  # setup.cfg's install_requires, by their nixpkgs names (Twisted[tls] is
  # twisted plus its tls extra); ifaddr is imported directly for the
  # interface list, besides being zeroconf's dependency.
  dependencies = with python3Packages; [
    twisted
    klein
    treq
    attrs
    zope-interface
    pynacl
    zeroconf
    ifaddr
    prometheus-client
    zstandard
  ] ++ python3Packages.twisted.optional-dependencies.tls
  # peernix/zstd.py: Python 3.14's compression.zstd, else its backport.
  ++ lib.optionals (python3Packages.pythonOlder "3.14") [ backportsZstd ];
  # The minimum nixpkgs: one with python3Packages.backports-zstd (in
  # nixos-unstable since late 2025: NixOS 26.05 and newer, nixos-unstable
  # since December 2025; NixOS 25.05 and older do not have it), or one
  # whose python3 is 3.14 or newer.
  # python-zstandard, which older nixpkgs have, cannot replace it: its
  # streaming decompressor has no output bound (a few KiB of a peer's zstd
  # expand into any size in one call), and the NAR relay relies on one.
  backportsZstd = python3Packages.backports-zstd or (throw ''
    peernix needs python3Packages.backports-zstd (the zstd module of Python 3.14, backported),
    which this nixpkgs does not have: use NixOS 26.05 or newer, or nixos-unstable since December 2025,
    or peernix's flake's package (packages.''${system}.default, built with the flake's own nixpkgs),
    or callPackage ./nix/package.nix { python3Packages = python314Packages; } where nixpkgs has Python 3.14.
  '');
  version = builtins.head
    (builtins.match ".*__version__ = \"([^\"]+)\".*" (builtins.readFile ../peernix/__init__.py));
in
python3Packages.buildPythonApplication {
  pname = "peernix";
  inherit version;
  pyproject = true;

  # Only what the wheel needs: no docs, benchmarks or CI scripts, no
  # bytecode or trial leftovers of a working tree.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.intersection
      (lib.fileset.unions [
        ../setup.py
        ../setup.cfg
        ../README.rst
        ../peernix
        ../twisted
        ../peernix.tac
      ])
      (lib.fileset.fileFilter (file: !(file.hasExt "pyc")) ../.);
  };

  build-system = [ python3Packages.setuptools ];

  inherit dependencies;

  nativeCheckInputs = with python3Packages; [ hypothesis nix busybox ];

  # The twistd plugin lives in $out's twisted/plugins; twistd finds it on
  # sys.path.  Build Twisted's plugin cache now: the store is read-only at
  # run time.  Then the entry point (the daemon, or `peernix doctor`),
  # wrapped (by the builder's wrapPythonPrograms) with every dependency on
  # sys.path.
  postInstall = ''
    PYTHONPATH=$out/${python.sitePackages}:$PYTHONPATH ${python.interpreter} -c \
      'from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))'
    mkdir -p $out/bin
    cat > $out/bin/peernix <<'EOF'
    #!${python.interpreter}
    """peernix: the daemon in the foreground (twistd --nodaemon --pidfile= peernix ARGS...), or peernix doctor ARGS..."""
    import sys
    from peernix.cli import main
    sys.exit(main())
    EOF
    chmod +x $out/bin/peernix
  '';

  inherit doCheck;
  # Trial, as CI runs it; tests needing root (network namespaces) skip.
  checkPhase = ''
    runHook preCheck
    export HOME=$(mktemp -d)
    ${python.interpreter} -m twisted.trial --temp-directory="$HOME/_trial_temp" peernix
    runHook postCheck
  '';

  # For the flake's checks, which need the same environment plus test tools.
  passthru = { pythonDependencies = dependencies; };

  pythonImportsCheck = [ "peernix" "peernix.tap" "peernix.service" "peernix.cli" "peernix.doctor" ];

  meta = {
    description = "A LAN-wide Nix binary cache: every machine serves its store to its peers and substitutes from them";
    license = lib.licenses.mit;
    mainProgram = "peernix";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
