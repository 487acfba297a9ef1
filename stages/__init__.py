"""One script per DVC stage, run as `python -m stages.<name>`; each ends with `run(main)`.

The library raises three typed errors, and this hook is where a stage turns them into its
one-line message and exit status, never a bare traceback: a user's mistake (params.ParamsError,
a bad params key; records.InputError, a bad input line) names the key or the file, line and
field and exits 2; an LLM or judge endpoint that did not answer or failed too many calls
(records.EndpointError) names the key to check and exits 3. Anything else is a bug: a traceback.

A stage that fails leaves no git-tracked output deleted. DVC removes a stage's outputs before it
runs its command, the `cache: false` metrics that git tracks included, and `dvc checkout` cannot
bring those back. So when a stage that DVC started in the workspace fails (an exception, a non-zero
exit, Ctrl-C, SIGTERM), it puts back, from git's index, every git-tracked file of its outputs that
is missing or that the failed run left changed, and says which: the metrics are then the committed
ones, as dvc.lock (which a failed stage does not update) expects. SIGKILL cannot be caught: after a
`kill -9`, `git checkout -- metrics/` does the same by hand. A run in a copy of the workspace
(`dvc exp run --temp` or `--queue`) leaves the workspace alone, so nothing is put back there.

Before any stage imports a library, its logging is set up (tuneline.common.logs): the terminal shows the
stage's summary, progress bars and real warnings; library chatter goes to
base.metrics_dir/logs/<stage>.log.
"""

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tuneline.common import params
from tuneline.common.logs import stage_name, start_stage_log
from tuneline.common.records import EndpointError, InputError, exit_code


class Terminated(BaseException):
    """SIGTERM, raised in the stage like Ctrl-C's KeyboardInterrupt, so the stage's cleanup runs."""


def _terminate(signum, frame):
    raise Terminated


def in_workspace(root: str) -> bool:
    """Whether this process runs in the workspace DVC_ROOT (`root`) names, not in the copy that
    `dvc exp run --temp` and `--queue` run in (DVC_ROOT names the workspace there too)."""
    if not root:
        return False
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(root).resolve() == Path(Repo.find_root()).resolve()
    except NotDvcRepoError:
        return False


def stage_outputs(stage: str) -> tuple[list[str], list[str]]:
    """(git-trackable, DVC-cached) paths of the outputs DVC removes before running `stage`: all but
    `persist: true` ones, relative to the project root, as dvc.yaml resolves them."""
    from dvc.repo import Repo

    with Repo() as repo:
        for s in repo.index.stages:
            if s.addressing == stage:
                outs = [o for o in s.outs if not o.persist]
                return (
                    [o.def_path for o in outs if not o.use_cache],
                    [o.def_path for o in outs if o.use_cache],
                )
    return [], []


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def put_back_tracked_outputs(stage: str) -> list[str]:
    """Put back from git's index the git-tracked files of `stage`'s outputs that are missing or
    changed; return them. A project without git, or outputs git does not track yet, have none."""
    if not in_workspace(os.environ.get("DVC_ROOT", "")):
        return []
    uncached, cached = stage_outputs(stage)
    if not uncached or shutil.which("git") is None:
        return []
    changed = _git("ls-files", "-z", "--modified", "--", *uncached)  # deleted files count as modified
    if changed.returncode != 0:  # not a git repository
        return []
    files = sorted(set(filter(None, changed.stdout.split("\0"))))
    if files:
        restored = _git("checkout", "--", *files)  # from the index, which is HEAD's unless you staged
        if restored.returncode != 0:
            raise OSError(restored.stderr.strip())
    missing = [path for path in cached if not Path(path).exists()]
    if files or missing:
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        noun = "file" if len(files) == 1 else "files"
        told = [f"put back from git {len(files)} tracked {noun} of its outputs ({shown})"] if files else []
        if missing:
            told.append(f"`dvc checkout {stage}` puts back {', '.join(missing)} from DVC's cache")
        print(f"{stage} failed: " + "; ".join(told), file=sys.stderr)
    return files


def _after_failure() -> None:
    """On a failure of a stage DVC started (DVC_STAGE), put its git-tracked outputs back.

    A fresh interpreter does it: the failure may have struck halfway through an import (Ctrl-C
    while torch loads), leaving modules DVC needs half-initialised in this one. In a session of its
    own, a second Ctrl-C or a SIGTERM to the process group does not stop it halfway; this process
    ignores both while it waits. A problem doing it never hides the stage's own error. Of the
    processes `accelerate launch` starts (train.launcher), only rank 0 does it; the launching one too.
    """
    stage = os.environ.get("DVC_STAGE")
    if not stage or os.environ.get("RANK", "0") != "0":
        return
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = subprocess.run(
            [sys.executable, "-c", f"import stages; stages.put_back_tracked_outputs({stage!r})"],
            start_new_session=True,
            timeout=300,
        ).returncode
        problem = f"exit status {code}" if code else None
    except (OSError, subprocess.TimeoutExpired) as err:
        problem = str(err)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if problem:
        print(
            f"{stage} failed, and its git-tracked outputs could not be put back ({problem}); "
            "`git checkout -- metrics/` puts them back",
            file=sys.stderr,
        )


def run(main: Callable[..., int | None], *args: str) -> None:
    """Run a stage's `main(*args)`; exit with its return code. An exception goes on to the hook
    below; a non-zero exit (returned, or `raise SystemExit(...)`) puts the outputs back here."""
    code: int | str | None = None  # stays None on an exception: the hook below handles it
    try:
        code = main(*args)
    except SystemExit as exit:
        code = exit.code
        raise
    finally:
        if code not in (None, 0):
            _after_failure()
    if code:
        raise SystemExit(code)


def _report_failure(kind, value, tb):
    if issubclass(kind, (params.ParamsError, InputError, EndpointError)):
        print(f"error: {value}", file=sys.stderr)
        _after_failure()
        raise SystemExit(exit_code(value))
    if issubclass(kind, Terminated):
        print("stopped by SIGTERM", file=sys.stderr)
        _after_failure()
        raise SystemExit(128 + signal.SIGTERM)
    sys.__excepthook__(kind, value, tb)
    _after_failure()


def _metrics_dir() -> str | None:
    try:
        return params.section("base").metrics_dir
    except (OSError, ValueError):  # ParamsError is a ValueError
        return None  # the stage's own params.load reports the problem, naming the key


sys.excepthook = _report_failure
# Only when a stage runs as DVC runs it: a test that imports a stage keeps its own logging and signals.
_stage = stage_name(getattr(sys, "orig_argv", []))
if _stage is not None:
    signal.signal(signal.SIGTERM, _terminate)
    # A process forked from the stage (cleanlab's multiprocessing pool, for one) dies on SIGTERM as by
    # default: Pool.terminate() ends its workers with SIGTERM, and a worker that raised Terminated
    # instead would hang the stage in the pool's join.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    start_stage_log(_stage, _metrics_dir())
