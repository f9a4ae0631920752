"""
The ``peernix`` command (a console script next to the twistd plugin).

* ``peernix doctor [DAEMON OPTIONS] [--json] [--timeout SECONDS]`` checks
  this machine's set-up and prints one line per check (see
  :mod:`peernix.doctor`).  It takes every option of the daemon and its
  ``--config`` file, so it checks the daemon as that command line starts
  it.  Exit status: 0 when no check found a problem, 1 when one did, 2 for
  a bad command line.
* ``peernix [DAEMON OPTIONS]`` runs the daemon in the foreground:
  ``twistd --nodaemon --pidfile= peernix DAEMON OPTIONS`` (what the Nix
  package's ``bin/peernix`` has always done).

Also ``python -m peernix.cli``.  The doctor's modules are imported only
for the doctor, so the daemon started this way loads nothing extra.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.python import usage

from peernix.options import ConfigError, PeernixOptions, make_config, read_config_file

#: Exit status for a command line that cannot be parsed.
USAGE_ERROR = 2

#: Seconds each HTTP request of the doctor may take by default (see
#: :func:`peernix.doctor_io.http_get`).
DEFAULT_TIMEOUT = 3.0

USAGE = """\
Usage: peernix doctor [daemon options] [--json] [--timeout SECONDS]
       peernix [daemon options]

  peernix doctor   Check this machine's set-up (the daemon, nix.conf, keys,
                   Nix, peers, ports) and say what to fix; exit status 1 when
                   a check finds a problem.  'peernix doctor --help' for more.
  peernix          Run the daemon in the foreground, as
                   'twistd --nodaemon --pidfile= peernix [daemon options]'.

"""


class DoctorOptions(PeernixOptions):
    """
    ``peernix doctor``: every daemon option (generated from
    :data:`peernix.options.SETTINGS`, parsed as ``twistd peernix`` parses
    them), plus ``--json`` and ``--timeout``.

    Unlike the daemon, a config file that cannot be used is not a usage
    error: it is what the doctor reports (:attr:`config_error`), checking
    the rest with the command line's settings.
    """

    synopsis = "Usage: peernix doctor [daemon options] [--json] [--timeout SECONDS]"
    longdesc = (
        "Check this machine's peernix set-up: the daemon, nix.conf (substituter, priority, "
        "trusted keys, negative TTL), the Nix version, peers and ports.  One line per check; "
        "exit status 1 when a check finds a problem.  Give the daemon's options (--port, "
        "--config, ...) so the checks match how it runs."
    )
    optFlags = [["json", None, "Print one JSON document instead of lines of text."]]
    optParameters = [["timeout", None, str(DEFAULT_TIMEOUT), "Seconds each HTTP request may take."]]

    def __init__(self) -> None:
        super().__init__()
        #: Why the config file could not be used, else ``None``.
        self.config_error: str | None = None
        #: Seconds per HTTP request.
        self.timeout = DEFAULT_TIMEOUT

    def postOptions(self) -> None:
        """Check the daemon options, read the config file (recording its error), check ``--timeout``."""
        try:
            given = self.given()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        file_values: dict[str, Any] = {}
        path = given.get("config_file")
        if path:
            try:
                file_values = read_config_file(path)
            except ConfigError as e:
                self.config_error = str(e)
        self.config = make_config(given, file_values)
        try:
            self.timeout = float(self["timeout"])
        except ValueError:
            raise usage.UsageError(f"--timeout: expected a number of seconds, got {self['timeout']!r}") from None
        if not 0 < self.timeout <= 60:
            raise usage.UsageError(f"--timeout: expected 0 < SECONDS <= 60, got {self['timeout']!r}")


def doctor(options: DoctorOptions, out: TextIO) -> int:
    """
    Run every check and print the results.

    :returns: the exit status: 1 when a check found a problem, else 0.
    """
    from peernix.doctor import has_problem, report_document, run_checks
    from peernix.doctor_io import gather

    facts = gather(options.config, config_error=options.config_error, timeout=options.timeout)
    results = run_checks(facts)
    if options["json"]:
        out.write(json.dumps(report_document(results), indent=2, sort_keys=True) + "\n")
    else:
        for result in results:
            out.write(result.line() + "\n")
    out.flush()
    return 1 if has_problem(results) else 0


def run_daemon(argv: Sequence[str]) -> None:
    """Run the daemon in the foreground: ``twistd --nodaemon --pidfile= peernix ARGV`` (returns when it stops)."""
    from twisted.scripts.twistd import run

    sys.argv = [sys.argv[0] if sys.argv else "peernix", "--nodaemon", "--pidfile=", "peernix", *argv]
    run()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    The console script.

    :param argv: the arguments (``sys.argv[1:]`` when ``None``).
    :returns: the exit status.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        from peernix.tap import Options

        daemon_help = str(Options()).split("Options:\n", 1)[-1]
        out.write(USAGE + "Daemon options (peernix doctor takes them too):\n" + daemon_help)
        return 0
    if args[:1] != ["doctor"]:
        run_daemon(args)
        return 0
    options = DoctorOptions()
    try:
        options.parseOptions(args[1:])  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        err.write(f"peernix doctor: error: {e} (see 'peernix doctor --help')\n")
        return USAGE_ERROR
    return doctor(options, out)


if __name__ == "__main__":
    sys.exit(main())
