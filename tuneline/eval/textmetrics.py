"""Generation metrics that work for Chinese as well as English: ROUGE-1/2/L, BLEU-4, exact match.

Text is split into words, with every CJK character a token of its own, so ROUGE on Chinese is not
0 for want of spaces (LLaMA-Factory #2140). BLEU is sacrebleu's with its `zh` tokenizer, which
does the same for Chinese and applies the standard 13a rules to the rest. All scores are in [0, 1].
"""

from __future__ import annotations

import re
import unicodedata

import sacrebleu
from rouge_score import rouge_scorer

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# A run of word characters stops at a CJK character (`\w` alone would swallow "GPU显卡" whole).
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased words, each CJK character a token; punctuation dropped."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


class _Tokenizer:
    """The tokenizer interface rouge_score expects."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer())


def normalize(text: str) -> str:
    return " ".join(tokens(text))


def _unit(bleu: float) -> float:
    """sacrebleu's 0-100 score in [0, 1]; its float sums can land a hair above 100 (1.0000000000000004)."""
    return min(bleu / 100, 1.0)


def record_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1, sentence BLEU-4 and exact match of one prediction."""
    rouge = _ROUGE.score(reference, prediction)
    bleu = (
        _unit(sacrebleu.sentence_bleu(prediction, [reference], tokenize="zh").score)
        if prediction.strip()
        else 0.0
    )
    return {
        "rouge_1": rouge["rouge1"].fmeasure,
        "rouge_2": rouge["rouge2"].fmeasure,
        "rouge_l": rouge["rougeL"].fmeasure,
        "bleu": bleu,
        "exact_match": float(normalize(prediction) == normalize(reference)),
    }


def corpus_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE and exact match over records, and corpus BLEU-4."""
    if not predictions:
        return {}
    per = [record_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    out = {k: sum(s[k] for s in per) / len(per) for k in ("rouge_1", "rouge_2", "rouge_l", "exact_match")}
    out["bleu"] = _unit(sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score)
    return out
