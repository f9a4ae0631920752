"""
The ``peernix`` command (a console script next to the twistd plugin).

``peernix doctor [DAEMON OPTIONS] [--json] [--timeout SECONDS]`` checks this
machine's set-up and prints one line per check (see :mod:`peernix.doctor`);
it takes every option of ``twistd peernix`` and its ``--config`` file, so it
checks the daemon as that command line starts it.  Exit status: 0 when no
check found a problem, 1 when one did, 2 for a bad command line.

Also ``python -m peernix.cli``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.python import usage

from peernix.doctor import has_problem, report_document, run_checks
from peernix.doctor_io import DEFAULT_TIMEOUT, gather
from peernix.options import ConfigError, PeernixOptions, make_config, read_config_file

#: Exit status for a command line that cannot be parsed.
USAGE_ERROR = 2


class DoctorOptions(PeernixOptions):
    """
    ``peernix doctor``: every daemon option (generated from
    :data:`peernix.options.SETTINGS`, parsed as ``twistd peernix`` parses
    them), plus ``--json`` and ``--timeout``.

    Unlike the daemon, a config file that cannot be used is not a usage
    error: it is what the doctor reports (:attr:`config_error`), checking
    the rest with the command line's settings.
    """

    synopsis = "[daemon options] [--json] [--timeout SECONDS]"
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


class CommandOptions(usage.Options):
    """``peernix COMMAND``."""

    synopsis = "peernix COMMAND [options]"
    subCommands = [["doctor", None, DoctorOptions, "Check this machine's set-up and say what to fix."]]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def opt_version(self) -> None:
        """Display peernix's version and exit."""
        from peernix import __version__

        print(f"peernix {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """A command is required."""
        if self.subCommand is None:
            raise usage.UsageError("a command is required: peernix doctor")


def doctor(options: DoctorOptions, out: TextIO) -> int:
    """
    Run every check and print the results.

    :returns: the exit status: 1 when a check found a problem, else 0.
    """
    facts = gather(options.config, config_error=options.config_error, timeout=options.timeout)
    results = run_checks(facts)
    if options["json"]:
        out.write(json.dumps(report_document(results), indent=2, sort_keys=True) + "\n")
    else:
        for result in results:
            out.write(result.line() + "\n")
    out.flush()
    return 1 if has_problem(results) else 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    The console script.

    :param argv: the arguments (``sys.argv[1:]`` when ``None``).
    :returns: the exit status.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    options = CommandOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        err.write(f"peernix: error: {e} (see 'peernix --help' or 'peernix doctor --help')\n")
        return USAGE_ERROR
    if options.subCommand == "doctor":
        return doctor(options.subOptions, out)
    return USAGE_ERROR  # pragma: no cover - postOptions requires a command


if __name__ == "__main__":
    sys.exit(main())
