{
  description = "peernix: a LAN-wide Nix binary cache; every machine serves its store to its peers and substitutes from them";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      linuxSystems = [ "x86_64-linux" "aarch64-linux" ];
      darwinSystems = [ "x86_64-darwin" "aarch64-darwin" ];
      forSystems = systems: f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The Python environment of the checks: peernix's dependencies and its
      # test extra (hypothesis, mypy with mypy-zope, sphinx).
      testPython = pkgs: pkgs.python3.withPackages (ps:
        self.packages.${pkgs.stdenv.hostPlatform.system}.default.pythonDependencies
        ++ [ ps.hypothesis ps.mypy ps.mypy-zope ps.sphinx ]);

      # The checkout as the checks see it (the flake's own source).
      source = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [ ./setup.py ./setup.cfg ./README.rst ./peernix ./twisted ./docs ./peernix.tac ];
      };
    in
    {
      packages = forSystems (linuxSystems ++ darwinSystems) (pkgs: rec {
        peernix = pkgs.callPackage ./nix/package.nix { };
        default = peernix;
      });

      overlays.default = final: prev: {
        peernix = final.callPackage ./nix/package.nix { };
      };

      # The modules default services.peernix.package to this flake's build.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/nixos-module.nix ];
        services.peernix.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
      darwinModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/darwin-module.nix ];
        services.peernix.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      checks = forSystems linuxSystems (pkgs: {
        # trial, as CI runs it (tests needing root or a network namespace skip).
        trial = self.packages.${pkgs.stdenv.hostPlatform.system}.default.overridePythonAttrs (_: { doCheck = true; });

        # mypy --strict with mypy-zope, configured in setup.cfg.
        mypy = pkgs.runCommand "peernix-mypy" { nativeBuildInputs = [ (testPython pkgs) ]; } ''
          cp -r ${source} src && chmod -R u+w src && cd src
          export HOME=$(mktemp -d) MYPY_CACHE_DIR=$(mktemp -d)
          mypy
          touch $out
        '';

        # The documentation, warnings as errors.
        docs = pkgs.runCommand "peernix-docs" { nativeBuildInputs = [ (testPython pkgs) ]; } ''
          cp -r ${source} src && chmod -R u+w src && cd src
          sphinx-build -W -q -b html docs $out
        '';

        # Every .nix file parses; the modules' pure helpers evaluate.
        nix-files = pkgs.runCommand "peernix-nix-files" { nativeBuildInputs = [ pkgs.nix ]; } ''
          for f in ${./flake.nix} ${./nix}/*.nix; do
            nix-instantiate --parse "$f" > /dev/null
          done
          touch $out
        '';

        # The NixOS module on a real machine: the unit starts, serves, and
        # nix.conf names it as a substituter (without ?trusted=1).
        nixos = pkgs.testers.runNixOSTest {
          name = "peernix";
          nodes.machine = {
            imports = [ self.nixosModules.default ];
            services.peernix = {
              enable = true;
              openFirewall = true;
              settings = { mdns = false; negative_ttl = 5; };
            };
          };
          testScript = ''
            machine.wait_for_unit("peernix.service")
            machine.wait_until_succeeds("curl -sf http://127.0.0.1:9999/nix-cache/nix-cache-info | grep -q 'StoreDir: /nix/store'")
            machine.succeed("grep -q 'http://127.0.0.1:9999/nix-cache' /etc/nix/nix.conf")
            machine.fail("grep -q 'trusted=1' /etc/nix/nix.conf")
            machine.succeed("curl -sf http://127.0.0.1:9999/ | grep -q peernix")
          '';
        };
      });

      formatter = forSystems (linuxSystems ++ darwinSystems) (pkgs: pkgs.nixpkgs-fmt);
    };
}
