"""tuneline.common.logs: a stage's terminal shows its summary and real warnings; library noise goes to its
log file."""

from __future__ import annotations

import subprocess
import sys

from tests.stage_project import ROOT, stage_env
from tuneline.common.logs import KNOWN_NOISE, stage_name

PROBE = f"""
import logging, warnings
from tuneline.common.logs import start_stage_log
path = start_stage_log("probe", "metrics")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("{KNOWN_NOISE[0]}: no kernels package")
warnings.warn("{KNOWN_NOISE[0]} (as a Python warning)")
logging.getLogger("some.library").info("loaded 3 shards")
warnings.warn("the tokenizer has no pad token: a new problem", UserWarning)
logging.getLogger("other.library").warning("disk almost full")
print("probe: 1 summary line")
"""


def test_known_noise_goes_to_the_file_and_a_real_warning_to_stderr(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "probe: 1 summary line\n"
    assert (
        "a new problem" in done.stderr
        and "UserWarning" in done.stderr
        and "probe: disk almost full" in done.stderr
    )
    assert "gemm_4bit_forward" not in done.stderr and "loaded 3 shards" not in done.stderr
    log = (tmp_path / "metrics/logs/probe.log").read_text()
    assert log.count("gemm_4bit_forward") == 2 and "loaded 3 shards" in log and "a new problem" in log


def test_stage_name_comes_from_the_stage_module_only():
    assert stage_name([sys.executable, "-m", "stages.select", "tiny_qwen"]) == "select-tiny_qwen"
    assert stage_name([sys.executable, "-m", "stages.train"]) == "train"
    assert stage_name([sys.executable, "-m", "pytest", "tests/test_logs.py"]) is None
    assert stage_name([str(ROOT / "stages" / "train.py")]) is None


BARS = """
from tuneline.common.logs import start_stage_log
start_stage_log("probe", None)
from tqdm.auto import tqdm
for _ in tqdm(range(50), desc="steps", mininterval=0):
    pass
print("probe: done")
"""


def test_no_progress_bar_is_written_when_stderr_is_not_a_terminal(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", BARS],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "probe: done\n"
    assert "\r" not in done.stderr and "steps" not in done.stderr
