"""One terminal line per stage: library chatter goes to a log file, real warnings still show.

Every stage script starts with `start_stage_log` (stages/__init__.py calls it, before any
library is imported): the stage then writes

- to the terminal: its own summary line (print), progress bars of its long steps (only when the
  terminal is one: in a log file or CI a bar is a wall of carriage returns), and every warning or
  error except the known-harmless ones listed in KNOWN_NOISE;
- to `<base.metrics_dir>/logs/<stage>.log`: everything, including library INFO logs, the
  known-harmless warnings and the Trainer's per-step log dicts (`QuietProgress`).

A warning that is not listed reaches stderr as before, so nothing new is hidden.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Warnings known to be harmless here, matched by the start of their message. Each says why.
KNOWN_NOISE = (
    # bitsandbytes on a CPU with AVX512-BF16 tries an optional kernel from the hub (offline here,
    # and the `kernels` package is not installed) and falls back to its own: nothing is lost.
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    # peft reads the old attribute name when it wraps a model; tuneline passes the new argument
    # name itself (tuneline.model.training.checkpointing_flags).
    "`is_gradient_checkpointing` is deprecated and will be removed in v6",
    # The Trainer orders checkpoints by number instead of modification time: the same order here,
    # since tuneline keeps one run's checkpoints per directory.
    "mtime may not be reliable on this filesystem",
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_started = False


def is_known_noise(message: str) -> bool:
    """True for a warning message listed in KNOWN_NOISE."""
    return message.startswith(KNOWN_NOISE)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "py.warnings":  # "path:line: Category: message\n  source line"
            message = message.split(": ", 2)[-1]
        return not is_known_noise(message)


def stage_name(argv: list[str]) -> str | None:
    """The stage a command line runs (`python -m stages.select tiny_qwen` -> "select-tiny_qwen"),
    or None when it runs no stage script (a test or a tool that imports one)."""
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        return None
    i = argv.index("-m") + 1
    if not argv[i].startswith("stages."):
        return None
    return "-".join([argv[i].removeprefix("stages."), *argv[i + 1 : i + 2]])


def progress_env(is_terminal: bool) -> dict[str, str]:
    """The environment that turns tqdm's bars (ours, the Trainer's, datasets' and the hub's) off when
    stderr is not a terminal; tqdm reads TQDM_DISABLE when it is imported, so this runs first."""
    if is_terminal:
        return {}
    return {
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def start_stage_log(stage: str, metrics_dir: str | Path | None) -> Path | None:
    """Route logging and warnings for a stage process; return the log file (None: no file).

    The root logger writes INFO and up to the file; the terminal (stderr) gets WARNING and up,
    without KNOWN_NOISE. transformers' own terminal handler is replaced once a stage imports it
    (`route_transformers_logging`; importing it here would cost every stage seconds). Under
    `accelerate launch` each process other than rank 0 gets its own file.
    """
    global _started
    _started = True
    for key, value in progress_env(sys.stderr.isatty()).items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.addFilter(_DropKnownNoise())
    console.setFormatter(logging.Formatter(f"{stage}: %(message)s"))  # which stage said it, under `dvc repro`
    root.addHandler(console)
    path = None
    if metrics_dir is not None:
        rank = os.environ.get("RANK", "0")
        path = Path(metrics_dir) / "logs" / (f"{stage}.log" if rank == "0" else f"{stage}.rank{rank}.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, mode="w", encoding="utf-8")
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(to_file)
    # Python warnings become log records of "py.warnings", so they follow the same two routes.
    logging.captureWarnings(True)
    return path


def route_transformers_logging() -> None:
    """Send transformers' warnings through the stage's handlers (file, and the filtered terminal).

    transformers writes to stderr through a handler of its own; tuneline.model.modeling, which imports
    transformers anyway, calls this. Outside a stage (tests, tools) it changes nothing.
    """
    if not _started:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
