"""Fine-tune the selected base model on the tokenized training set.

Reads:  base.tokenized_dir/{train,val}, base.selected, `train:` (method: qlora | lora | ptuning | full).
Writes: base.adapter_dir/ (the peft adapter, or full weights, with the tokenizer and
        training_args.json), base.cache_dir/checkpoints/<run key>/ (persisted: a killed run
        resumes from its newest complete checkpoint), base.metrics_dir/train/ (DVCLive: loss,
        learning rate, grad norm, tokens/s; `dvc plots show` draws the curves).
Run:    python -m stages.train
        Several processes (DDP): accelerate launch --multi_gpu --num_processes 2 -m stages.train
        (on a machine without GPUs this runs 2 CPU processes over gloo; `--cpu` alone starts one
        process). FSDP/DeepSpeed: pass accelerate's --use_fsdp / --use_deepspeed options or a config file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from datasets import load_from_disk
from dvclive import Live
from transformers.integrations import DVCLiveCallback

from tuneline import params
from tuneline.records import read_json, write_json
from tuneline.training import (
    checkpoint_dir, dir_fingerprint, is_main_process, last_checkpoint, run_key, train, trainable_parameters,
)


def sort_target_modules(config_path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes between processes; sorted,
    the same adapter has the same bytes (and DVC hash) on every run."""
    if not config_path.exists():
        return
    config = read_json(config_path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(config_path, config)


def main() -> None:
    base, p = params.load("base", "train")
    selected = read_json(base.selected)
    out_dir = Path(base.adapter_dir)
    live_dir = Path(base.metrics_dir) / "train"
    if selected["kind"] == "api":
        msg = f"the chosen model {selected['name']} is an API model used as is; no local training"
        print(f"train: skipped, {msg}")
        shutil.rmtree(out_dir, ignore_errors=True)
        write_json(out_dir / "SKIPPED.json", {"reason": msg})
        write_json(live_dir / "metrics.json", {"skipped": 1})
        return

    data_dir = Path(base.tokenized_dir)
    train_ds = load_from_disk(str(data_dir / "train"))
    eval_ds = load_from_disk(str(data_dir / "val")) if (data_dir / "val").exists() else None
    key = run_key(p, selected, dir_fingerprint(data_dir), base.seed, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    checkpoints = checkpoint_dir(Path(base.cache_dir) / "checkpoints", key)
    resuming = last_checkpoint(checkpoints) is not None
    # Under `accelerate launch` every process runs this script; only the main one logs and saves,
    # or the processes would clear and write the same directories at once.
    main_process = is_main_process()
    callbacks = []
    if main_process:
        live = Live(dir=str(live_dir), resume=resuming, save_dvc_exp=False, dvcyaml=None, report=None)
        callbacks.append(DVCLiveCallback(live=live))

    model, tokenizer, metrics = train(selected, p, train_ds, eval_ds, checkpoints, base.seed, callbacks)
    if not main_process:
        return

    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    sort_target_modules(out_dir / "adapter_config.json")
    tokenizer.chat_template = (data_dir / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(out_dir)
    trainable, total = trainable_parameters(model)
    write_json(out_dir / "training_args.json", {
        "base_model": selected, "method": p.method, "params": p.__dict__, "seed": base.seed,
        "run_key": key, "trainable_parameters": trainable, "total_parameters": total,
        "train_records": len(train_ds),
    })
    print(f"train: {p.method} on {selected['name']}: {trainable:,} of {total:,} parameters trained; "
          f"train_loss {metrics.get('train_loss', float('nan')):.4f}; saved to {out_dir}")


if __name__ == "__main__":
    main()
