# NixOS module: services.peernix.
#
#   imports = [ peernix.nixosModules.default ];
#   services.peernix = {
#     enable = true;
#     openFirewall = true;
#     secretKeyFile = "/var/lib/peernix/secret-key";   # optional: sign own builds
#     trustedPublicKeys = [ "builder-peernix-1:..." ];  # the LAN's keys you trust
#     settings.peers = [ "http://192.0.2.7:9999" ];
#   };
#
# See docs/install.rst.  The pure parts (TOML, URLs, ports, hardening) are
# in ./lib.nix, where the tests evaluate them.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.peernix;
  peernixLib = import ./lib.nix;
  inherit (lib) mkOption types;

  settingValue = types.nullOr (types.oneOf [ types.bool types.int types.float types.str (types.listOf types.str) ]);

  configFile = pkgs.writeText "peernix.toml" (peernixLib.toTOML cfg.settings);

  arguments = peernixLib.arguments {
    configFile = "${configFile}";
    secretKeyArgument = if cfg.secretKeyFile == null then null else peernixLib.credentialPath;
  };
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
          udp_port = mkOption {
            type = types.nullOr types.port;
            default = null;
            description = "UDP port for announcements and queries; `null`: the same as `port`.";
          };
          interface = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "Listen on this address only; `null`: every address, IPv6 and IPv4.";
          };
          mdns = mkOption {
            type = types.bool;
            default = peernixLib.defaults.mdns;
            description = "Find peers with mDNS (`_peernix._tcp`); `openFirewall` opens UDP 5353 for it.";
          };
          share = mkOption {
            type = types.enum [ "trusted" "all" ];
            default = "trusted";
            example = "all";
            description = ''
              What peers may download from this machine's store.
              `trusted`: only paths whose Nix database entry carries a
              signature by a trusted key (`trustedPublicKeys`, the rest of
              `trusted-public-keys`, or this machine's own `secretKeyFile`
              key when Nix signed the build with it): what came from
              cache.nixos.org and your signed builds.  Unsigned local builds
              (configuration, secrets, private sources) and unsigned
              content-addressed paths are withheld and answer like missing
              paths.  `all`: every valid path, for a LAN of machines you
              administer.  Local clients always see the whole store.
            '';
          };
        };
      };
      default = { };
      example = lib.literalExpression ''
        {
          peers = [ "http://192.0.2.7:9999" "http://[2001:db8::7]:9999" ];
          negative_ttl = 10;
          log_format = "json";
          share = "all";
        }
      '';
      description = ''
        peernix's settings, written to the TOML file passed with `--config`.
        The keys are the config-file keys of peernix's configuration
        reference (the snake_case names of its command-line options:
        `peer_timeout` for `--peer-timeout`, `peers` for the repeatable
        `--peer`), so every setting is reachable; `null` leaves a setting at
        peernix's default.  peernix refuses an unknown key or a bad value
        at start-up, naming it.  Use `secretKeyFile` instead of
        `secret_key_file`.
      '';
    };

    secretKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/peernix/secret-key";
      description = ''
        A Nix secret key (`nix-store --generate-binary-cache-key
        "$(hostname)-peernix-1" SECRET PUBLIC`) to sign the paths this
        machine serves from its own store.  A path as a string, outside the
        Nix store, readable by root only: systemd hands it to the service
        with `LoadCredential=`, and it is never copied into the store.
        Give every machine a key with its own name: Nix trusts one key per
        name.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "builder-peernix-1:AbCd...=" ];
      description = ''
        Public keys of the LAN's machines whose own builds this machine
        accepts, added to `nix.settings.extra-trusted-public-keys`.  Nix
        checks every signature itself; peernix passes a peer's answer on
        only when it is signed by a key Nix trusts (these, cache.nixos.org's
        and any others in `trusted-public-keys`).  Trusting a key means
        trusting that machine completely.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the TCP port (HTTP), the UDP port (announcements and
        queries) and, with mDNS on, UDP port 5353.
      '';
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
        message = "services.peernix: set secretKeyFile instead of settings.secret_key_file, so systemd passes the key as a credential";
      }
      {
        assertion = cfg.settings.port != 0;
        message = "services.peernix.settings.port: the local Nix needs a fixed port, not 0";
      }
    ];

    systemd.services.peernix = {
      description = "peernix LAN Nix binary cache";
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ configFile ];
      serviceConfig = peernixLib.hardening // {
        ExecStart = lib.concatStringsSep " " ([ (lib.getExe' cfg.package "peernix") ] ++ arguments);
      } // lib.optionalAttrs (cfg.secretKeyFile != null) {
        LoadCredential = "${peernixLib.credentialName}:${cfg.secretKeyFile}";
      };
    };

    networking.firewall = lib.mkIf cfg.openFirewall (peernixLib.firewall cfg.settings);

    # The local Nix asks peernix first (it announces priority 30, ahead of
    # cache.nixos.org's 40).  No ?trusted=1 and no trusted-substituters: Nix
    # checks every narinfo's signature against trusted-public-keys.
    # No keys, no extra-trusted-public-keys line (NixOS would write an
    # empty one).  With nix.enable = false NixOS writes no nix.conf at all:
    # warn with the lines to add by hand.
    nix.settings.extra-substituters = [ (peernixLib.substituterUrl cfg.settings) ];
    nix.settings.extra-trusted-public-keys = lib.mkIf (cfg.trustedPublicKeys != [ ]) cfg.trustedPublicKeys;
    warnings = lib.optional (!(config.nix.enable or true))
      (peernixLib.manualNixConfWarning { inherit (cfg) settings trustedPublicKeys; });
  };
}
