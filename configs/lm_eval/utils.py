"""process_docs of tuneline_test.yaml: each record's choices are its own answer and three others."""

DISTRACTORS = 3


def with_choices(dataset):
    """Each record gets `choices`: its reference answer first (the target, index 0: each choice is
    scored on its own log-likelihood, so its position does not matter), then the answers of the next
    DISTRACTORS records of the split, wrapping around: fixed, so a rerun asks the same questions."""
    answers = dataset["output"]
    n = len(answers)

    def add(doc: dict, i: int) -> dict:
        return {
            "choices": [answers[i]] + [answers[(i + k) % n] for k in range(1, min(DISTRACTORS, n - 1) + 1)]
        }

    return dataset.map(add, with_indices=True)
