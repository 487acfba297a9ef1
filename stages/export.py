"""Export the fine-tuned model for serving: adapter merged into the base, with a model card.

Reads:  base.tuning_base, base.adapter_dir, base.metrics_dir/eval.json, the Alpaca files (their hashes
        go into the model card), `export:`.
Writes: base.export_dir/ (safetensors, config, tokenizer with chat template, README.md model card): a
        plain checkpoint any OpenAI-compatible server loads. A P-tuning run's virtual tokens become
        special tokens that the chat template puts first (tuneline.model.export.with_virtual_tokens).
Run:    python -m stages.export; then `make serve` serves it on 127.0.0.1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stages import run
from tuneline.common import params
from tuneline.common.records import read_chosen, read_json, skipped_for_api
from tuneline.model.export import dir_md5, export, file_md5, model_card


def main() -> None:
    base, p = params.load("base", "export")
    chosen = read_chosen(base.tuning_base)
    out_dir = Path(base.export_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    reason = f"{chosen.name} is an API model used as is; nothing to export"
    if skipped_for_api(
        chosen, "export", "an API model was chosen", {out_dir / "SKIPPED.json": {"reason": reason}}
    ):
        return
    training = read_json(Path(base.adapter_dir) / "training_args.json")
    written = export(chosen, base.adapter_dir, out_dir, p.dtype)
    hashes = {
        f.name: file_md5(f)
        for f in sorted(Path(base.alpaca_dir).glob("*.json"))
        if f.name != "dataset_info.json"
    }
    card = model_card(
        chosen,
        training,
        base.alpaca_dir,
        dir_md5(base.alpaca_dir),
        hashes,
        read_json(Path(base.metrics_dir) / "eval.json"),
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    print(f"export: {training['method']} model ({written}) written to {out_dir}")


if __name__ == "__main__":
    run(main)
