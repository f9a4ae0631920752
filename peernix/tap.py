"""
``twistd peernix`` / ``twist peernix``: parse the options, build the service.

This is the only module that uses the global reactor (imported inside
functions, so loading the plugin never installs a reactor before twistd's
``--reactor`` option had its say).

Every start-up problem ends start-up with one line on stderr, saying what is
wrong and how to fix it, and exit status 1: never a traceback, never the
whole usage text (which twistd prints for a ``UsageError``).
"""

from __future__ import annotations

import os
import sys

# peernix speaks plain HTTP only.  pyOpenSSL (and cryptography) come with
# treq's dependency on Twisted[tls], and the reactor loads them whenever they
# are installed: about 12 MB of the daemon's memory, unused.  Unless
# something in this process loaded them already, they stay out (an import
# of a module set to None raises ImportError, which Twisted handles by
# going without TLS).
if "OpenSSL" not in sys.modules:
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import Application, IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from peernix.logging import json_log_observer, use_log_format
from peernix.nix.signing import KeyFormatError
from peernix.options import Config, ConfigError, PeernixOptions, config_from_file
from peernix.service import ListenError, build_service
from peernix.peers.trust import NixConfError
from peernix.store.local import StoreError

__all__ = ["Options", "makeService", "service_for_config", "application_from_environment"]

#: The environment variable naming the TOML config file of ``peernix.tac``.
CONFIG_ENV = "PEERNIX_CONFIG"


def _program() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "twist" if name in ("twist", "__main__.py") else "twistd"


def fail(message: str) -> SystemExit:
    """:returns: the ``SystemExit`` that ends start-up printing ``message``, one line."""
    return SystemExit("peernix: error: " + " ".join(message.split()))


class Options(PeernixOptions):
    """The ``peernix`` sub-command's options (generated from :data:`peernix.options.SETTINGS`)."""

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse, turning a usage error into a one-line exit.

        :raises SystemExit: for a bad option, value or config file.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            raise fail(f"{e} (see '{_program()} peernix --help')") from None


class _StartupErrors(MultiService):
    """
    The top service: turns a listen error at start-up into a one-line exit,
    when running in the foreground (a daemonising twistd reports the
    exception to its parent process itself).
    """

    def __init__(self, service: MultiService, *, foreground: bool) -> None:
        super().__init__()
        self.foreground = foreground
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            self._abort(e)

    def startService(self) -> None:
        try:
            super().startService()
        except ListenError as e:
            self._abort(e)

    def _abort(self, error: ListenError) -> None:
        if not self.foreground:
            raise error
        # Close what already started (listeners, thread pools) before
        # exiting; nothing of it is worth waiting for.
        if self.running:
            self.stopService()
        raise fail(str(error)) from None


def service_for_config(config: Config, reactor: Any = None, *, foreground: bool = True) -> IService:
    """
    Build the daemon's service, turning start-up errors into one-line exits.

    :param reactor: the reactor; the global one by default.
    :param foreground: whether errors at start may exit the process.
    :raises SystemExit: the store, key or config is unusable.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        service = build_service(config, reactor)
    except (StoreError, KeyFormatError, ConfigError, NixConfError) as e:
        raise fail(str(e)) from None
    return _StartupErrors(service, foreground=foreground)


def makeService(options: Options) -> IService:
    """
    ``IServiceMaker.makeService``: the service for parsed ``options``.

    :raises SystemExit: the store, key or config is unusable.
    """
    service = service_for_config(options.config, foreground=runs_in_foreground(options))
    # The log format is the runner's business: tell twist or twistd (see
    # peernix.logging for how each one is told).
    return use_log_format(service, options.config.log_format, options.parent)


def runs_in_foreground(options: usage.Options) -> bool:
    """
    :returns: whether the process stays in the foreground: always under
        ``twist`` (it has no ``--nodaemon``), with ``twistd --nodaemon``.
    """
    parent = options.parent
    return not isinstance(parent, Mapping) or bool(parent.get("nodaemon", True))


def application_from_environment(environ: Mapping[str, str]) -> Componentized:
    """
    The ``application`` of ``peernix.tac``: settings from the TOML file named
    by ``$PEERNIX_CONFIG`` (defaults without it).

    :raises SystemExit: the config, store or key is unusable.
    """
    try:
        config = config_from_file(environ.get(CONFIG_ENV) or None)
    except ConfigError as e:
        raise fail(str(e)) from None
    application: Componentized = Application("peernix")
    if config.log_format == "json":
        # twistd logs to an application's ILogObserver component.
        application.setComponent(ILogObserver, json_log_observer(sys.stdout))
    service_for_config(config).setServiceParent(application)
    return application
