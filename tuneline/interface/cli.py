"""The `tuneline` command.

    tuneline check                      # all of params.yaml, before any work
    tuneline verdict                    # tuned vs base from metrics/eval.json, as a table
    tuneline exps                       # the experiments: params that differ, headline metrics
    tuneline serve [--host 127.0.0.1] [--port 8000] [--device auto]
    tuneline report [--rev main] [--out report.md] [--timings]
    tuneline review [--host 127.0.0.1] [--port 7860]

The pipeline itself runs with `make run` (the first time) or `dvc repro`; these commands check its
params, read what it wrote, serve the model and take a person's review decisions.

`serve` puts the exported model (base.export_dir, written by `dvc repro export`) behind an
OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) with `transformers serve`, a
maintained server; this is only the wrapper that finds the model, starts the server, says where
it listens and stops it. The `model` field of a request is the model directory as given. Every
export is a plain checkpoint (a P-tuning run's virtual tokens are special tokens in it).
`review` opens the review page (tuneline.interface.reviewapp) on this machine; the decisions it saves go to
base.decisions, which `dvc repro` applies.

The commands raise typed errors; `main` prints each as `tuneline <command>: <message>` and returns
the exit status a stage would: 2 for a params or input mistake, 3 for a server that would not start
or a port that is taken (records.exit_code).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from tuneline.common import params
from tuneline.common.records import EndpointError, InputError, exit_code
from tuneline.llm.server import serve_command

# The exported model is a local directory: the server never needs the hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def serve_process(
    model_dir: str | Path, port: int, host: str = "127.0.0.1", device: str = "auto", log: IO | None = None
) -> subprocess.Popen:
    """Start `transformers serve` for `model_dir` on host:port; its output goes to `log` (default: ours)."""
    command = serve_command(str(model_dir), port, device, host=host)
    stderr = subprocess.STDOUT if log else None
    return subprocess.Popen(command, stdout=log, stderr=stderr, env={**os.environ, **OFFLINE_ENV})


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Return once the server at `url` (…/v1) lists its models; raise EndpointError when `timeout`
    seconds pass first or `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                if response.status == 200 and "data" in json.loads(response.read()):
                    return
        except (OSError, ValueError):
            pass  # not listening yet, or still starting
        if process is not None and process.poll() is not None:
            raise EndpointError(f"the server exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise EndpointError(f"the server at {url} was not ready after {timeout:.0f} s")
        time.sleep(0.25)


def stop(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """Stop a server process (SIGTERM, then SIGKILL after `timeout` s); return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def exported_model(export_dir: str | Path) -> Path:
    """The exported model directory, or InputError saying how to make it."""
    path = Path(export_dir)
    if (path / "SKIPPED.json").is_file():
        reason = json.loads((path / "SKIPPED.json").read_text(encoding="utf-8")).get("reason", "")
        raise InputError(f"nothing was exported to {path}: {reason}. Send requests to that API directly")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise InputError(
            f"no exported model in {path} (base.export_dir; no config.json there); "
            "run `dvc repro export` first"
        )
    return path


def project_base():
    """The `base` params of the project in the working directory; InputError or ParamsError saying what is
    wrong."""
    if not Path(params.PARAMS_FILE).is_file():
        raise InputError(f"no {params.PARAMS_FILE} here; run it from the project root")
    return params.section("base")


