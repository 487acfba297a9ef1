"""The pipeline's model stages end to end on this machine's GPU, as DVC runs them, with each stage's time and
memory.

A temporary project (params.yaml from the repository, shrunk where it says so below) holds:
- a Qwen2.5-0.5B-shaped base (bench/gpu.py's `0p5b` shape: 494M matmul weights, vocab 151,936,
  random weights, saved in bf16) with an offline byte-level BPE tokenizer (ChatML template);
- Alpaca splits made from the bundled seed records, answers joined from 1 to 8 seed answers so the
  lengths have Alpaca's long tail.
Stages, each `python -m stages.<name>` in the project directory (what `dvc repro` runs):
select (the one local candidate) -> tokenize (packing on) -> for lora, then qlora: train
(max_steps, bf16, sdpa) -> evaluate -> export; after the lora export, `tuneline serve` and one
chat-completion request to it. models/selected.json and models/tuning_base.json are written
directly, as the choose stage (one candidate) and the pretrain stage (off) would write them:
choose and pretrain read the tiny `models` stage's output, which this project does not build.
flash-attention: not tried (no wheel carried for this machine's torch 2.11 + CUDA 13); attention is sdpa.

Per stage: wall seconds, exit code, and the stage process's peak GPU memory (torch's
max_memory_allocated and max_memory_reserved, read at its exit by a wrapper that runs the stage
module as __main__). The JSON is rewritten after every stage, so a run cut short keeps what finished;
a failed stage is recorded with its output's tail and the stages that need it are skipped.

Run:  python bench/gpu_pipeline.py [--out bench/results/gpu_pipeline.json] [--steps 50]
      python bench/gpu_pipeline.py --tiny    # tiny model, few steps, on CPU too: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Runs the stage module as `python -m` would, and reports the process's peak GPU memory at exit
# (also when the stage raises SystemExit).
WRAPPER = """
import atexit, json, os, runpy, sys
def report():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    else:
        peak = {"peak_allocated_gib": None, "peak_reserved_gib": None}
    with open(os.environ["TUNELINE_PEAK_FILE"], "w") as f:
        json.dump(peak, f)
