"""A real OpenAI-compatible server on 127.0.0.1 for the embedded default: `transformers serve`
(with structured outputs, tuneline.llm.structserve).

`endpoint_url("local", path)` starts it for the duration of a `with` block and stops it
afterwards; any other base_url (a hosted API, a vLLM server) is passed through unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneline.common.params import ParamsError
from tuneline.common.records import EndpointError

LOCAL = "local"
log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_path: str, port: int, device: str, host: str = "127.0.0.1") -> list[str]:
    """The server's command line, pinned to one model (its name in requests is the path):
    `transformers serve` with structured outputs (`tuneline.llm.structserve`: response_format json_schema
    and json_object are decoded under that constraint, so even a tiny model writes valid JSON).

    Every export is a plain checkpoint (a P-tuning run's virtual tokens are special tokens in it).
    """
    options = ["--host", host, "--port", str(port), "--device", device, "--log-level", "warning"]
    return [sys.executable, "-m", "tuneline.llm.structserve", *options, model_path]


def _models_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return response.status == 200 and "data" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def local_server(model_path: str, *, device: str = "cpu", startup_timeout_s: float = 180.0) -> Iterator[str]:
    """Run `transformers serve` on a free 127.0.0.1 port; yield its base URL (…/v1); stop it on exit.

    CPU by default so the default pipeline gives the same replies on every machine. The
    server runs offline: nothing is downloaded, the model must be a local directory.
    """
    if not Path(model_path, "config.json").is_file():
        raise ParamsError(
            f"augment.model {model_path!r} is not a local model directory (no config.json); build it with "
            "`dvc repro models`, or point augment.base_url at a server that hosts the model"
        )
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    # Small models on CPU decode many times slower with several torch threads on a busy machine.
    # A user's own OMP_NUM_THREADS wins.
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.NamedTemporaryFile(
        "w+b", prefix="tuneline-serve-", suffix=".log", delete=False
    ) as log_file:
        log_path = Path(log_file.name)
        proc = subprocess.Popen(
            serve_command(model_path, port, device), stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _models_ready(base_url):
            if proc.poll() is not None:
                raise EndpointError(
                    f"`transformers serve {model_path}` exited with code {proc.returncode} before it was "
                    f"ready:\n" + _tail(log_path)
                )
            if time.monotonic() > deadline:
                raise EndpointError(
                    f"`transformers serve {model_path}` was not ready after {startup_timeout_s:.0f} s:\n"
                    + _tail(log_path)
                )
            time.sleep(0.25)
        log.info("started `transformers serve %s` on %s", model_path, base_url)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


@contextmanager
def endpoint_url(base_url: str, model_path: str) -> Iterator[str]:
    """The URL to send requests to: a local server started for the block when base_url is "local"."""
    if base_url == LOCAL:
        with local_server(model_path) as url:
            yield url
    else:
        yield base_url
