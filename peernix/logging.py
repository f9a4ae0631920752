"""
The daemon's log format: Twisted's text lines, or one JSON object per line.

peernix logs with :mod:`twisted.logger`: every event carries its values as
fields (``peer=``, ``port=``, ``error=``) besides the rendered message.  The
runner (``twistd`` or ``twist``) decides where the log goes and how it looks;
``--log-format json`` (setting ``log_format``) makes it write each event as
one flat JSON object on one line, the form journald, Loki and ``jq``
consume::

    {"time": "2025-01-01T12:00:00.000000Z", "level": "info",
     "namespace": "peernix.service", "message": "peernix 0.1.0 serving ...",
     "port": 9999, ...}

How the format reaches the runner, which sets up logging only after the
plugin's ``makeService`` returned:

* ``twist peernix``: :func:`use_log_format` sets the ``fileLogObserverFactory``
  of twist's own options, which twist reads when it starts logging (so
  ``twist --log-file`` still chooses the file).  peernix's setting replaces
  twist's own ``--log-format`` (given before ``peernix``).
* ``twistd peernix``: :func:`use_log_format` wraps the service in a
  :class:`LogObserverProvider`, which sets an ``ILogObserver`` component on
  the application twistd creates for it, the hook twistd offers for a
  custom observer.  It writes where twistd would: standard output with
  ``--nodaemon`` (and ``--logfile -``), else ``--logfile`` (``twistd.log``).
  An explicit ``--logger`` or ``--syslog`` wins.
* ``twistd -ny peernix.tac``: :func:`peernix.tap.application_from_environment`
  sets the component itself; JSON goes to standard output.

Nothing here logs request bodies or key material: events carry what their
emitters put in them, and peernix's emitters log key *names* and public
keys only (tested in :mod:`peernix.test.test_logging`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any

from twisted.application.service import IService, MultiService
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent, textFileLogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

__all__ = [
    "LogObserverProvider",
    "event_as_json_line",
    "json_log_observer",
    "twistd_log_stream",
    "use_log_format",
]

#: Event keys written under another name (or not at all: ``log_logger`` and
#: ``log_source`` are the emitting objects, ``log_io`` duplicates the text
#: of legacy events, ``log_trace`` is Twisted's debugging aid).
_RESERVED = frozenset({
    "log_time", "log_level", "log_namespace", "log_format", "log_failure", "log_system",
    "log_logger", "log_source", "log_io", "log_trace", "log_text", "log_flattened",
    "message", "format", "time", "isError", "why", "failure", "system",
})

#: The longest text kept of one field's value that is not plain JSON data
#: (its ``repr``): a log line must stay a line a person can read.
MAX_REPR = 1000


def _jsonable(value: object, depth: int = 0) -> object:
    """
    :returns: ``value`` as JSON data: scalars as they are, lists and string-keyed
        mappings item by item (three levels deep), anything else as a
        shortened ``repr`` (which for peernix's key objects never shows the
        secret half: :class:`~peernix.nix.signing.SecretKey` hides its seed).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # NaN and infinities are not JSON.
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if depth < 3:
        if isinstance(value, (list, tuple, frozenset, set)):
            return [_jsonable(item, depth + 1) for item in value]
        if isinstance(value, Mapping):
            return {str(key): _jsonable(item, depth + 1) for key, item in value.items()}
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."


def _timestamp(event: LogEvent) -> str:
    """:returns: the event's time as RFC 3339 UTC with microseconds (now if it has none)."""
    when = event.get("log_time")
    seconds = float(when) if isinstance(when, (int, float)) else time.time()
    whole = int(seconds)
    micro = int(round((seconds - whole) * 1_000_000))
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micro:06d}Z"


