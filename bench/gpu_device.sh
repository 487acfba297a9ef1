#!/usr/bin/env bash
# Everything issue 36 asks of a GPU, in one run under 8 minutes, on a machine with no network: run from
# the repository root with the wheels of the packages that machine lacks in .whl/ (bitsandbytes, trl,
# datasets, dill, multiprocess, dvclive with dvc and its small deps, fastapi/uvicorn/pydantic/openai/opentelemetry-api
# for `tuneline serve`, rouge-score, nltk: the report lists them, 20 MB; bitsandbytes keeps its CUDA 13 and CPU
# libraries only). The machine's own torch, transformers, peft and accelerate are used.
# Parts, most valuable first, each with a hard time limit; each writes its results as it goes:
#   1. bench, tuneline vs TRL (LoRA 0.5B x3, QLoRA 8B) -> $OUT/gpu.json      (limit 180 s)
#   2. the pipeline's stages on CUDA                  -> $OUT/gpu_pipeline.json (limit 180 s)
#   3. profile of one LoRA 0.5B step                  -> $OUT/gpu_profile.md (limit 45 s)
#   4. bench, the rest (full 0.5B x3, TRL QLoRA x2)   -> $OUT/gpu.json, added (what is left of 470 s)
# Logs: $OUT/gpu.log (everything). Usage: bash bench/gpu_device.sh [--tiny]   (--tiny: CPU check)
set -u
OUT=${OUT:-bench/results}
TINY=${1:-}
mkdir -p "$OUT"
START=$(date +%s)
LOG="$OUT/gpu.log"
: >"$LOG"
left() { echo $((470 - ($(date +%s) - START))); }
part() {  # part LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less if the whole run is short of time)
    local limit=$1; shift
    local rest; rest=$(left)
    [ "$rest" -lt "$limit" ] && limit=$rest
    if [ "$limit" -le 10 ]; then echo "== skipped (no time left): $*" | tee -a "$LOG"; return; fi
    echo "== [$(($(date +%s) - START)) s] $* (limit ${limit} s)" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    echo "== exit $? (124: cut at its limit; its JSON keeps what finished)" | tee -a "$LOG"
}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
        || echo "wheel install failed: see $LOG" | tee -a "$LOG"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1
python3 - >>"$LOG" 2>&1 <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "dvclive", "pyarrow",
             "fastapi", "openai", "rouge_score", "triton", "flash_attn"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as err:  # a package that fails to import is reported, the parts record what they can
        print(f"{name} FAILED: {type(err).__name__}: {err}")
import torch
print("cuda", torch.version.cuda, "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
PY
echo "== [$(($(date +%s) - START)) s] setup done" | tee -a "$LOG"
part 180 python3 bench/gpu.py $TINY --out "$OUT/gpu.json" --only lora_0p5b,trl_lora_0p5b,qlora_8b_gc,trl_packed_lora_0p5b
part 180 python3 bench/gpu_pipeline.py $TINY --out "$OUT/gpu_pipeline.json"
part 45 python3 bench/gpu.py $TINY --profile "$OUT/gpu_profile.md"
part 465 python3 bench/gpu.py $TINY --append --out "$OUT/gpu.json" \
    --only full_0p5b,trl_full_0p5b,trl_packed_full_0p5b,trl_qlora_8b_gc,trl_packed_qlora_8b_gc
grep -E "^\| |^[a-z_0-9]+: |^  [a-z_0-9]+: " "$LOG" | tail -60
echo "== total $(($(date +%s) - START)) s"
