"""Bootstrap intervals: paired over records, seeded, recomputing each metric as it is reported."""

from __future__ import annotations

import pytest

from tuneline.eval.intervals import delta_intervals, score_intervals, verdict
from tuneline.eval.textmetrics import corpus_scores, record_scores

REFERENCES = [f"grind the beans fresh for shot number {i} and tamp them level" for i in range(20)]


def rows(answers: list[str], losses: list[float]) -> list[dict]:
    return [
        {"loss": loss, "answer_tokens": 10, "answer": a, **record_scores(a, ref)}
        for a, loss, ref in zip(answers, losses, REFERENCES)
    ]


def test_a_paired_interval_sees_a_small_consistent_gain_that_separate_intervals_cannot():
    # Records differ a lot in difficulty (loss 1..20); tuning lowers every one by 0.3.
    base = rows(["beans"] * 20, [1.0 + i for i in range(20)])
    tuned = rows(["beans"] * 20, [0.7 + i for i in range(20)])
    delta = delta_intervals(base, tuned, REFERENCES, seed=42)
    assert delta["loss"]["low"] == pytest.approx(-0.3) and delta["loss"]["high"] == pytest.approx(-0.3)
    assert verdict("loss", delta["loss"]) == "better"
    b, t = (
        score_intervals(base, REFERENCES, seed=42)["loss"],
        score_intervals(tuned, REFERENCES, seed=42)["loss"],
    )
    assert t["low"] < b["high"] and b["low"] < t["high"]  # unpaired, the two intervals overlap


def test_verdict_says_worse_better_or_within_noise_by_which_side_of_zero_the_interval_lies():
    assert verdict("rouge_l", {"low": 0.01, "high": 0.2}) == "better"
    assert verdict("rouge_l", {"low": -0.2, "high": -0.01}) == "worse"
    assert verdict("loss", {"low": 0.1, "high": 0.4}) == "worse"  # loss: lower is better
    assert verdict("perplexity", {"low": -3.0, "high": -1.0}) == "better"
    assert verdict("bleu", {"low": -0.05, "high": 0.1}) == "within noise"
    assert verdict("exact_match", {"low": 0.0, "high": 0.0}) == "within noise"  # identical answers


def test_mixed_changes_are_within_noise_and_the_interval_is_reproducible_by_seed():
    losses = [2.0 + 0.1 * i for i in range(20)]
    base = rows(["grind the beans fresh"] * 10 + ["tea"] * 10, losses)
    tuned = rows(["tea"] * 10 + ["grind the beans fresh"] * 10, losses[::-1])  # as many got better as worse
    first = delta_intervals(base, tuned, REFERENCES, seed=7)
    assert verdict("rouge_l", first["rouge_l"]) == "within noise"
    assert first["rouge_l"]["low"] < -0.05 and first["rouge_l"]["high"] > 0.05
    assert delta_intervals(base, tuned, REFERENCES, seed=7) == first
    assert verdict("loss", first["loss"]) == "within noise"
    assert delta_intervals(base, tuned, REFERENCES, seed=8)["loss"] != first["loss"]


def test_the_interval_of_corpus_bleu_brackets_the_corpus_bleu_that_is_reported():
    answers = [
        "grind the beans fresh for shot",
        "tea",
        "tamp them level",
        "grind the beans fresh for shot number 3 and tamp",
    ] * 5
    scored = rows(answers, [1.0] * 20)
    reported = corpus_scores(answers, REFERENCES)
    intervals = score_intervals(scored, REFERENCES, seed=1)
    for key in ("bleu", "rouge_l", "exact_match"):
        assert intervals[key]["low"] <= reported[key] <= intervals[key]["high"], key
    assert intervals["bleu"]["low"] < intervals["bleu"]["high"]


def test_generation_metrics_are_resampled_over_the_generated_records_only_and_api_rows_have_no_loss():
    scored = rows(["tea", "grind the beans fresh"], [1.0, 3.0]) + [{"loss": 2.0, "answer_tokens": 10}] * 8
    intervals = score_intervals(scored, REFERENCES, seed=3)
    assert 0 < intervals["rouge_l"]["high"] <= 1 and intervals["loss"]["low"] >= 1.0
    api = [{"answer": a, **record_scores(a, r)} for a, r in zip(["tea", "beans"], REFERENCES)]
    assert "loss" not in score_intervals(api, REFERENCES, seed=3) and "rouge_l" in score_intervals(
        api, REFERENCES, seed=3
    )