def event_as_json_line(event: LogEvent) -> str:
    """
    Render one log event as one line of JSON.

    The object has ``time`` (RFC 3339, UTC), ``level`` (``debug`` ...
    ``critical``), ``namespace``, ``message`` (the rendered format string),
    ``system`` for events of Twisted's legacy log, ``error`` and
    ``traceback`` when the event carries a failure, and every other field of
    the event under its own name (values that are not JSON data as their
    shortened ``repr``).  Newlines inside values are escaped by JSON, so the
    output is exactly one line.

    :param event: a :mod:`twisted.logger` event.
    :returns: the JSON text followed by ``"\\n"``.
    """
    level = event.get("log_level")
    record: dict[str, object] = {
        "time": _timestamp(event),
        "level": getattr(level, "name", "info"),
        "namespace": str(event.get("log_namespace", "")),
        "message": formatEvent(event),
    }
    system = event.get("log_system", event.get("system"))
    if system not in (None, "-"):
        record["system"] = str(system)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = f"{getattr(failure.type, '__name__', 'Error')}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not isinstance(key, str) or key in _RESERVED or key.startswith("log_"):
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def json_log_observer(stream: IO[Any]) -> FileLogObserver:
    """
    :param stream: where to write (a text or binary file; binary gets UTF-8).
    :returns: an observer writing each event as :func:`event_as_json_line`;
        it has the signature of twist's ``fileLogObserverFactory``.
    """
    return FileLogObserver(stream, event_as_json_line)


def twistd_log_stream(runner_options: Mapping[str, Any]) -> IO[Any]:
    """
    :param runner_options: twistd's parsed options.
    :returns: where twistd itself would write its log: standard output when
        it stays in the foreground without ``--logfile`` or with
        ``--logfile -``, else the file ``--logfile`` names (``twistd.log``
        by default; rotated by size as twistd rotates it).
    """
    name = str(runner_options.get("logfile") or "")
    foreground = bool(runner_options.get("nodaemon"))
    if name == "-" or (foreground and not name):
        return sys.stdout
    stream: IO[Any] = LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-untyped-call]
    return stream


class LogObserverProvider(MultiService):
    """
    Holds the daemon's service and, when twistd gives it its application as
    parent, registers an ``ILogObserver`` on that application: the observer
    twistd then starts logging to (unless ``--logger`` overrides it).

    :ivar observer_factory: makes the observer, once, when the parent is set.
    """

    def __init__(self, service: IService, observer_factory: Callable[[], ILogObserver]) -> None:
        """
        :param service: the daemon's top service, made a child of this one.
        :param observer_factory: called once, at :meth:`setServiceParent`.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.observer_factory = observer_factory
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Register the observer on ``parent`` if it is an application, then join it."""
        # Twisted's Componentized and Service carry no annotations.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:  # type: ignore[no-untyped-call]
            parent.setComponent(ILogObserver, self.observer_factory())  # type: ignore[no-untyped-call]
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]


def use_log_format(service: IService, log_format: str, runner_options: object) -> IService:
    """
    Make the runner log in ``log_format`` (see the module documentation).

    :param service: the daemon's top service.
    :param log_format: ``"text"`` or ``"json"``.
    :param runner_options: the runner's own parsed options (the parent of
        the plugin's options): twist's or twistd's; anything else (tests,
        ``None``) leaves logging alone.
    :returns: the service to hand to the runner: ``service`` itself, or a
        :class:`LogObserverProvider` around it under twistd with ``json``.
    """
    if not isinstance(runner_options, MutableMapping):
        return service
    if "fileLogObserverFactory" in runner_options:
        # twist: reads this factory when it starts logging, after makeService.
        factory: Callable[[IO[Any]], FileLogObserver] = (
            json_log_observer if log_format == "json" else textFileLogObserver
        )
        runner_options["fileLogObserverFactory"] = factory
        runner_options["logFormat"] = log_format
        return service
    if log_format != "json" or runner_options.get("logger") or runner_options.get("syslog"):
        # twistd's own observer (text lines, --logfile, --syslog) or --logger.
        return service
    return LogObserverProvider(service, lambda: json_log_observer(twistd_log_stream(runner_options)))
