"""The `tuneline` command.

    tuneline serve [--host 127.0.0.1] [--port 8000] [--device auto]
    tuneline report [--rev main] [--out report.md] [--timings]
    tuneline review [--host 127.0.0.1] [--port 7860]

`serve` puts the exported model (base.export_dir, written by `dvc repro export`) behind an
OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) with `transformers serve`, a
maintained server; this is only the wrapper that finds the model, starts the server, says where
it listens and stops it. The `model` field of a request is the model directory as given. Every
export is a plain checkpoint (a P-tuning run's virtual tokens are special tokens in it).
`review` opens the review page (tuneline.reviewapp) on this machine; the decisions it saves go to
base.decisions, which `dvc repro` applies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from tuneline import params
from tuneline.llmserver import serve_command

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
    """Return once the server at `url` (…/v1) lists its models; raise RuntimeError when `timeout`
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
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")
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
    """The exported model directory, or SystemExit saying how to make it."""
    path = Path(export_dir)
    if (path / "SKIPPED.json").is_file():
        reason = json.loads((path / "SKIPPED.json").read_text(encoding="utf-8")).get("reason", "")
        raise SystemExit(
            f"tuneline serve: nothing was exported to {path}: {reason}. Send requests to that API directly"
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise SystemExit(
            f"tuneline serve: no exported model in {path} (base.export_dir; no config.json there); "
            "run `dvc repro export` first"
        )
    return path


def project_base(command: str):
    """The `base` params of the project in the working directory, or SystemExit saying what is wrong."""
    if not Path(params.PARAMS_FILE).is_file():
        raise SystemExit(f"tuneline {command}: no {params.PARAMS_FILE} here; run it from the project root")
    try:
        return params.section("base")
    except params.ParamsError as err:
        raise SystemExit(f"tuneline {command}: {err}") from None


def serve(args: argparse.Namespace) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; the server never outlives us."""
    base = project_base("serve")
    model_dir = exported_model(base.export_dir)
    url = f"http://{args.host}:{args.port}/v1"
    process = serve_process(model_dir, args.port, args.host, args.device)
    # SIGTERM becomes SystemExit, so the `finally` below stops the server on `kill` as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        wait_ready(url, args.startup_timeout, process)
        name = str(model_dir)
        print(f"tuneline serve: {name} at {url} (request model name: {name!r}); Ctrl-C stops it", flush=True)
        return process.wait()
    except RuntimeError as err:  # it died or never came up; its own output above says why
        raise SystemExit(f"tuneline serve: {err}") from None
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)


def report(args: argparse.Namespace) -> int:
    """Write the pull-request report: the verdict, then params and metrics diffs against a revision, and the curves."""
    from tuneline.report import write_report

    try:
        path = write_report(args.rev, args.out, args.plots_dir, timings=args.timings)
    except (RuntimeError, params.ParamsError) as err:
        raise SystemExit(f"tuneline report: {err}") from None
    print(f"tuneline report: wrote {path} (workspace vs {args.rev}), training curves in {args.plots_dir}/")
    return 0


def review(args: argparse.Namespace) -> int:
    """Serve the review page until Ctrl-C; decisions are appended to base.decisions."""
    base = project_base("review")
    from tuneline.review import reviewer_name
    from tuneline.reviewapp import build_app

    reviewer = reviewer_name()
    app = build_app(base, reviewer)
    print(f"tuneline review: http://{args.host}:{args.port} (decisions by {reviewer} go to {base.decisions}); "
          "Ctrl-C stops it", flush=True)  # fmt: skip
    app.launch(server_name=args.host, server_port=args.port, quiet=True, inbrowser=False)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneline", description="Serve, review and report on what `dvc repro` made.")
    commands = p.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="serve the exported model on an OpenAI-compatible endpoint")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda:0, …")
    s.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the model")
    s.set_defaults(run=serve)
    r = commands.add_parser("report", help="the verdict (eval deltas with intervals), params and metrics diffs against a "
                            "revision, as Markdown for a pull request")
    r.add_argument("--rev", default="main", help="the revision to compare the workspace with (default: main)")
    r.add_argument("--out", default="report.md")
    r.add_argument("--plots-dir", default="report_plots", help="where the training curves are rendered as PNG")
    r.add_argument("--timings", action="store_true", help="keep the timing and throughput rows of the metrics diff")
    r.set_defaults(run=report)
    v = commands.add_parser("review", help="review generated records, rejects and eval samples in the browser")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    v.add_argument("--port", type=int, default=7860)
    v.set_defaults(run=review)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tuneline` console script."""
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
