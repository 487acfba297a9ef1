"""Clean the augmented records: rule filters, PII policy, duplicates, and cleanlab Datalab.

Reads:  base.augmented_dir/records/ (shards),
        base.decisions (human review decisions from `tuneline review`; absent or empty: none)
Writes: base.clean_dir/records/ (kept records, PII redacted when clean.pii is redact),
        base.clean_dir/rejects/ (each removed record with its reason, score and, for
        duplicates, the id of the kept twin; a person's rejects have reason `human`),
        both JSON Lines shards (tuneline.common.records.write_jsonl_shards) cut in the input's order,
        sorted by id within a shard,
        base.metrics_dir/clean.json (counts, rejects by reason, cleanlab issue summary per language),
        base.metrics_dir/clean_report.md (the worst examples per reason, for review),
        base.cache_dir/embeddings/ (embeddings by content hash; kept between runs)
Run:    python -m stages.clean
        (clean.engine: ray runs the rules and the embeddings on the Ray cluster RAY_ADDRESS names,
        or on a local Ray; tuneline.data.rayengine)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages import run
from tuneline.common import params
from tuneline.common.records import (
    InputError,
    in_arrival_order,
    read_jsonl_dir,
    write_json,
    write_jsonl_shards,
)
from tuneline.data.clean import (
    clean_records,
    embed_texts,
    encoder_key,
    lazy_encoder,
    map_in_process,
    render_report,
)
from tuneline.data.review import read_decisions

log = logging.getLogger("clean")


def main() -> None:
    base, p = params.load("base", "clean")
    params.check_environment("clean", p)
    source = Path(base.augmented_dir) / "records"
    if not source.exists():
        raise InputError(f"{source} does not exist; run the augment stage first (dvc repro augment)")
    records = read_jsonl_dir(source)

    store = Path(base.cache_dir) / "embeddings" / "embeddings.sqlite"
    encoder = lazy_encoder(p.embedding_model, p.batch_size, p.embedding_max_seq_length)
    key = encoder_key(p.embedding_model, p.embedding_max_seq_length)
    counts = {"texts": 0, "encoded": 0}
    map_records, encode_batches = map_in_process, None
    if p.engine == "ray":
        from tuneline.data import rayengine

        log.info("clean.engine ray: per-record work on %s", rayengine.connect())
        map_records = rayengine.map_records
        encode_batches = rayengine.ray_batch_encoder(
            p.embedding_model, p.batch_size, p.embedding_max_seq_length
        )

    def embed(texts: list[str]):
        vectors, encoded = embed_texts(texts, encoder, store, key, p.batch_size, encode_batches)
        counts["texts"] += len(texts)
        counts["encoded"] += encoded
        return vectors

    started = time.perf_counter()
    result = clean_records(records, p, embed, read_decisions(base.decisions), map_records)
    clean_dir = Path(base.clean_dir)
    by_id = lambda r: str(r["id"])  # noqa: E731  the order within a shard, as clean_records sorts
    write_jsonl_shards(
        clean_dir / "records", in_arrival_order(result.kept, records), base.shard_records, by_id
    )
    write_jsonl_shards(
        clean_dir / "rejects",
        in_arrival_order(result.rejects, records),
        base.shard_records,
        lambda r: (str(r["id"]), r["reason"]),
    )
    write_json(Path(base.metrics_dir) / "clean.json", result.metrics)
    report = Path(base.metrics_dir) / "clean_report.md"
    report.write_text(render_report(result, p.report_examples), encoding="utf-8")

    m = result.metrics
    reasons = ", ".join(f"{r} {n}" for r, n in m["rejects_by_reason"].items()) or "none"
    h = m["human"]
    reviewed = (
        f"; review: {h['rejected']} rejected, {h['accepted']} accepted ({h['overrides']} overrides), "
        f"{h['edited']} edited, {h['stale']} stale"
        if h["decisions"]
        else ""
    )
    unchecked = [language for language, cl in m["cleanlab"]["languages"].items() if "skipped" in cl]
    skipped = f"; cleanlab Datalab skipped for {', '.join(unchecked)} (see metrics)" if unchecked else ""
    print(
        f"clean: {m['records_in']} records -> {m['records_out']} kept, {m['rejected']} rejected "
        f"({reasons}){reviewed}"
        f"{skipped}; embeddings for {counts['texts']} texts, {counts['encoded']} newly encoded; "
        f"{time.perf_counter() - started:.1f} s"
    )
    for language, cl in m["cleanlab"]["languages"].items():
        if "skipped" in cl:
            log.info("cleanlab Datalab skipped for language %s: %s", language, cl["skipped"])


if __name__ == "__main__":
    run(main)
