#!/usr/bin/env bash
# The GPU bench on a machine with no network: run from the repository root with the wheels of the
# packages that machine lacks in .whl/ (bitsandbytes, trl, liger-kernel, datasets, dill, multiprocess;
# see README, Running on GPUs). Writes $OUT/gpu.json (partial results after every run) and $OUT/gpu.log.
# Whole script: under 8 minutes (the bench itself is cut at 7 min 20 s; its JSON keeps what finished).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "liger_kernel", "datasets", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as err:  # a package that fails to import is reported, the bench records what it can
        print(f"{name} FAILED: {type(err).__name__}: {err}")
import torch
print("cuda", torch.version.cuda, "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
PY
timeout 440 python3 bench/gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
echo "gpu bench exit: ${PIPESTATUS[0]} (124: cut at the time limit; $OUT/gpu.json holds the runs that finished)"
