"""The GPU bench, its profile and the GPU pipeline run end to end on CPU with --tiny, so the one
prepared device run (bench/gpu_device.sh) meets no error a CPU could have shown."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest

from tests.stage_project import ROOT, stage_env


def bench_module(name: str):
    """A bench script as a module, loaded from its path: putting bench/ on sys.path would shadow the
    `dvc` package with bench/dvc.py for every test that runs after this one."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_counts_every_matmul_weight_of_the_real_model_shapes():
    gpu = bench_module("gpu")
    SHAPES, matmul_parameters = gpu.SHAPES, gpu.matmul_parameters

    # Qwen2.5-0.5B: 494.0M parameters, embeddings tied to the head (counted once, as the head);
    # Llama-3-8B: 8.03B, of which the 525M-parameter input embedding is a lookup, not a matmul.
    assert matmul_parameters(SHAPES["0p5b"]) == pytest.approx(494.0e6, rel=0.01)
    assert matmul_parameters(SHAPES["8b"]) == pytest.approx(8.03e9 - 128256 * 4096, rel=0.01)


def test_attention_flops_count_each_example_causally_on_its_own():
    gpu = bench_module("gpu")
    shape = {"num_layers": 2, "hidden_size": 10}
    # two examples of 3 and 1 tokens: 6 x 2 layers x 10 x (9 + 1) FLOPs over 4 tokens
    assert gpu.attention_flops_per_token([([1, 2, 3], [0] * 3), ([4], [0])], shape) == 6 * 2 * 10 * 10 / 4


def test_bench_data_looks_like_instruction_data_with_labels_on_answers_only():
    gpu = bench_module("gpu")
    data = gpu.instruction_examples(400_000, 2048, 151936, 0)
    lengths = sorted(len(ids) for ids, _ in data)
    labelled = sum(sum(1 for t in labels if t != -100) for _, labels in data) / sum(lengths)

    for ids, labels in data:
        answer = next(i for i, t in enumerate(labels) if t != -100)
        assert (
            all(t == -100 for t in labels[:answer]) and labels[answer:] == ids[answer:]
        )  # one prompt, then the answer
        assert 0 < min(ids) and max(ids) < 151936 and len(ids) <= 2048
    assert 90 < lengths[len(lengths) // 2] < 160  # Alpaca-like: a median around a hundred tokens ...
    assert lengths[int(len(lengths) * 0.99)] > 3 * lengths[len(lengths) // 2]  # ... and a long tail
    assert 0.4 < labelled < 0.85


def test_gpu_bench_tiny_runs_every_configuration_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--in-process", "--out", str(out)],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    results = json.loads(out.read_text())
    runs = results["runs"]
    RUNS = bench_module("gpu").RUNS

    assert set(runs) == set(RUNS)
    for name, run in runs.items():
        assert "error" not in run, f"{name}: {run}"
        if RUNS[name][4]:
            assert "skipped" in run  # Liger is Triton: GPU only
            continue
        assert (
            run["steps"] == 1 + 3 and len(run["windows"]) == 3
        )  # warm-up, then 3 measured windows of 1 step
        assert run["tokens_per_s_windows"]["min"] <= run["tokens_per_s"] <= run["tokens_per_s_windows"]["max"]
        assert (
            0 < run["trainable_parameters"]
            and math.isfinite(run["train_loss"])
            and run["attention_tflops"] >= 0
        )
    assert runs["full_0p5b"]["trainable_parameters"] > 2 * runs["lora_0p5b"]["trainable_parameters"]
    assert (
        runs["trl_lora_0p5b"]["trainable_parameters"] == runs["lora_0p5b"]["trainable_parameters"]
    )  # same LoRA
    assert runs["trl_full_0p5b"]["trainable_parameters"] == runs["full_0p5b"]["trainable_parameters"]
    for name in (
        "qlora_8b_gc",
        "trl_qlora_8b_gc",
    ):  # LoRA over bitsandbytes 4-bit layers, as from_pretrained gives
        assert runs[name]["trainable_parameters"] == runs["trl_packed_qlora_8b_gc"]["trainable_parameters"]
    assert runs["qlora_8b_gc"]["lora_layer_types"] == ["peft.tuners.lora.bnb.Linear4bit"]
    assert runs["lora_0p5b"]["lora_layer_types"] == ["peft.tuners.lora.layer.Linear"]
    # the stage's packing fills rows; TRL's defaults pad one example per row: far fewer tokens a step
    assert runs["lora_0p5b"]["tokens_per_step"] > 3 * runs["trl_lora_0p5b"]["tokens_per_step"]
    assert runs["trl_lora_0p5b"]["trl_settings"]["packing"] is False
    assert runs["trl_packed_lora_0p5b"]["trl_settings"]["packing"] is True
    assert runs["trl_packed_lora_0p5b"]["tokens_per_step"] > 3 * runs["trl_lora_0p5b"]["tokens_per_step"]
    assert results["comparisons"]["lora_vs_trl_defaults_tokens_per_s"] > 0
    assert "| lora_0p5b " in result.stdout and "lora_vs_trl_defaults_tokens_per_s" in result.stdout


def test_gpu_profile_tiny_writes_the_top_15_ops_of_one_lora_step(tmp_path):
    out = tmp_path / "gpu_profile.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--profile", str(out)],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    text = out.read_text()
    rules = [i for i, line in enumerate(text.splitlines()) if set(line.strip()) == {"-", " "}]
    ops = text.splitlines()[
        rules[1] + 1 : rules[2]
    ]  # the profiler's table: a rule, the header, a rule, the rows

    assert "Profile of one `lora_0p5b` training step" in text
    assert len(ops) == 15 and "aten::mm" in text  # the matmuls are there: the profiler saw the step


@pytest.mark.slow
def test_gpu_pipeline_tiny_runs_the_model_stages_and_serves_one_request(tmp_path):
    out = tmp_path / "gpu_pipeline.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_pipeline.py"),
            "--tiny",
            "--methods",
            "lora",
            "--out",
            str(out),
            "--stage-timeout",
            "300",
        ],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    stages = json.loads(out.read_text())["stages"]

    assert list(stages) == [
        "build_base",
        "select",
        "tokenize",
        "train_lora",
        "evaluate_lora",
        "export_lora",
        "serve_lora",
        "total",
    ]
    for name, stage in stages.items():
        assert stage.get("exit_code", 0) == 0, f"{name}: {stage}"
        assert "peak_allocated_gib" in stage or name in ("build_base", "serve_lora", "total")
    assert stages["serve_lora"]["status"] == "ok" and stages["serve_lora"]["completion_tokens"] > 0
    assert any("packed_sequences" in line for line in stages["tokenize"]["summary"])  # packing was on
    assert stages["train_lora"]["summary"] and "lora" in stages["train_lora"]["summary"][-1]


def test_the_device_script_runs_only_configurations_the_bench_has():
    script = (ROOT / "bench" / "gpu_device.sh").read_text()
    named = {n for only in re.findall(r"--only (\S+)", script) for n in only.split(",")}
    RUNS = bench_module("gpu").RUNS

    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_device.sh")]).returncode == 0
    assert named and named <= set(RUNS)
    assert {"lora_0p5b", "trl_lora_0p5b", "trl_packed_lora_0p5b", "qlora_8b_gc", "full_0p5b"} <= named
