"""Decontamination of pretraining text against evaluation answers, as in the GPT-3 paper.

An answer counts as contaminated when one of its n-word sequences (13 by default) also occurs in
the pretraining text. Words are those the generation metrics count: lower-cased, punctuation
dropped, each CJK character a word of its own.
"""

from __future__ import annotations

from tuneline.eval.textmetrics import tokens


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The n-word sequences of `text`."""
    words = tokens(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def contaminated(answers: list[str], texts: list[str], n: int) -> list[int]:
    """Indices of the answers that share an n-word sequence with any of `texts`."""
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        seen |= ngrams(text, n)
    return [i for i, answer in enumerate(answers) if ngrams(answer, n) & seen]
