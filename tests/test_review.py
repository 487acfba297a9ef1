"""Human review: the review page driven by a real client, and its decisions applied by the real clean stage.

One project goes through the loop a person follows: the clean stage runs, `tuneline review` is
launched on 127.0.0.1 and a `gradio_client` makes decisions on the pilot batch, the clean
rejects and the eval samples; a record then changes upstream (its decision goes stale), and the
clean stage runs again with the decisions file the page wrote. Where Debian's `chromium` is
installed, a headless browser renders the page with its records.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.stage_project import ROOT, run_stage, stage_env
from tuneline.common.records import (
    InputError,
    read_json,
    read_jsonl_dir,
    with_ids,
    write_jsonl,
    write_jsonl_shards,
)
from tuneline.data.review import append_decision, human_mistakes, make_decision, read_decisions

REVIEWER = "Ada Reviewer"
PILOT = "augment round 1 (pilot batch)"


def generated(instruction: str, output: str, round_no: int = 1) -> dict:
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "system": "",
        "history": [],
        "source": "generated",
        "generator": "expand",
        "round": round_no,
        "origin": "expand",
        "category": "brewing",
    }


RECORDS = {
    "rejected": generated("How hot should water be for green tea?", "Boiling, always, for ten minutes."),
    "accepted": generated("Name a coffee bean species.", "x"),  # too_short: the rules reject it
    "edited": generated("How long does a French press steep?", "About an hour."),
    "changes": generated("What grind suits a moka pot?", "Fine, a bit coarser than espresso."),
    "kept": generated(
        "Why rinse a paper filter?", "To remove the papery taste and warm the brewer.", round_no=2
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tuneline review exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} was not up after {timeout} s")


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """The project after: clean, review in the page (client), an upstream change, clean again."""
    project = tmp_path_factory.mktemp("review")
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    records = dict(zip(RECORDS, with_ids(RECORDS.values())))
    write_jsonl_shards(project / "data/augmented/records", records.values(), 2000)
    run_stage(project, "clean")
    cleaned = {r["id"]: r for r in read_jsonl_dir(project / "data/clean/records")}
    eval_row = {
        "index": 0,
        "id": records["edited"]["id"],
        "base_loss": 3.0,
        "tuned_loss": 1.0,
        "base_answer": "Tea.",
        "tuned_answer": "About an hour.",
    }
    write_jsonl(project / "metrics/eval/records.jsonl", [eval_row])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = stage_env(TUNELINE_REVIEWER=REVIEWER, GRADIO_ANALYTICS_ENABLED="False")
    app = subprocess.Popen(
        [sys.executable, "-m", "tuneline.interface.cli", "review", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(url, app)
        from gradio_client import Client

        client = Client(url, verbose=False)

        def decide(view: str, key: str, action: str, reason: str = "", **edits: str) -> str:
            r = cleaned.get(records[key]["id"], records[key])
            fields = [edits.get(k, r[k]) for k in ("instruction", "input", "output")]
            return client.predict(view, r["id"], action, reason, *fields, api_name="/decide")

        said = {
            "rejected": decide(PILOT, "rejected", "reject", "wrong answer"),
            "accepted": decide("clean rejects", "accepted", "accept"),
            "edited": decide("eval samples (base vs tuned)", "edited", "edit", output="About four minutes."),
            "changes": decide(PILOT, "changes", "accept"),
            "no reason": decide("augment round 2", "kept", "reject"),
        }
        screenshot = browser_check(project, url) if shutil.which("chromium") else None
    finally:
        app.terminate()
        app.wait(timeout=30)

    # Upstream, the record a decision was made on changes (e.g. augment regenerated it).
    changed = with_ids([{**RECORDS["changes"], "output": "Medium-fine."}])[0]
    write_jsonl_shards(
        project / "data/augmented/records",
        [*(r for k, r in records.items() if k != "changes"), changed],
        2000,
    )
    result = run_stage(project, "clean")
    return {
        "project": project,
        "records": records,
        "said": said,
        "stdout": result.stdout,
        "screenshot": screenshot,
    }


def browser_check(project: Path, url: str) -> dict:
    """Headless chromium: the rendered page (DOM after its scripts ran) and a screenshot."""
    shot = project / "review.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=4000",
        "--window-size=1280,1000",
    ]
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    return {"dom": dom, "png": shot}


def decisions(project: Path) -> list[dict]:
    return read_decisions(project / "data/review/decisions.jsonl")


def test_the_page_saves_one_signed_line_per_decision(reviewed):
    saved = decisions(reviewed["project"])
    records = reviewed["records"]
    assert [d["id"] for d in saved] == [
        records[k]["id"] for k in ("rejected", "accepted", "edited", "changes")
    ]
    assert [d["action"] for d in saved] == ["reject", "accept", "edit", "accept"]
    assert all(d["reviewer"] == REVIEWER and d["time"] for d in saved)
    assert all(
        d["content_hash"] == records[k]["content_hash"]
        for d, k in zip(saved, ("rejected", "accepted", "edited"))
    )
    assert saved[0]["reason"] == "wrong answer" and saved[2]["edits"] == {"output": "About four minutes."}
    assert reviewed["said"]["rejected"].startswith("Saved: reject")
    # a reject without a reason is refused, and nothing is written for it
    assert "needs a reason" in reviewed["said"]["no reason"]


def test_clean_applies_reject_accept_and_edit(reviewed):
    project, records = reviewed["project"], reviewed["records"]
    kept = {r["id"]: r for r in read_jsonl_dir(project / "data/clean/records")}
    rejects = {r["id"]: r for r in read_jsonl_dir(project / "data/clean/rejects")}
    human = rejects[records["rejected"]["id"]]
    assert human["reason"] == "human" and human["detail"] == "wrong answer" and human["reviewer"] == REVIEWER
    assert records["rejected"]["id"] not in kept
    # the rules rejected it in the first run; the person's accept keeps it
    accepted = kept[records["accepted"]["id"]]
    assert accepted["output"] == "x" and accepted["accepted_by_human"] and accepted["overrode"] == "too_short"
    edited = kept[records["edited"]["id"]]
    assert edited["output"] == "About four minutes." and edited["edited_by_human"] is True
    assert edited["edited_from"] == records["edited"]["content_hash"] != edited["content_hash"]
    assert kept[records["kept"]["id"]]["output"] == RECORDS["kept"]["output"]


def test_a_decision_on_changed_content_is_stale_and_not_applied(reviewed):
    project, records = reviewed["project"], reviewed["records"]
    human = read_json(project / "metrics/clean.json")["human"]
    assert human["stale"] == 1 and [s["id"] for s in human["stale_decisions"]] == [records["changes"]["id"]]
    assert (human["rejected"], human["accepted"], human["overrides"], human["edited"]) == (1, 1, 1, 1)
    assert human["overrides_by_reason"] == {"too_short": 1}
    changed = [
        r
        for r in read_jsonl_dir(project / "data/clean/records")
        if r["instruction"] == RECORDS["changes"]["instruction"]
    ]
    assert (
        len(changed) == 1 and changed[0]["output"] == "Medium-fine." and "accepted_by_human" not in changed[0]
    )


def test_the_clean_stage_prints_one_summary_line(reviewed):
    lines = reviewed["stdout"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clean: 5 records -> 4 kept, 1 rejected (human 1)")
    assert "1 edited, 1 stale" in lines[0]
    assert (reviewed["project"] / "metrics/logs/clean.log").is_file()


def test_a_headless_browser_shows_the_records(reviewed):
    if reviewed["screenshot"] is None:
        pytest.skip(
            "no browser: Debian's `chromium` is not installed (apt-get install chromium), so the page was "
            "not rendered"
        )
    dom, png = reviewed["screenshot"]["dom"], reviewed["screenshot"]["png"]
    # Rendered HTML, not the page's JSON config (which has the Markdown source, with backticks):
    # the title, and the first pilot record's id in the record's description.
    first = min(reviewed["records"][k]["id"] for k in ("rejected", "accepted", "edited", "changes"))
    assert "<h1>tuneline review" in dom and f"<code>{first}</code>" in dom
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_decision_lines_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "decisions.jsonl"
    assert read_decisions(path) == []  # absent: no decisions
    good = make_decision(
        {"id": "a1", "content_hash": "h1", "output": "old"}, "edit", "me", edits={"output": "new"}
    )
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "action": "approve"}) + "\n")
    with pytest.raises(InputError, match=r"decisions.jsonl:2: field 'action' is 'approve'"):
        read_decisions(path)
    with pytest.raises(ValueError, match="an edit must change"):
        make_decision(
            {"id": "a1", "content_hash": "h1", "output": "old"}, "edit", "me", edits={"output": "old"}
        )


def test_only_rejects_of_generated_records_are_feedback_for_augment(tmp_path):
    def record(i: int, source: str) -> dict:
        return {
            "id": f"r{i}",
            "content_hash": f"h{i}",
            "instruction": f"q{i}",
            "output": f"a{i}",
            "source": source,
        }

    generated, crawled, seed = record(1, "generated"), record(2, "crawl"), record(3, "seed")
    decisions = [
        make_decision(generated, "reject", "me", "made up"),
        make_decision(crawled, "reject", "me", "off topic"),
        make_decision(seed, "accept", "me"),
        make_decision(record(4, "generated"), "accept", "me"),
    ]
    older = make_decision(record(5, ""), "reject", "me", "vague")
    del older["source"]  # written before decisions named their record's source: counted
    assert {d["source"] for d in decisions} == {"generated", "crawl", "seed"}
    assert human_mistakes(decisions + [older]) == {
        generated["content_hash"]: "made up",
        older["content_hash"]: "vague",
    }
    # a later accept of the generated record takes its reject back
    assert generated["content_hash"] not in human_mistakes(
        decisions + [make_decision(generated, "accept", "me")]
    )

    # the stage writes the same bytes whatever accepts are added: DVC then skips augment
    path = tmp_path / "data/review/decisions.jsonl"
    for d in decisions[:2]:
        append_decision(path, d)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    outputs = []
    for extra in (
        [],
        [make_decision(record(6, "generated"), "accept", "me"), make_decision(crawled, "reject", "me", "x")],
    ):
        for d in extra:
            append_decision(path, d)
        run_stage(tmp_path, "feedback")
        outputs.append((tmp_path / "data/review/feedback.json").read_bytes())
    assert outputs[0] == outputs[1] and json.loads(outputs[0]) == {generated["content_hash"]: "made up"}


# ---------------------------------------------------------------- a person at the page, in a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no browser: Debian's chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run installs them)",
)


@pytest.fixture
def page(tmp_path):
    """The review page of a project with four pilot records, served by `tuneline review`, in headless
    chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    pilot = with_ids([RECORDS[k] for k in ("rejected", "accepted", "edited", "changes")])
    write_jsonl_shards(project / "data/augmented/records", pilot, 2000)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = stage_env(TUNELINE_REVIEWER=REVIEWER, GRADIO_ANALYTICS_ENABLED="False")
    app = subprocess.Popen(
        [sys.executable, "-m", "tuneline.interface.cli", "review", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for(url, app)
        # Both paths given: Selenium Manager, which would look for a driver online, is not started.
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.get(url)
        yield {
            "driver": driver,
            "url": url,
            "project": project,
            "pilot": sorted(pilot, key=lambda r: r["id"]),
        }
    finally:
        if driver is not None:
            driver.quit()
        app.terminate()
        app.wait(timeout=30)


def element(driver, css: str):
    """The element at `css` once the page has rendered it."""
    return wait_until(
        driver,
        lambda d: d.find_elements("css selector", css) and d.find_element("css selector", css),
        f"an element at {css}",
    )


def text_of(driver, css: str) -> str:
    return element(driver, css).text


def wait_until(driver, check, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: check(d), message=what)


def shows(driver, css: str, words: str) -> bool:
    return words in text_of(driver, css)


def choose(driver, action: str) -> None:
    element(driver, f"#decision input[value='{action}']").click()


def chosen(driver) -> str:
    return driver.find_element("css selector", "#decision input:checked").get_attribute("value")


def type_into(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = element(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    box.send_keys(Keys.TAB)  # blur: the page takes the value


@needs_browser
def test_a_person_at_the_page_moves_between_records_decides_and_sees_what_landed(page):
    driver, project, pilot = page["driver"], page["project"], page["pilot"]
    decisions_file = project / "data/review/decisions.jsonl"
    # The position comes with the page load's reload: once it shows, the page is live.
    wait_until(driver, lambda d: shows(d, "#position", "record 1 of 4"), "the position, record 1 of 4")
    assert pilot[0]["id"] in text_of(driver, "body")

    # A reject half made, then Next: the decision, the reason and the message do not follow to the next
    # record.
    choose(driver, "reject")
    type_into(driver, "#reason input", "off topic")
    element(driver, "#next").click()
    wait_until(driver, lambda d: shows(d, "#position", "record 2 of 4"), "Next moves to record 2 of 4")
    wait_until(driver, lambda d: chosen(d) == "accept", "the decision is reset to accept")
    assert driver.find_element("css selector", "#reason input").get_attribute("value") == ""
    assert pilot[1]["id"] in text_of(driver, "body")

    # Text changed while accept is selected: refused with a message, nothing written.
    type_into(driver, "#output textarea", "A changed answer.")
    element(driver, "#save").click()
    wait_until(driver, lambda d: shows(d, "#status", "Not saved"), "a refusal message")
    assert "you changed output but chose accept: choose edit to keep the change" in text_of(driver, "#status")
    assert read_decisions(decisions_file) == []

    # The same change as an edit lands, for this record, signed.
    choose(driver, "edit")
    element(driver, "#save").click()
    wait_until(driver, lambda d: shows(d, "#status", "Saved: edit"), "the saved message")
    (saved,) = read_decisions(decisions_file)
    assert (saved["id"], saved["action"], saved["edits"], saved["reviewer"]) == (
        pilot[1]["id"],
        "edit",
        {"output": "A changed answer."},
        REVIEWER,
    )

    # Previous goes back, and the message of the last save is gone.
    element(driver, "#previous").click()
    wait_until(driver, lambda d: shows(d, "#position", "record 1 of 4"), "Previous moves back to record 1")
    wait_until(driver, lambda d: "Saved" not in text_of(d, "#status"), "the message is cleared")

    # After a new run upstream (one more pilot record), loading the page again shows it.
    extra = with_ids([generated("What is a cortado?", "Espresso cut with a little warm milk.")])
    write_jsonl_shards(project / "data/augmented/records", [*pilot, *extra], 2000)
    driver.refresh()
    wait_until(driver, lambda d: shows(d, "#position", "of 5"), "the reloaded view has 5 records")


def test_changed_text_with_accept_or_reject_is_refused_not_dropped():
    record = {"id": "a1", "content_hash": "h1", "instruction": "q", "output": "old"}
    with pytest.raises(
        ValueError, match="you changed output but chose accept: choose edit to keep the change"
    ):
        make_decision(record, "accept", "me", edits={"instruction": "q", "output": "new"})
    with pytest.raises(ValueError, match="you changed instruction but chose reject"):
        make_decision(record, "reject", "me", "off topic", edits={"instruction": "q2", "output": "old"})
    assert (
        make_decision(record, "accept", "me", edits={"instruction": "q", "output": "old"})["action"]
        == "accept"
    )


def test_a_rounds_view_shows_its_kept_records_then_its_rejects_with_reasons():
    from tuneline.interface.reviewapp import pilot_views

    kept = {**generated("Why rinse a paper filter?", "To remove the papery taste."), "id": "aa-kept"}
    dropped = generated("Why rinse a filter?", "Beans beans beans.")
    rejects = [
        {
            "kind": "record",
            "round": 1,
            "reason": "not_grounded",
            "reasons": ["not_grounded", "duplicate"],
            "record": {**dropped, "id": "zz-rejected"},
        },
        {"kind": "reply", "round": 1, "reason": "truncated", "reasons": ["truncated"], "raw": None},
    ]
    views = pilot_views([kept], rejects)
    assert list(views) == [PILOT]
    first, second = views[PILOT]
    assert first["record"] == kept and "rejected" not in first["about"]
    assert second["record"]["id"] == "zz-rejected"
    assert "rejected by the review loop: not_grounded, duplicate" in second["about"]
