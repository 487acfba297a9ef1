"""clean.engine: ray — the clean stage's per-record work as Ray Data `map_batches`.

Two steps of the clean stage look at one record (or one batch of texts) at a time: the rules
(`clean.rule_outcome`: rule filters, PII, language ID) and the embeddings (`clean.embed_texts`'s
encoder batches). Here they run as Ray Data `map_batches` on the cluster that `RAY_ADDRESS` names,
or on a local Ray started on this machine's cores when it is unset. What needs the whole dataset
(exact duplicates, the kNN graph, Datalab) stays in the driver, on the gathered results.

Every row carries the index of its record (or batch) in the driver's list, and the results are put
back in that order, so they, the ids and the outputs do not depend on the order in which blocks
arrive. Records travel as JSON text: Arrow would give a column to every key any record has, and
fill it with nulls in the records that lack it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np

# Records per Ray Data block of the rules pass (a block is one task's work).
BLOCK_RECORDS = 1000


def connect() -> str:
    """Join the Ray cluster `RAY_ADDRESS` names, or start a local one when it is unset (a no-op when
    this process is connected already); returns where, for the stage's log."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            # A local Ray for this run alone: on loopback, without the dashboard.
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return os.environ.get("RAY_ADDRESS") or "a local Ray"


def cluster_cpus() -> int:
    """The CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def records_dataset(records: list[dict], block_records: int | None = None):
    """A Ray Dataset of `records`: rows {"i": index, "x": the record as JSON}, `block_records` a block
    (None: BLOCK_RECORDS)."""
    import ray.data

    block_records = block_records or BLOCK_RECORDS
    rows = [{"i": i, "x": json.dumps(record, ensure_ascii=False)} for i, record in enumerate(records)]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // block_records)))


def _json_map(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def apply(batch: dict) -> dict:
        return {"i": batch["i"], "x": [json.dumps(fn(json.loads(x)), ensure_ascii=False) for x in batch["x"]]}

    return apply


def gathered(dataset, fn: Callable[[dict], dict]) -> list[dict]:
    """`fn` of every row's record, by `map_batches` on the cluster, in the rows' index order."""
    rows = dataset.map_batches(_json_map(fn), batch_size=None, batch_format="numpy").take_all()
    return [json.loads(row["x"]) for row in sorted(rows, key=lambda row: int(row["i"]))]


def map_records(fn: Callable[[dict], dict], records: list[dict]) -> list[dict]:
    """`fn` of every record, run on the Ray cluster, in the records' order (clean.RecordMap)."""
    return gathered(records_dataset(records), fn) if records else []


class _Encode:
    """A Ray actor's encoder: the model is loaded once per actor, then encodes one batch a row."""

    def __init__(self, name: str, batch_size: int, max_seq_length: int):
        from tuneline.data.clean import load_encoder

        self.encode = load_encoder(name, batch_size, max_seq_length)

    def __call__(self, batch: dict) -> dict:
        vectors = [self.encode(json.loads(texts)) for texts in batch["x"]]
        return {
            "b": batch["b"],
            "v": [v.astype(np.float32).tobytes() for v in vectors],
            "n": [len(v) for v in vectors],
        }


def ray_batch_encoder(name: str, batch_size: int, max_seq_length: int):
    """A clean.BatchEncoder whose batches are encoded by Ray actors, one per cluster CPU (at most one
    per batch), each holding the model named in clean.embedding_model. A batch is encoded whole, as
    in this process, so its texts are padded alike and get the same vectors."""

    def encode_batches(batches: list[list[str]]) -> Iterator[tuple[int, np.ndarray]]:
        import ray.data

        if not batches:
            return
        rows = [{"b": b, "x": json.dumps(texts, ensure_ascii=False)} for b, texts in enumerate(batches)]
        actors = min(cluster_cpus(), len(rows))
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _Encode,
            fn_constructor_args=(name, batch_size, max_seq_length),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
        )
        # Rows come back as the actors finish them; each is stored by its batch index.
        for row in dataset.iter_rows():
            vectors = np.frombuffer(row["v"], dtype=np.float32)
            yield int(row["b"]), vectors.reshape(int(row["n"]), -1)

    return encode_batches
