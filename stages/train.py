"""Fine-tune the selected base model on the tokenized training set.

Reads:  base.tokenized_dir/{train,val}, base.tuning_base (the chosen base, or its continued pretraining),
`train:` (method: qlora | lora | ptuning | full;
        train.profile: the top-level keys for a tiny stand-in, train.hub's for a real base,
        tuneline/model/profiles.py).
Writes: base.adapter_dir/ (the peft adapter, or full weights, with the tokenizer and
        training_args.json; with train.wise_ft below 1, as base + wise_ft x the trained update),
        base.cache_dir/checkpoints/<run key>/ (kept on disk, not a DVC
        output, so never hashed or pushed: a killed run resumes from its newest complete
        checkpoint), base.metrics_dir/train/ (DVCLive: loss,
        learning rate, grad norm, tokens/s; `dvc plots show` draws the curves).
Run:    python -m stages.train (what dvc.yaml runs). With `train.launcher: accelerate` it starts
        itself again under `accelerate launch --config_file <train.accelerate_config>`: one process per
        GPU with DDP, FSDP or DeepSpeed (configs/accelerate/), so `dvc repro` and `dvc exp run` drive
        a multi-GPU run too. By hand: accelerate launch --config_file configs/accelerate/ddp.yaml -m
        stages.train
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path

from datasets import load_from_disk
from dvclive import Live
from transformers.integrations import DVCLiveCallback

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import read_chosen, read_json, skipped_for_api, write_json
from tuneline.model.profiles import with_profile
from tuneline.model.training import (
    checkpoint_dir,
    dir_fingerprint,
    is_main_process,
    last_checkpoint,
    run_key,
    train,
    wise_ft,
)

# Set in the processes `accelerate launch` starts for us, so they train instead of launching again.
LAUNCHED_ENV = "TUNELINE_LAUNCHED"


def sort_target_modules(config_path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes between processes; sorted,
    the same adapter has the same bytes (and DVC hash) on every run."""
    if not config_path.exists():
        return
    config = read_json(config_path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(config_path, config)


def accelerate_command(config: str) -> list[str]:
    """This stage under `accelerate launch` with the config file `config`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "stages.train"]


def relaunch(p: params.Train) -> int:
    """Run the stage under `accelerate launch` (train.launcher: accelerate); its exit code."""
    print(f"train: accelerate launch --config_file {p.accelerate_config}", flush=True)
    return subprocess.run(
        accelerate_command(p.accelerate_config), env={**os.environ, LAUNCHED_ENV: "1"}
    ).returncode


def main() -> None:
    base, p = params.load("base", "train")
    params.check_environment("train", p)
    if p.launcher == "accelerate" and not os.environ.get(LAUNCHED_ENV):
        code = relaunch(p)
        if code:
            raise SystemExit(code)
        return
    chosen = read_chosen(base.tuning_base)
    out_dir = Path(base.adapter_dir)
    live_dir = Path(base.metrics_dir) / "train"
    msg = f"the chosen model {chosen.name} is an API model used as is; no local training"
    if skipped_for_api(
        chosen,
        "train",
        msg,
        {out_dir / "SKIPPED.json": {"reason": msg}, live_dir / "metrics.json": {"skipped": 1}},
        clear=out_dir,
    ):
        return

    p, profile, settings = with_profile(p, chosen.name_or_path)
    print(
        f"train: profile {profile} (train.profile {p.profile}): "
        + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()),
        flush=True,
    )
    data_dir = Path(base.tokenized_dir)
    train_ds = load_from_disk(str(data_dir / "train"))
    eval_ds = load_from_disk(str(data_dir / "val")) if (data_dir / "val").exists() else None
    key = run_key(
        p, chosen, dir_fingerprint(data_dir), base.seed, world_size=int(os.environ.get("WORLD_SIZE", "1"))
    )
    checkpoints = checkpoint_dir(Path(base.cache_dir) / "checkpoints", key)
    resuming = last_checkpoint(checkpoints) is not None
    # Under `accelerate launch` every process runs this script; only the main one logs and saves,
    # or the processes would clear and write the same directories at once.
    main_process = is_main_process()
    callbacks = []
    if main_process:
        live = Live(dir=str(live_dir), resume=resuming, save_dvc_exp=False, dvcyaml=None, report=None)
        live.log_params({"profile": profile, **settings})
        callbacks.append(DVCLiveCallback(live=live))

    # Every process saves: under FSDP/ZeRO-3 the weights are gathered from all of them; the main one writes.
    # The trained model is dropped here, and freed (the Trainer's reference cycles too): it is saved, and
    # wise_ft reads the saved files and the base's on CPU.
    tokenizer, metrics = train(
        chosen, p, train_ds, eval_ds, checkpoints, base.seed, callbacks, save_to=out_dir
    )[1:]
    gc.collect()
    if not main_process:
        return

    sort_target_modules(out_dir / "adapter_config.json")
    interpolated = wise_ft(out_dir, chosen, p.wise_ft)
    tokenizer.chat_template = (data_dir / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(out_dir)
    trainable, total = metrics["trainable_parameters"], metrics["total_parameters"]
    write_json(
        out_dir / "training_args.json",
        {
            "base_model": chosen.record,
            "method": p.method,
            "params": dataclasses.asdict(p),
            "profile": profile,
            "seed": base.seed,
            "run_key": key,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_records": len(train_ds),
        },
    )
    timings.write(base.metrics_dir, "train", timings.split(metrics)[1])
    print(
        f"train: {p.method} on {chosen.name}: {trainable:,} of {total:,} parameters trained; "
        f"train_loss {metrics.get('train_loss', float('nan')):.4f}; saved to {out_dir}"
        + (
            f" as base + {p.wise_ft:g} x the trained update (train.wise_ft, {interpolated} tensors)"
            if interpolated
            else ""
        )
    )


if __name__ == "__main__":
    run(main)