atexit.register(report)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def alpaca_records(n: int, seed: int) -> list[dict]:
    """`n` Alpaca records from the seed records: each a seed's instruction with 1-8 seed answers joined
    (geometric: most short, a long tail)."""
    seeds = [
        json.loads(line)
        for line in (ROOT / "data" / "seeds" / "seeds.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first = rng.choice(seeds)
        parts = 1
        while parts < 8 and rng.random() < 0.45:
            parts += 1
        output = " ".join([first["output"]] + [rng.choice(seeds)["output"] for _ in range(parts - 1)])
        out.append(
            {
                "id": f"gpu-{i}",
                "instruction": first["instruction"],
                "input": "",
                "output": output,
                "system": "",
                "history": [],
            }
        )
    return out


def build_base(dest: Path, tiny: bool) -> None:
    """The Qwen2.5-0.5B-shaped base (random weights, bf16 on a GPU) and its tokenizer, saved in `dest`."""
    import torch
    from gpu import SHAPES, TINY_SHAPES, build_random_model

    from tuneline.model.tinymodels import train_tokenizer

    texts = [r["instruction"] + " " + r["output"] for r in alpaca_records(200, 0)]
    tokenizer = train_tokenizer(texts, 512 if tiny else 2048, "chatml")
    cuda = torch.cuda.is_available()
    shape = (TINY_SHAPES if tiny else SHAPES)["0p5b"]
    model = build_random_model(
        shape, tokenizer.pad_token_id, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    if cuda:
        torch.cuda.empty_cache()


def write_project(project: Path, base_model: Path, records: int, steps: int, tiny: bool) -> dict:
    """params.yaml (the repository's, shrunk), the Alpaca splits, selected.json and tuning_base.json."""
    from tuneline.common.records import write_json

    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p["select"].update(
        candidates={"qwen05b": {"kind": "local", "model": str(base_model), "trust_remote_code": False}},
        generation_samples=16,
        max_new_tokens=32,
        batch_size=16,
    )
    p["select"]["judge"]["enabled"] = False  # its default judge is the tiny models stage's output
    p["tokenize"].update(max_length=128 if tiny else 1024, packing=True)
    p["train"].update(
        method="lora",
        lora_r=16,
        lora_alpha=32,
        max_steps=steps,
        batch_size=8,
        eval_batch_size=16,
        save_steps=10**6,
        logging_steps=10,
        learning_rate=2e-4,
        compute_dtype="auto",
        attn_implementation="sdpa",
    )
    p["evaluate"].update(
        max_new_tokens=32,
        batch_size=16,
        generation_samples=16,
        seen_samples=16,
        samples_in_report=2,
        lm_eval_tasks=[],
    )
    p["evaluate"]["judge"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    data = alpaca_records(records, 1)
    n_test = n_val = max(16, records // 20)
    alpaca = project / p["base"]["alpaca_dir"]
    write_json(alpaca / "test.json", data[:n_test])
    write_json(alpaca / "val.json", data[n_test : n_test + n_val])
    write_json(alpaca / "train.json", data[n_test + n_val :])
    selected = {
        "name": "qwen05b",
        "kind": "local",
        "model": str(base_model),
        "revision": None,
        "trust_remote_code": False,
        "base_url": None,
        "api_key_env": None,
        "metric": "rouge_l",
        "score": 0.0,
        "why": "the only candidate",
    }
    write_json(project / p["base"]["selected"], selected)
    write_json(project / p["base"]["tuning_base"], selected)
    return p


def env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
    )


def run_stage(project: Path, module: str, args: list[str], timeout: float) -> dict:
    """`python -m <module> <args>` in `project` through WRAPPER; its time, exit code, peak memory, output
    tail."""
    peak_file = project / f".peak-{module}.json"
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, module, *args],
            cwd=project,
            env={**env(), "TUNELINE_PEAK_FILE": str(peak_file)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = "timeout", f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    result = {"wall_s": round(time.perf_counter() - start, 2), "exit_code": code}
    if peak_file.exists():
        result.update(json.loads(peak_file.read_text()))
    lines = [line for line in str(out).splitlines() if line.startswith(module.split(".")[-1] + ":")]
    result["summary"] = lines[-3:]
    if code != 0:
        result["log_tail"] = str(out)[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_request(project: Path, timeout: float) -> dict:
    """`tuneline serve` on the export, one chat completion, then stop it; start and request seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    log = project / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneline.interface.cli", "serve", "--port", str(port)],
            cwd=project,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    result: dict = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tuneline serve exited with code {proc.returncode}")
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"tuneline serve was not ready after {timeout:.0f} s")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    model = json.loads(r.read())["data"][0]["id"]
                    break
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(0.5)
        result["start_s"] = round(time.perf_counter() - start, 2)
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "How hot should pour-over water be?"}],
                "max_tokens": 16,
            }
        ).encode()
        asked = time.perf_counter()
        request = urllib.request.Request(
            f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.loads(r.read())
        result.update(
            request_s=round(time.perf_counter() - asked, 3),
            status="ok",
            completion_tokens=reply.get("usage", {}).get("completion_tokens"),
            answer=reply["choices"][0]["message"]["content"][:200],
        )
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result["log_tail"] = (
        log.read_text(encoding="utf-8", errors="replace")[-1500:] if result["status"] != "ok" else None
    )
    return result


def set_method(project: Path, method: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["method"] = method
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def device_info() -> dict:
    import torch
    from gpu import versions

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "attn_implementation": "sdpa",
        "flash_attention": "not tried: no flash-attn wheel carried",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_pipeline.json")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 3 steps, 120 records (CPU too)")
    parser.add_argument(
        "--steps", type=int, help="train.max_steps of each training run (default 50; --tiny 3)"
    )
    parser.add_argument("--records", type=int, help="Alpaca records in all (default 3000; --tiny 120)")
    parser.add_argument(
        "--methods", default="lora,qlora", help="train methods, in order (default lora,qlora)"
    )
    parser.add_argument("--stage-timeout", type=float, default=150, help="seconds one stage may take")
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 50)
    records = args.records or (120 if args.tiny else 3000)
    results = {**device_info(), "steps": steps, "records": records, "stages": {}}

    def record(name: str, result: dict) -> bool:
        results["stages"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        ok = result.get("exit_code", 0) == 0 and result.get("status", "ok") == "ok"
        peak = result.get("peak_allocated_gib")
        print(
            f"  {name}: {'ok' if ok else 'FAILED'} in {result.get('wall_s', result.get('start_s'))} s"
            + (
                f", peak {peak} GiB allocated, {result.get('peak_reserved_gib')} reserved"
                if peak is not None
                else ""
            ),
            flush=True,
        )
        if not ok:
            print(
                "    " + str(result.get("log_tail") or result.get("error"))[-2000:].replace("\n", "\n    "),
                flush=True,
            )
        return ok

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        start = time.perf_counter()
        build_base(Path(tmp) / "qwen05b", args.tiny)
        write_project(project, Path(tmp) / "qwen05b", records, steps, args.tiny)
        record("build_base", {"wall_s": round(time.perf_counter() - start, 2), "exit_code": 0})
        record("select", run_stage(project, "stages.select", ["qwen05b"], args.stage_timeout))
        if not record("tokenize", run_stage(project, "stages.tokenize", [], args.stage_timeout)):
            return
        for method in args.methods.split(","):
            set_method(project, method)
            if not record(f"train_{method}", run_stage(project, "stages.train", [], args.stage_timeout)):
                continue
            record(f"evaluate_{method}", run_stage(project, "stages.evaluate", [], args.stage_timeout))
            if (
                record(f"export_{method}", run_stage(project, "stages.export", [], args.stage_timeout))
                and method == "lora"
            ):
                record("serve_lora", serve_request(project, args.stage_timeout))
            for metrics in ("train/metrics.json", "eval.json", "tokenize.json"):
                path = project / "metrics" / metrics
                if path.exists():
                    results.setdefault("metrics", {}).setdefault(method, {})[metrics] = json.loads(
                        path.read_text()
                    )
    record(
        "total",
        {
            "wall_s": round(sum(s.get("wall_s", 0) or 0 for s in results["stages"].values()), 1),
            "exit_code": 0,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
