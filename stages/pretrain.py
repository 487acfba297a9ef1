"""Check the chosen base's pretraining text for contamination, and optionally continue its pretraining.

Reads:  base.selected, base.alpaca_dir/{val,test}.json (the answers evaluation asks for),
        <selected model>/pretraining.json (the corpus a tiny candidate was pretrained on, when there
        is one), base.raw_dir/crawl.jsonl (documents, for continued pretraining), `pretrain:`.
Writes: base.tuning_base (the base that tokenize, train, evaluate and export use: the selected one,
        or with pretrain.enabled its continued pretraining), base.pretrained_dir/ (those weights and
        tokenizer, and rejects.jsonl: documents left out, with the reason), base.metrics_dir/pretrain.json
        (decontamination: how many val/test answers share a pretrain.decontamination_ngram-word
        sequence with the pretraining text; the default reports 0), DVCLive curves in
        base.metrics_dir/pretrain/ and the Trainer's runtime and throughput in
        base.metrics_dir/timings/pretrain.json when it trains.
Run:    python -m stages.pretrain
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import (
    ChosenModel,
    InputError,
    read_chosen,
    read_json,
    read_jsonl,
    skipped_for_api,
    write_json,
    write_jsonl,
)
from tuneline.eval.decontamination import contaminated


def base_corpus(chosen: ChosenModel) -> list[Path]:
    """The files a local candidate was pretrained on, as the models stage recorded them ([] for
    hub models: their pretraining text is not ours to check)."""
    info = Path(chosen.name_or_path) / "pretraining.json"
    if not info.exists():
        return []
    return [Path(f) for f in read_json(info)["corpus_files"]]


def contamination(answers: dict[str, list[dict]], texts: list[str], n: int) -> dict:
    """Per split: answers, how many share an n-word sequence with `texts`, and the first few of their ids."""
    out = {}
    for split, records in answers.items():
        hits = contaminated([r["output"] for r in records], texts, n)
        out[split] = {
            "answers": len(records),
            "contaminated": len(hits),
            "examples": [records[i].get("id") or records[i]["instruction"][:80] for i in hits[:5]],
        }
    return out


def crawled_documents(path: Path, min_chars: int) -> tuple[list[dict], list[dict]]:
    """(documents long enough to pretrain on, rejects) from crawl.jsonl."""
    docs, rejects = [], []
    for item in read_jsonl(path):
        if item.get("kind") != "doc":
            continue
        if len(item.get("text") or "") < min_chars:
            rejects.append(
                {"url": item.get("url"), "reason": "too_short", "chars": len(item.get("text") or "")}
            )
        else:
            docs.append(item)
    return docs, rejects


def main() -> None:
    base, p = params.load("base", "pretrain")
    chosen = read_chosen(base.selected)
    # What continued pretraining reads, named here whether or not it runs (dvc.yaml lists them).
    docs_path, checkpoints_root, seed = (
        Path(base.raw_dir) / "crawl.jsonl",
        Path(base.cache_dir) / "pretrain",
        base.seed,
    )
    out_dir = Path(base.pretrained_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    metrics_path = Path(base.metrics_dir) / "pretrain.json"
    if skipped_for_api(
        chosen,
        "pretrain",
        "an API model was chosen",
        {
            base.tuning_base: chosen.record,
            out_dir / "SKIPPED.json": {"reason": f"{chosen.name} is an API model used as is"},
            metrics_path: {"skipped": 1},
        },
    ):
        return

    answers = {split: read_json(Path(base.alpaca_dir) / f"{split}.json") for split in ("val", "test")}
    files = base_corpus(chosen)
    metrics = {
        "ngram": p.decontamination_ngram,
        "enabled": p.enabled,
        "base_corpus": {
            "files": len(files),
            **contamination(answers, [f.read_text(encoding="utf-8") for f in files], p.decontamination_ngram),
        },
    }
    tuning_base = chosen.record
    if p.enabled:
        docs, rejects = crawled_documents(docs_path, p.min_doc_chars)
        held_out = [r["output"] for split in answers.values() for r in split]
        dirty = set(contaminated([d["text"] for d in docs], held_out, p.decontamination_ngram))
        rejects += [
            {
                "url": d.get("url"),
                "reason": "contaminated",
                "detail": f"shares a {p.decontamination_ngram}-word sequence with a val/test answer",
            }
            for i, d in enumerate(docs)
            if i in dirty
        ]
        docs = [d for i, d in enumerate(docs) if i not in dirty]
        if not docs:
            write_jsonl(out_dir / "rejects.jsonl", rejects)  # the message below points to it
            raise InputError(
                f"pretrain: no crawled document left to pretrain on ({len(rejects)} rejected, see "
                f"{out_dir / 'rejects.jsonl'}); set pretrain.enabled to false or crawl more documents"
            )
        # Imported here: the check alone needs no torch, and its start-up costs seconds per stage.
        from dvclive import Live
        from transformers.integrations import DVCLiveCallback

        from tuneline.model.modeling import load_tokenizer
        from tuneline.model.pretraining import pretrain, run_params, text_blocks
        from tuneline.model.training import checkpoint_dir, prepare_model, run_key

        settings = run_params(
            learning_rate=p.learning_rate,
            batch_size=p.batch_size,
            epochs=p.epochs,
            warmup_ratio=p.warmup_ratio,
            weight_decay=p.weight_decay,
            logging_steps=p.logging_steps,
            save_steps=p.save_steps,
            compute_dtype=p.compute_dtype,
            grad_accum=p.grad_accum,
        )
        tokenizer = load_tokenizer(chosen.name_or_path, chosen.revision, chosen.trust_remote_code)
        blocks = text_blocks(tokenizer, [d["text"] for d in docs], p.block_size)
        live = Live(
            dir=str(Path(base.metrics_dir) / "pretrain"), save_dvc_exp=False, dvcyaml=None, report=None
        )
        data_hash = hashlib.sha256(json.dumps([d["text"] for d in docs]).encode()).hexdigest()[:16]
        key = run_key(settings, chosen, data_hash, seed)
        model = prepare_model(chosen, settings, seed)
        _, result = pretrain(
            model,
            tokenizer,
            blocks,
            settings,
            checkpoint_dir(checkpoints_root, key),
            seed,
            [DVCLiveCallback(live=live)],
            save_to=out_dir,
        )
        tokenizer.save_pretrained(out_dir)
        tuning_base = {
            **chosen.record,
            "name": f"{chosen.name}+pretrain",
            "model": str(out_dir),
            "revision": None,
            "continued_from": chosen.name_or_path,
        }
        metrics["continued"] = {
            "documents": len(docs),
            "rejected": len(rejects),
            "blocks": len(blocks),
            "tokens": sum(len(b) for b in blocks),
            "train_loss": round(result.get("train_loss", 0.0), 4),
        }
        timings.write(base.metrics_dir, "pretrain", timings.split(result)[1])
        write_jsonl(out_dir / "rejects.jsonl", rejects)
        print(
            f"pretrain: continued pretraining of {chosen.name} on {len(docs)} documents "
            f"({len(rejects)} left out), train_loss {metrics['continued']['train_loss']}"
        )
    else:
        write_json(
            out_dir / "SKIPPED.json",
            {"reason": "pretrain.enabled is false: the selected base is fine-tuned as is"},
        )
    write_json(base.tuning_base, tuning_base)
    write_json(metrics_path, metrics)
    found = metrics["base_corpus"]
    print(
        f"pretrain: decontamination ({p.decontamination_ngram}-grams) of {chosen.name}'s pretraining text "
        f"({found['files']} files): {found['test']['contaminated']} of {found['test']['answers']} test "
        f"answers and "
        f"{found['val']['contaminated']} of {found['val']['answers']} val answers shared"
    )


if __name__ == "__main__":
    run(main)
