# nix-darwin module: services.peernix, a launchd daemon.
#
#   imports = [ peernix.darwinModules.default ];
#   services.peernix = {
#     enable = true;
#     secretKeyFile = "/var/lib/peernix/secret-key";   # optional; root-only (chmod 600)
#     trustedPublicKeys = [ "builder-peernix-1:..." ];
#   };
#
# The same settings as the NixOS module (see ./nixos-module.nix and
# docs/install.rst).  launchd has no credentials mechanism, so the daemon
# (root, like nix-daemon) reads the key file itself; activation warns when
# anyone but root can read it.  With nix.enable = false (Determinate Nix),
# nix-darwin writes no nix.conf: the module warns with the lines to add.  macOS has no declarative firewall: allow
# incoming connections for peernix in the application firewall, if it is on.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.peernix;
  peernixLib = import ./lib.nix;
  inherit (lib) mkOption types;

  settingValue = types.nullOr (types.oneOf [ types.bool types.int types.float types.str (types.listOf types.str) ]);

  configFile = pkgs.writeText "peernix.toml" (peernixLib.toTOML cfg.settings);
in
{
  options.services.peernix = {
    enable = lib.mkEnableOption "peernix, a LAN-wide Nix binary cache that serves this machine's store to its peers and substitutes from theirs";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The peernix package; its `bin/peernix` runs the daemon.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf settingValue;
        options = {
          port = mkOption {
            type = types.port;
            default = peernixLib.defaults.port;
            description = "TCP port of the HTTP binary cache (peers and the local Nix use it).";
          };
          interface = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "Listen on this address only; `null`: every address, IPv6 and IPv4.";
          };
        };
      };
      default = { };
      example = lib.literalExpression ''{ peers = [ "http://192.0.2.7:9999" ]; log_format = "json"; }'';
      description = ''
        peernix's settings, written to the TOML file passed with `--config`;
        the keys are the config-file keys of peernix's configuration
        reference (snake_case names of its options).  `null` leaves a
        setting at peernix's default.  Use `secretKeyFile` instead of
        `secret_key_file`.
      '';
    };

    secretKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/peernix/secret-key";
      description = ''
        A Nix secret key (`nix-store --generate-binary-cache-key
        "$(hostname -s)-peernix-1" SECRET PUBLIC`) to sign the paths this
        machine serves from its own store: a path as a string, outside the
        Nix store, owned by root with mode 600.  It is never copied into
        the store.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "builder-peernix-1:AbCd...=" ];
      description = ''
        Public keys of the LAN's machines whose own builds this machine
        accepts, added to `nix.settings.extra-trusted-public-keys`.
      '';
    };

    logFile = mkOption {
      type = types.str;
      default = "/var/log/peernix.log";
      description = "Where launchd writes the daemon's output (its log).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = peernixLib.secretKeyFileProblem cfg.secretKeyFile == null;
        message = toString (peernixLib.secretKeyFileProblem cfg.secretKeyFile);
      }
      {
        assertion = !(cfg.settings ? secret_key_file);
        message = "services.peernix: set secretKeyFile instead of settings.secret_key_file";
      }
      {
        assertion = cfg.settings.port != 0;
        message = "services.peernix.settings.port: the local Nix needs a fixed port, not 0";
      }
    ];

    launchd.daemons.peernix.serviceConfig = {
      ProgramArguments = [ (lib.getExe' cfg.package "peernix") ]
        ++ peernixLib.arguments { configFile = "${configFile}"; secretKeyArgument = cfg.secretKeyFile; };
      RunAtLoad = true;
      KeepAlive = true;
      ProcessType = "Background";
      StandardOutPath = cfg.logFile;
      StandardErrorPath = cfg.logFile;
    };

    # No `stat`: its flags differ between macOS's and GNU coreutils', which
    # nix-darwin's activation PATH puts first (see lib.nix).
    system.activationScripts.postActivation.text = lib.mkIf (cfg.secretKeyFile != null)
      (lib.mkAfter (peernixLib.secretKeyCheckScript cfg.secretKeyFile));

    # Same as on NixOS: no ?trusted=1, no trusted-substituters, no empty
    # extra-trusted-public-keys line; and a warning when nix.conf is not
    # managed by nix-darwin (nix.enable = false, e.g. Determinate Nix).
    nix.settings.extra-substituters = [ (peernixLib.substituterUrl cfg.settings) ];
    nix.settings.extra-trusted-public-keys = lib.mkIf (cfg.trustedPublicKeys != [ ]) cfg.trustedPublicKeys;
    warnings = lib.optional (!(config.nix.enable or true))
      (peernixLib.manualNixConfWarning { inherit (cfg) settings trustedPublicKeys; });
  };
}
