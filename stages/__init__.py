"""One script per DVC stage, run as `python -m stages.<name>`.

A user's mistake (a bad params key, a bad input line) ends the stage with its one-line message
naming the key or the file, line and field, and exit status 2: never a bare traceback.
"""

import sys

from tuneline.params import ParamsError
from tuneline.records import InputError


def _report_user_errors(kind, value, tb):
    if issubclass(kind, (ParamsError, InputError)):
        print(f"error: {value}", file=sys.stderr)
        raise SystemExit(2)
    sys.__excepthook__(kind, value, tb)


sys.excepthook = _report_user_errors
