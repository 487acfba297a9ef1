"""Human review decisions: data, versioned with the data they apply to.

A person's decisions (from `tuneline review`) are appended to `base.decisions`, one JSON object
a line, a git-tracked file that the clean and feedback stages depend on:

    {"id": ..., "content_hash": ..., "action": "accept" | "reject" | "edit", "reason": ...,
     "edits": {"output": ...}, "reviewer": ..., "time": "2026-12-01T03:00:00+00:00", "view": ...,
     "source": "generated"}

A decision names a record by its `id` and the `content_hash` of the text the person saw. The
last decision for an id wins. A decision whose record no longer exists with that content (the
text changed upstream) is stale: reported, never applied to something else. This module holds
the pure functions; the clean stage applies decisions (`apply_decisions`, `override_rejects`),
the feedback stage turns human rejects of generated records into what augment shows as "avoid
these mistakes" (`human_mistakes`).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tuneline.common.records import InputError, iter_numbered_jsonl, text_hash

ACTIONS = ("accept", "reject", "edit")
EDITABLE = ("instruction", "input", "output")
REVIEWER_ENV = "TUNELINE_REVIEWER"
# The reasons offered in the review page; free text is allowed as well.
REJECT_REASONS = (
    "wrong answer",
    "not answered by the question",
    "off topic",
    "unsafe or private content",
    "duplicate",
    "bad language or formatting",
)


def read_decisions(path: str | Path) -> list[dict]:
    """The decisions in `path` in file order ([] when the file is absent, empty or blank).

    A bad line fails naming the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        return []
    decisions = []
    for line_no, d in iter_numbered_jsonl(path):
        where = f"{path}:{line_no}"
        for key in ("id", "content_hash"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise InputError(f"{where}: field {key!r} must be a non-empty string")
        if d.get("action") not in ACTIONS:
            raise InputError(
                f"{where}: field 'action' is {d.get('action')!r}; expected one of {', '.join(ACTIONS)}"
            )
        edits = d.get("edits") or {}
        strings = isinstance(edits, dict) and all(isinstance(v, str) for v in edits.values())
        if not strings or set(edits) - set(EDITABLE):
            raise InputError(f"{where}: field 'edits' must map some of {', '.join(EDITABLE)} to strings")
        if d["action"] == "edit" and not edits:
            raise InputError(f"{where}: an 'edit' decision needs field 'edits'")
        decisions.append(d)
    return decisions


def latest_by_id(decisions: list[dict]) -> dict[str, dict]:
    """The last decision for each record id (a person may change their mind)."""
    return {d["id"]: d for d in decisions}


def reviewer_name(cwd: str | Path | None = None) -> str:
    """Who decides: $TUNELINE_REVIEWER, else `git config user.name`, else the login name."""
    if os.environ.get(REVIEWER_ENV):
        return os.environ[REVIEWER_ENV]
    try:
        git = subprocess.run(
            ["git", "config", "user.name"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        name = git.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return name or getpass.getuser()


def reviewed_hash(record: dict) -> str:
    """The content hash a decision about `record` names: that of the text as the clean stage read it.

    A record the clean stage edited carries the hash it had before (`edited_from`), so a later
    decision about it still finds it in the clean stage's input.
    """
    return record.get("edited_from") or record.get("content_hash") or text_hash(record)


def make_decision(
    record: dict,
    action: str,
    reviewer: str,
    reason: str = "",
    edits: dict | None = None,
    view: str = "",
    now: datetime | None = None,
) -> dict:
    """One line of the decisions file about `record`; edits keep only fields that really changed."""
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    changed = {k: v for k, v in (edits or {}).items() if k in EDITABLE and v != (record.get(k) or "")}
    if action == "edit" and not changed:
        raise ValueError("an edit must change instruction, input or output")
    if action != "edit" and changed:  # an accept or reject would drop the changed text without a word
        raise ValueError(
            f"you changed {', '.join(sorted(changed))} but chose {action}: choose edit to keep the change, "
            "or put the text back"
        )
    return {
        "id": record["id"],
        "content_hash": reviewed_hash(record),
        "action": action,
        "reason": reason.strip(),
        "edits": changed if action == "edit" else {},
        "reviewer": reviewer,
        "time": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "view": view,
        "source": record.get("source") or "",
    }


def append_decision(path: str | Path, decision: dict) -> None:
    """Append one decision to the decisions file (created with its folder when absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(decision, ensure_ascii=False, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Applied:
    """What the decisions did to the clean stage's input before the rules ran."""

    records: list[dict]  # input records, human rejects removed, edits applied
    rejects: list[dict]  # rejects.jsonl rows with reason `human`
    accepted: dict[str, dict]  # id -> accept decision, for `override_rejects`
    stale: list[dict]  # decisions whose record no longer exists with that content
    edited: int


def apply_decisions(records: list[dict], decisions: list[dict]) -> Applied:
    """Apply the last decision per record id to `records` (which carry `id` and `content_hash`)."""
    by_id = {r["id"]: r for r in records}
    live, stale = {}, []
    for record_id, d in latest_by_id(decisions).items():
        record = by_id.get(record_id)
        if record is None or record.get("content_hash") != d["content_hash"]:
            stale.append(
                {
                    "id": record_id,
                    "content_hash": d["content_hash"],
                    "action": d["action"],
                    "reviewer": d.get("reviewer"),
                    "time": d.get("time"),
                }
            )
        else:
            live[record_id] = d
    kept, rejects, edited = [], [], 0
    for record in records:
        d = live.get(record["id"])
        if d is None or d["action"] == "accept":
            kept.append(record)
        elif d["action"] == "reject":
            rejects.append(
                {
                    "id": record["id"],
                    "reason": "human",
                    "detail": d.get("reason") or "rejected by a reviewer",
                    "score": None,
                    "reviewer": d.get("reviewer"),
                    "record": record,
                }
            )
        else:
            changed = {**record, **d["edits"], "edited_by_human": True, "edited_from": record["content_hash"]}
            kept.append({**changed, "content_hash": text_hash(changed)})
            edited += 1
    accepted = {i: d for i, d in live.items() if d["action"] == "accept"}
    return Applied(kept, rejects, accepted, sorted(stale, key=lambda s: s["id"]), edited)


def override_rejects(
    kept: list[dict], rejects: list[dict], accepted: dict[str, dict]
) -> tuple[list[dict], list[dict], Counter]:
    """(kept + the rejects a person accepted, the other rejects, overrides by the overridden reason).

    A record may have several rejects rows (a rule and its `also`); one accept lifts them all.
    """
    overridden = [r for r in rejects if r["id"] in accepted]
    back = {r["id"]: {**r["record"], "accepted_by_human": True, "overrode": r["reason"]} for r in overridden}
    others = [r for r in rejects if r["id"] not in accepted]
    return kept + list(back.values()), others, Counter(r["reason"] for r in overridden)


def human_metrics(decisions: list[dict], applied: Applied, overrides: Counter) -> dict:
    """The `human` section of metrics/clean.json: what the decisions did, and which are stale."""
    return {
        "decisions": len(decisions),
        "records_decided": len(latest_by_id(decisions)),
        "rejected": len(applied.rejects),
        "accepted": len(applied.accepted),
        "overrides": sum(overrides.values()),
        "overrides_by_reason": dict(sorted(overrides.items())),
        "edited": applied.edited,
        "stale": len(applied.stale),
        "stale_decisions": applied.stale,
    }


def human_mistakes(decisions: list[dict]) -> dict[str, str]:
    """{content hash: the person's reason} of every generated record whose last decision is a reject.

    The augment stage matches these against the records a round generates (by content hash:
    ids are given only at the end of the run) and shows them as mistakes to avoid. Rejects of
    records from another source (seed, crawl, dataset) are no feedback for the generator; a
    decision that does not say its record's source (written before decisions did) counts.
    """
    return {
        d["content_hash"]: d.get("reason") or "rejected by a reviewer"
        for d in latest_by_id(decisions).values()
        if d["action"] == "reject" and d.get("source", "") in ("", "generated")
    }
