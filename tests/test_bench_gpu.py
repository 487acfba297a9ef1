"""bench/gpu.py runs end to end on CPU with --tiny, so it is ready for the first GPU available."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.stage_project import ROOT, stage_env



def bench_gpu():
    """bench/gpu.py as a module, loaded from its path: putting bench/ on sys.path would shadow the
    `dvc` package with bench/dvc.py for every test that runs after this one."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_counts_every_matmul_weight_of_the_real_model_shapes():
    gpu = bench_gpu()
    SHAPES, matmul_parameters = gpu.SHAPES, gpu.matmul_parameters

    # Qwen2.5-0.5B: 494.0M parameters, embeddings tied to the head (counted once, as the head);
    # Llama-3-8B: 8.03B, of which the 525M-parameter input embedding is a lookup, not a matmul.
    assert matmul_parameters(SHAPES["0p5b"]) == pytest.approx(494.0e6, rel=0.01)
    assert matmul_parameters(SHAPES["8b"]) == pytest.approx(8.03e9 - 128256 * 4096, rel=0.01)


def test_gpu_bench_tiny_runs_every_configuration_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--in-process", "--out", str(out)],
                            cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    results = json.loads(out.read_text())
    runs = results["runs"]
    RUNS = bench_gpu().RUNS

    assert set(runs) == set(RUNS)
    liger = importlib.util.find_spec("liger_kernel") is not None
    for name, run in runs.items():
        assert "error" not in run, f"{name}: {run}"
        if RUNS[name][5] and not (liger and results["peak_bf16_tflops_measured"]):
            assert "skipped" in run  # Liger is Triton: GPU only
            continue
        assert run["tokens_per_s"] > 0 and run["measured_tokens"] > 0 and run["steps"] == 2
        assert 0 < run["trainable_parameters"] and math.isfinite(run["train_loss"])
    assert runs["full_0p5b"]["trainable_parameters"] > 5 * runs["lora_0p5b"]["trainable_parameters"]
    assert runs["trl_lora_0p5b"]["trainable_parameters"] == runs["lora_0p5b"]["trainable_parameters"]  # same LoRA
    for name in ("qlora_8b_gc", "qlora_0p5b"):  # LoRA over bitsandbytes 4-bit layers, as from_pretrained gives
        assert runs[name]["lora_layer_types"] == ["peft.tuners.lora.bnb.Linear4bit"]
    assert runs["lora_0p5b"]["lora_layer_types"] == ["peft.tuners.lora.layer.Linear"]
    assert results["comparisons"]["lora_vs_trl_tokens_per_s"] > 0
    assert "| lora_0p5b " in result.stdout and "lora_vs_trl_tokens_per_s" in result.stdout
