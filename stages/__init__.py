"""One script per DVC stage, run as `python -m stages.<name>`.

A user's mistake (a bad params key, a bad input line) ends the stage with its one-line message
naming the key or the file, line and field, and exit status 2: never a bare traceback.

Before any stage imports a library, its logging is set up (tuneline.logs): the terminal shows the
stage's summary, progress bars and real warnings; library chatter goes to
base.metrics_dir/logs/<stage>.log.
"""

import sys

from tuneline import params
from tuneline.logs import stage_name, start_stage_log
from tuneline.records import InputError


def _report_user_errors(kind, value, tb):
    if issubclass(kind, (params.ParamsError, InputError)):
        print(f"error: {value}", file=sys.stderr)
        raise SystemExit(2)
    sys.__excepthook__(kind, value, tb)


def _metrics_dir() -> str | None:
    try:
        return params.section("base").metrics_dir
    except (OSError, ValueError):  # ParamsError is a ValueError
        return None  # the stage's own params.load reports the problem, naming the key


sys.excepthook = _report_user_errors
# Only when a stage runs as DVC runs it: a test that imports a stage keeps its own logging.
_stage = stage_name(getattr(sys, "orig_argv", []))
if _stage is not None:
    start_stage_log(_stage, _metrics_dir())
