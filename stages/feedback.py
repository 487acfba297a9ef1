"""Turn the review decisions into the feedback the augment stage reads.

Reads:  base.decisions (a person's decisions from `tuneline review`).
Writes: base.feedback: {content hash: the reviewer's reason} of every generated record whose last
        decision is a reject (`tuneline.data.review.human_mistakes`), keys sorted.
Run:    python -m stages.feedback

Its own stage so that DVC reruns augment only when this feedback changed: an accept, an edit or a
reject of a crawled or seed record changes the decisions file and this stage's run (a second at
most), but not its output, and DVC then skips augment and runs clean and what follows.
"""

from __future__ import annotations

from stages import run
from tuneline.common import params
from tuneline.common.records import write_json
from tuneline.data.review import human_mistakes, read_decisions


def main() -> None:
    (base,) = params.load("base")
    feedback = human_mistakes(read_decisions(base.decisions))
    write_json(base.feedback, feedback)
    print(f"feedback: {len(feedback)} generated records a reviewer rejected, for augment's next rounds")


if __name__ == "__main__":
    run(main)
