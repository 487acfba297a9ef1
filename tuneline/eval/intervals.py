"""Bootstrap confidence intervals over test records: is a difference more than noise?

Each metric is recomputed on `RESAMPLES` resamples of the records (drawn with replacement, from a
seeded generator), and the interval is the middle 95% of the resampled values. For a delta the
resampling is paired: base and tuned are scored on the same resampled records, so what varies is
which records were asked, not which model answered (Koehn 2004; lm-evaluation-harness reports a
standard error with every score for the same reason). Every metric is recomputed as it is reported:
loss as answer-token-weighted mean, perplexity as its exponential, ROUGE and exact match as means
over records, BLEU as corpus BLEU from the resampled records' n-gram counts (sacrebleu's own).
"""

from __future__ import annotations

import math

import numpy as np
from sacrebleu.metrics import BLEU

RESAMPLES = 1000
LEVEL = 0.95
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
MEAN_METRICS = ("rouge_1", "rouge_2", "rouge_l", "exact_match")
_BLEU = BLEU(tokenize="zh")  # the settings of sacrebleu.corpus_bleu(..., tokenize="zh") in textmetrics


def resample_indexes(n: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """`resamples` rows of `n` record indexes drawn with replacement; the same for the same seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bleu_stats(answers: list[str], references: list[str]) -> np.ndarray:
    """Per-record BLEU sufficient statistics (n-gram matches and totals, lengths): summed over any
    set of records, they give that set's corpus BLEU."""
    return np.array(_BLEU._extract_corpus_statistics(answers, [references]), dtype=np.int64)


def bleu_from_stats(stats: np.ndarray) -> float:
    return min(_BLEU._compute_score_from_stats(stats.tolist()).score / 100, 1.0)


def resampled_metrics(
    rows: list[dict], references: list[str], seed: int, resamples: int = RESAMPLES
) -> dict[str, np.ndarray]:
    """Each metric of `rows` (score()'s per-record rows) on every resample: metric -> `resamples` values.

    Loss is over every record (rows without one, an API model's, give no loss); the generation metrics over
    the records that have an answer (the
    first generation_samples). The resamples depend only on the seed and the number of records, so
    two models' rows of the same records are resampled alike: that is what pairs them.
    """
    out: dict[str, np.ndarray] = {}
    if rows and "loss" in rows[0]:
        idx = resample_indexes(len(rows), seed, resamples)
        losses = np.array([r["loss"] * r["answer_tokens"] for r in rows])
        counts = np.array([r["answer_tokens"] for r in rows])
        out["loss"] = losses[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
        out["perplexity"] = np.exp(np.minimum(out["loss"], 50))
    generated = [r for r in rows if "answer" in r]
    if generated:
        idx = resample_indexes(len(generated), seed, resamples)
        for key in MEAN_METRICS:
            out[key] = np.array([r[key] for r in generated])[idx].mean(1)
        stats = bleu_stats([r["answer"] for r in generated], references[: len(generated)])
        out["bleu"] = np.array([bleu_from_stats(stats[i].sum(0)) for i in idx])
    return out


def percentile_interval(values: np.ndarray) -> dict[str, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": round(float(low), 6), "high": round(float(high), 6)}


def score_intervals(
    rows: list[dict], references: list[str], seed: int, resamples: int = RESAMPLES
) -> dict[str, dict]:
    """The 95% interval of each metric of one model on these records: metric -> {low, high}."""
    return {
        k: percentile_interval(v) for k, v in resampled_metrics(rows, references, seed, resamples).items()
    }


def delta_intervals(
    base_rows: list[dict],
    tuned_rows: list[dict],
    references: list[str],
    seed: int,
    resamples: int = RESAMPLES,
) -> dict[str, dict]:
    """The 95% interval of each metric's delta (tuned - base), paired: both on the same resamples."""
    base = resampled_metrics(base_rows, references, seed, resamples)
    tuned = resampled_metrics(tuned_rows, references, seed, resamples)
    return {k: percentile_interval(tuned[k] - base[k]) for k in base if k in tuned}


def verdict(metric: str, interval: dict[str, float]) -> str:
    """'better', 'worse' or 'within noise': whether the delta's interval leaves out 0, and on which side."""
    if interval["low"] <= 0 <= interval["high"] or any(math.isnan(v) for v in interval.values()):
        return "within noise"
    improved = interval["high"] < 0 if metric in LOWER_IS_BETTER else interval["low"] > 0
    return "better" if improved else "worse"