def port_in_use(host: str, port: int) -> bool:
    """True when `port` cannot be bound on `host` (another server has it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def serve(args: argparse.Namespace) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; the server never outlives us."""
    base = project_base()
    model_dir = exported_model(base.export_dir)
    if port_in_use(args.host, args.port):  # before the model loads, not after
        raise EndpointError(f"port {args.port} on {args.host} is in use; pick another with --port")
    url = f"http://{args.host}:{args.port}/v1"
    process = serve_process(model_dir, args.port, args.host, args.device)
    # SIGTERM becomes an exception, so the `finally` below stops the server on `kill` as on Ctrl-C.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        wait_ready(
            url, args.startup_timeout, process
        )  # EndpointError: it died or never came up; its output says why
        name = str(model_dir)
        print(f"tuneline serve: {name} at {url} (request model name: {name!r}); Ctrl-C stops it", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    except Terminated:
        return 128 + signal.SIGTERM
    finally:
        stop(process)


class Terminated(Exception):
    """SIGTERM reached `tuneline serve`."""


def _terminated(*_) -> None:
    raise Terminated


def report(args: argparse.Namespace) -> int:
    """Write the pull-request report: the verdict, then params and metrics diffs against a revision, and the
    curves."""
    from tuneline.interface.report import write_report

    try:
        path = write_report(args.rev, args.out, args.plots_dir, timings=args.timings)
    except RuntimeError as err:  # a dvc command failed on this project; its message says why
        raise InputError(str(err)) from None
    print(f"tuneline report: wrote {path} (workspace vs {args.rev}), training curves in {args.plots_dir}/")
    return 0


def review(args: argparse.Namespace) -> int:
    """Serve the review page until Ctrl-C; decisions are appended to base.decisions."""
    base = project_base()
    if port_in_use(args.host, args.port):
        raise EndpointError(f"port {args.port} on {args.host} is in use; pick another with --port")
    from tuneline.data.review import reviewer_name
    from tuneline.interface.reviewapp import build_app

    reviewer = reviewer_name()
    app = build_app(base, reviewer)
    print(
        f"tuneline review: http://{args.host}:{args.port} (decisions by {reviewer} go to {base.decisions}); "
        "Ctrl-C stops it",
        flush=True,
    )
    app.launch(server_name=args.host, server_port=args.port, quiet=True, inbrowser=False)
    return 0


def check(args: argparse.Namespace) -> int:
    """Check all of params.yaml as every stage does at start; print every problem, or that it is fine."""
    if not Path(args.params).is_file():
        raise InputError(f"no {args.params} here; run it from the project root")
    params.check(args.params, complete=True)
    print(
        f"tuneline check: {args.params} is fine ({len(params.SECTIONS)} sections); `dvc repro` runs the "
        f"pipeline"
    )
    return 0


def verdict(args: argparse.Namespace) -> int:
    """Print tuned vs base from metrics/eval.json as a table (what `make run` ends with)."""
    from tuneline.interface.report import verdict_text

    base = project_base()
    path = Path(base.metrics_dir) / "eval.json"
    if not path.is_file():
        raise InputError(f"no {path}; run `dvc repro` first")
    print(verdict_text(json.loads(path.read_text(encoding="utf-8"))))
    return 0


def exps(args: argparse.Namespace) -> int:
    """Print the experiments of `dvc exp show`: the params that differ and the headline metrics."""
    from tuneline.interface.report import experiments_table

    base = project_base()
    try:
        print(experiments_table(base.metrics_dir, all_commits=args.all_commits))
    except RuntimeError as err:  # a dvc command failed on this project; its message says why
        raise InputError(str(err)) from None
    return 0


EPILOG = """The pipeline runs with `make run` (the first time: it makes .venv too) or `dvc repro`
(after a change: only what it touches reruns). Try a change as an experiment with
`dvc exp run --temp -S train.lora_r=32`."""


def _command(commands, name: str, help: str, run) -> argparse.ArgumentParser:
    c = commands.add_parser(
        name,
        help=help,
        description=help,
        epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.set_defaults(run=run)
    return c


def parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    p = argparse.ArgumentParser(
        prog="tuneline",
        description="Check, serve, review and report on what `dvc repro` made.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"tuneline {version('tuneline')}")
    commands = p.add_subparsers(dest="command", required=True)
    c = _command(commands, "check", "check all of params.yaml, as every stage does before its work", check)
    c.add_argument("--params", default=params.PARAMS_FILE, help="the params file")
    _command(
        commands, "verdict", "print tuned vs base (metrics/eval.json) with intervals and verdicts", verdict
    )
    e = _command(
        commands, "exps", "the experiments (dvc exp show): params that differ, headline metrics", exps
    )
    e.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    s = _command(commands, "serve", "serve the exported model on an OpenAI-compatible endpoint", serve)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; 127.0.0.1 is this machine only")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda:0, …")
    s.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the model")
    r = _command(
        commands,
        "report",
        "did the change help? The verdict against a revision, params and metrics diffs, "
        "curves, as Markdown for a pull request",
        report,
    )
    r.add_argument("--rev", default="main", help="the revision to compare the workspace with")
    r.add_argument("--out", default="report.md", help="the Markdown file to write")
    r.add_argument(
        "--plots-dir", default="report_plots", help="where the training curves are rendered as PNG"
    )
    r.add_argument(
        "--timings", action="store_true", help="keep the timing and throughput rows of the metrics diff"
    )
    v = _command(
        commands, "review", "review generated records, rejects and eval samples in the browser", review
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on; 127.0.0.1 is this machine only")
    v.add_argument("--port", type=int, default=7860, help="port to listen on")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tuneline` console script: the command's exit status; a typed error is
    printed as `tuneline <command>: <message>` and returns its exit_code."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (params.ParamsError, InputError, EndpointError) as err:
        print(f"tuneline {args.command}: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
