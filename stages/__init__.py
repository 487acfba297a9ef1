"""One script per DVC stage, run as `python -m stages.<name>`.

The library raises three typed errors, and this hook is where a stage turns them into its
one-line message and exit status, never a bare traceback: a user's mistake (params.ParamsError,
a bad params key; records.InputError, a bad input line) names the key or the file, line and
field and exits 2; an LLM or judge endpoint that did not answer or failed too many calls
(records.EndpointError) names the key to check and exits 3. Anything else is a bug: a traceback.

Before any stage imports a library, its logging is set up (tuneline.logs): the terminal shows the
stage's summary, progress bars and real warnings; library chatter goes to
base.metrics_dir/logs/<stage>.log.
"""

import sys

from tuneline import params
from tuneline.logs import stage_name, start_stage_log
from tuneline.records import EndpointError, InputError, exit_code


def _report_user_errors(kind, value, tb):
    if issubclass(kind, (params.ParamsError, InputError, EndpointError)):
        print(f"error: {value}", file=sys.stderr)
        raise SystemExit(exit_code(value))
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
