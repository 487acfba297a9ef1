"""Tests of tuneline/data/crawl.py and stages/crawl.py.

The crawl tests run the real stage (`python -m stages.crawl`, in a subprocess: scrapy's reactor
runs once per process) against a real HTTP server on 127.0.0.1 started here, which counts the
requests it receives, so limits, robots.txt and the HTTP cache are checked server-side.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tuneline.common import params
from tuneline.common.params import CrawlDataset, ParamsError
from tuneline.common.records import InputError, read_jsonl, read_jsonl_dir
from tuneline.data import crawl

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the test site


def page(title: str, body: str) -> bytes:
    nav = '<nav><a href="/index.html">Home</a> <a href="/faq.html">FAQ</a></nav>'
    footer = "<footer>Copyright Bean &amp; Burr</footer>"
    return f"<html><head><title>{title}</title></head><body>{nav}{body}{footer}</body></html>".encode()


def article(title: str, *paras: str, links: tuple[str, ...] = ()) -> bytes:
    ps = "".join(f"<p>{p}</p>" for p in paras)
    more = "".join(f'<a href="{u}">{u}</a>' for u in links)
    return page(title, f'<article data-category="brewing"><h1>{title}</h1>{ps}</article>{more}')


INDEX_LINKS = [
    "/faq.html",
    "/article.html",
    "/article-copy.html",
    "/private/secret.html",
    "/missing.html",
    "/slow.html",
    "/data",
    "/flaky.html",
    "/loop-a",
    "/big.html",
    "/big-stream.html",
    "/badenc.html",
    "/deep1.html",
    "/qa-gap.html",
    "/links.html",
    "/gbk.html",
    "OFFSITE",
]
GBK_TEXT = "手冲咖啡的水温应该是多少？一般在九十到九十六度之间，刚离火的开水最合适。"

STATIC = {
    "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private/\n"),
    "/faq.html": (
        200,
        "text/html",
        page(
            "FAQ",
            """
        <div class="qa" data-category="grinding"><h2 class="question">Why grind fresh?</h2>
          <div class="answer"><p>Ground coffee loses aroma <b>within minutes</b>.</p></div></div>
        <div class="qa" data-category="beans"><h2 class="question">Where to store beans?</h2>
          <div class="answer">In an airtight tin, away from light.</div></div>
        <div class="qa"><h2 class="question">Do you ship abroad?</h2>
          <div class="answer">Yes, within the EU.</div></div>
    """,
        ),
    ),
    "/article.html": (200, "text/html", article("Descaling", "Limescale slows heating.", "Use citric acid.")),
    "/article-copy.html": (
        200,
        "text/html",
        article("Descaling", "Limescale slows heating.", "Use citric acid."),
    ),
    "/private/secret.html": (200, "text/html", article("Secret", "Do not crawl.")),
    "/offsite.html": (200, "text/html", article("Offsite", "Another host.")),
    "/data": (200, "application/json", b'{"not": "html"}'),
    "/big.html": (200, "text/html", article("Big", "x" * 50_000)),
    "/badenc.html": (
        200,
        "text/html; charset=utf-8",
        b"<html><body><article><h1>Bad</h1><p>caf\xe9 \xff\xfe</p></article></body></html>",
    ),
    # Q&A pairs where the second question lost its answer: the other two must still pair up
    "/qa-gap.html": (
        200,
        "text/html",
        page(
            "Gaps",
            """
        <div class="qa"><h2 class="question">What is crema?</h2>
          <div class="answer">The foam on an espresso.</div></div>
        <div class="qa"><h2 class="question">Is this answered?</h2></div>
        <div class="qa"><h2 class="question">What is a burr?</h2>
          <div class="answer">A grinding ring.</div></div>
    """,
        ),
    ),
    # an index of links inside the article: navigation, not a document
    "/links.html": (
        200,
        "text/html",
        page(
            "Links",
            "<article><h1>All articles</h1><ul>"
            + "".join(
                f'<li><a href="/article.html">Article number {i} about coffee</a></li>' for i in range(8)
            )
            + "</ul></article>",
        ),
    ),
    # no charset anywhere: the encoding must be detected, not assumed
    "/gbk.html": (
        200,
        "text/html",
        f"<html><body><article><h1>水温</h1><p>{GBK_TEXT}</p></article></body></html>".encode("gbk"),
    ),
    # depth_limit 1: c is first found too deep (s1 -> a -> c), then at depth 1 from the slow s2
    "/depth/s1.html": (
        200,
        "text/html",
        article("Start one", "The first start page.", links=("/depth/a.html",)),
    ),
    "/depth/a.html": (
        200,
        "text/html",
        article("Page a", "Linked from start one.", links=("/depth/c.html",)),
    ),
    "/depth/c.html": (200, "text/html", article("Page c", "Reachable at depth one.")),
    "/deep1.html": (200, "text/html", article("Deep one", "Level one.", links=("/deep2.html",))),
    "/deep2.html": (200, "text/html", article("Deep two", "Level two.", links=("/deep3.html",))),
    "/deep3.html": (200, "text/html", article("Deep three", "Level three.")),
    # page-limit source: 30 pages that all link to each other
    **{
        f"/many/{i}.html": (
            200,
            "text/html",
            article(f"Many {i}", f"Page number {i}.", links=tuple(f"/many/{j}.html" for j in range(30))),
        )
        for i in range(30)
    },
    # cache source: a clean little site
    "/clean/a.html": (200, "text/html", article("Clean A", "Alpha.", links=("/clean/b.html",))),
    "/clean/b.html": (200, "text/html", article("Clean B", "Beta.", links=("/clean/a.html",))),
}


class SiteHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    counts: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        try:
            self.respond(self.path.split("?")[0])
        except (BrokenPipeError, ConnectionResetError):  # the crawler gave up (timeout, size cap)
            pass

    def respond(self, path: str) -> None:
        with self.lock:
            self.counts[path] += 1
            hits = self.counts[path]
        if path == "/index.html":
            links = [
                u.replace("OFFSITE", f"http://localhost:{self.server.server_address[1]}/offsite.html")
                for u in INDEX_LINKS
            ]
            return self.send(200, "text/html", page("Home", "".join(f'<a href="{u}">{u}</a>' for u in links)))
        if path == "/flaky.html":  # 503 once, then the page: a retry must fetch it
            if hits == 1:
                return self.send(503, "text/html", b"busy")
            return self.send(200, "text/html", article("Flaky", "Second time lucky."))
        if path == "/depth/s2.html":
            time.sleep(0.3)  # under the tests' download_timeout of 0.5 s
            return self.send(
                200, "text/html", article("Start two", "The slow start page.", links=("/depth/c.html",))
            )
        if path == "/slow.html":
            time.sleep(1.5)
            return self.send(200, "text/html", article("Slow", "Too late."))
        if path in ("/loop-a", "/loop-b"):
            self.send_response(302)
            self.send_header("Location", "/loop-b" if path == "/loop-a" else "/loop-a")
            self.end_headers()
            return None
        if path == "/big-stream.html":  # no Content-Length: the size cap must trip while streaming
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            return self.wfile.write(article("Stream", "y" * 50_000))
        status, ctype, body = STATIC.get(path, (404, "text/html", b"not found"))
        return self.send(status, ctype, body)

    def send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site():
    SiteHandler.counts = Counter()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SiteHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", SiteHandler
    server.shutdown()
    server.server_close()
    thread.join()


# ---------------------------------------------------------------- running the stage


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def source(name: str, start_urls: list[str], **overrides) -> dict:
    s = copy.deepcopy(repo_params()["crawl"]["sources"][0])
    s.update(name=name, start_urls=start_urls, **overrides)
    return s


def crawl_params(sources: list[dict], datasets: list[dict] | None = None, **overrides) -> dict:
    data = repo_params()
    p = data["crawl"]
    p.update(
        serve_site=False,
        sources=sources,
        datasets=datasets or [],
        retry_times=1,
        download_timeout=0.5,
        max_page_bytes=20_000,
        autothrottle_start_delay_s=0.0,
        min_doc_chars=5,
        **overrides,
    )
    return {"base": data["base"], "crawl": p}


def run_stage(workdir: Path, params_data: dict) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params_data, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stages.crawl"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def main_crawl(site, tmp_path_factory):
    """One crawl of three sources: the test site, a 30-page site with max_pages 5, a clean site."""
    base_url, handler = site
    work = tmp_path_factory.mktemp("crawl")
    ds_file = work / "data" / "extra.jsonl"
    ds_file.parent.mkdir(parents=True)
    rows = [
        {"q": "What is crema?", "a": "The foam on top of an espresso.", "topic": "brewing"},
        {"q": "What is crema?", "a": "The foam on top of an espresso.", "topic": "brewing"},
        {"q": "Empty answer?", "a": "", "topic": "beans"},
    ]
    ds_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    datasets = [
        {
            "name": "extra",
            "path": "data/extra.jsonl",
            "format": "jsonl",
            "split": "train",
            "columns": {"instruction": "q", "output": "a", "category": "topic"},
        }
    ]
    sources = [
        source("main", [f"{base_url}/index.html"], depth_limit=2),
        source("many", [f"{base_url}/many/0.html"], max_pages=5, allow=["/many/"]),
        source("clean", [f"{base_url}/clean/a.html"], allow=["/clean/"]),
        source(
            "depth",
            [f"{base_url}/depth/s1.html", f"{base_url}/depth/s2.html"],
            allow=["/depth/"],
            depth_limit=1,
            max_pages=4,
        ),
    ]
    counts_before = Counter(handler.counts)
    proc = run_stage(work, crawl_params(sources, datasets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = Counter(handler.counts)
    counts.subtract(counts_before)
    return work, base_url, +counts, proc


def outputs(work: Path) -> tuple[list[dict], list[dict], dict]:
    items = read_jsonl(work / "data/raw/crawl.jsonl")
    rejects = read_jsonl(work / "data/raw/crawl_rejects.jsonl")
    metrics = json.loads((work / "metrics/crawl.json").read_text(encoding="utf-8"))
    return items, rejects, metrics


def reasons(rejects: list[dict], base_url: str) -> dict[str, str]:
    return {r["url"].removeprefix(base_url): r["reason"] for r in rejects}


def test_qa_and_doc_extraction(main_crawl):
    work, base_url, _, _ = main_crawl
    items, _, _ = outputs(work)
    qa = [i for i in items if i["url"] == f"{base_url}/faq.html"]
    assert [(i["question"], i["answer"], i.get("category")) for i in qa] == [
        ("Do you ship abroad?", "Yes, within the EU.", None),
        ("Where to store beans?", "In an airtight tin, away from light.", "beans"),
        ("Why grind fresh?", "Ground coffee loses aroma **within minutes**.", "grinding"),
    ]
    doc = next(i for i in items if i["url"] == f"{base_url}/article.html")
    assert doc["kind"] == "doc" and doc["title"] == "Descaling" and doc["category"] == "brewing"
    assert (
        doc["text"] == "Limescale slows heating.\n\nUse citric acid."
    )  # Markdown; no nav, footer or heading
    for item in items:
        assert set(item) >= {"url", "source", "kind", "content_hash"}
        assert (
            "fetched_at" not in item
        )  # run times go to metrics: two runs of the same pages write the same bytes


def test_robots_offsite_and_depth(main_crawl):
    work, base_url, counts, _ = main_crawl
    _, rejects, _ = outputs(work)
    assert counts["/private/secret.html"] == 0
    assert reasons(rejects, base_url)["/private/secret.html"] == "robots_txt"
    assert counts["/offsite.html"] == 0  # linked as http://localhost:PORT/, not an allowed domain
    assert counts["/deep2.html"] == 1 and counts["/deep3.html"] == 0  # depth_limit 2


def test_page_limit_is_exact_server_side(main_crawl):
    work, _, counts, _ = main_crawl
    items, _, metrics = outputs(work)
    assert sum(n for path, n in counts.items() if path.startswith("/many/")) == 5
    assert len([i for i in items if i["source"] == "many"]) == 5
    assert metrics["sources"]["many"]["pages"] == 5 and metrics["links_over_max_pages"] > 0


def test_retry_then_success_and_rejects(main_crawl):
    work, base_url, counts, _ = main_crawl
    items, rejects, metrics = outputs(work)
    assert counts["/flaky.html"] == 2
    assert any(i["url"] == f"{base_url}/flaky.html" and i["text"] == "Second time lucky." for i in items)
    got = reasons(rejects, base_url)
    assert got["/missing.html"] == "http_404"
    assert got["/slow.html"] == "timeout" and counts["/slow.html"] == 2  # retried once
    assert got["/data"] == "non_html"
    assert got["/loop-a"] == "redirect_loop"
    assert got["/big.html"] == "too_large" and got["/big-stream.html"] == "too_large"
    assert "/badenc.html" not in got
    assert got["/index.html"] == "no_content"
    assert metrics["rejects_by_reason"]["timeout"] == 1 and metrics["retries"] >= 2
    assert metrics["rejects"] == len(rejects)


def test_a_page_first_seen_too_deep_is_fetched_from_a_shallower_path(main_crawl):
    work, base_url, counts, _ = main_crawl
    items, _, metrics = outputs(work)
    assert counts["/depth/c.html"] == 1
    assert any(i["url"] == f"{base_url}/depth/c.html" for i in items)
    # only fetched pages count against max_pages 4: s1, s2, a, c
    assert metrics["sources"]["depth"]["pages"] == 4 and metrics["links_too_deep"] >= 1


def test_questions_pair_with_their_own_answers(main_crawl):
    work, base_url, _, _ = main_crawl
    items, rejects, metrics = outputs(work)
    gap = [(i["question"], i["answer"]) for i in items if i["url"] == f"{base_url}/qa-gap.html"]
    assert gap == [("What is a burr?", "A grinding ring."), ("What is crema?", "The foam on an espresso.")]
    lost = [r for r in rejects if r["url"] == f"{base_url}/qa-gap.html"]
    assert [(r["reason"], "Is this answered?" in r["detail"]) for r in lost] == [("qa_mismatch", True)]


def test_bad_bytes_are_replaced_and_counted_and_a_missing_charset_is_detected(main_crawl):
    work, base_url, _, _ = main_crawl
    items, _, metrics = outputs(work)
    bad = next(i for i in items if i["url"] == f"{base_url}/badenc.html")
    assert bad["text"] == "caf\ufffd \ufffd\ufffd"
    assert metrics["pages_with_bad_bytes"] == 1 and metrics["bad_bytes_replaced"] == 3
    gbk = next(i for i in items if i["url"] == f"{base_url}/gbk.html")
    assert gbk["title"] == "水温" and gbk["text"] == GBK_TEXT


def test_navigation_only_pages_are_not_documents(main_crawl):
    work, base_url, _, _ = main_crawl
    items, rejects, metrics = outputs(work)
    assert not any(i["url"] == f"{base_url}/links.html" for i in items)
    assert reasons(rejects, base_url)["/links.html"] == "navigation_only"
    assert metrics["rejects_by_reason"]["navigation_only"] >= 1


def test_xpath_selectors_work_like_css():
    from dataclasses import replace

    src = replace(
        crawl_section().sources[0], question_css="xpath://dt", answer_css="xpath://dd", title_css="xpath://h1"
    )
    html = (
        "<html><body><h1>FAQ</h1><dl><dt>What is crema?</dt><dd>Foam.</dd><dt>Burr?</dt><dd>A ring.</dd></dl>"
        "</body></html>"
    )
    items, lost = crawl.page_items(html, src, 0)
    assert [(i["question"], i["answer"]) for i in items] == [
        ("What is crema?", "Foam."),
        ("Burr?", "A ring."),
    ] and lost == []
    with pytest.raises(ParamsError, match=r"question_css 'xpath://dt\[' is not an XPath expression"):
        crawl_section(question_css="xpath://dt[").check("crawl")


def test_duplicates_kept_once(main_crawl):
    work, base_url, _, _ = main_crawl
    items, rejects, _ = outputs(work)
    descaling = [i for i in items if i.get("title") == "Descaling"]
    assert [i["url"] for i in descaling] == [f"{base_url}/article.html"]  # the shorter URL wins
    dup = next(r for r in rejects if r["reason"] == "duplicate" and r["source"] == "main")
    assert dup["url"] == f"{base_url}/article-copy.html"
    assert dup["content_hash"] == descaling[0]["content_hash"]
    assert len({i["content_hash"] for i in items}) == len(items)


def test_datasets_mapped_deduplicated_and_rejected(main_crawl):
    work, _, _, _ = main_crawl
    records = read_jsonl_dir(work / "data/raw/datasets")
    assert [(r["instruction"], r["output"], r["category"], r["source"]) for r in records] == [
        ("What is crema?", "The foam on top of an espresso.", "brewing", "dataset:extra")
    ]
    assert records[0]["input"] == "" and records[0]["history"] == [] and records[0]["system"] == ""
    _, rejects, metrics = outputs(work)
    got = sorted(r["reason"] for r in rejects if r["source"] == "dataset:extra")
    assert got == ["duplicate", "empty_field"]
    assert metrics["dataset_records"] == 1


def test_second_crawl_is_served_from_http_cache(main_crawl, site):
    work, base_url, first_counts, _ = main_crawl
    _, handler = site
    assert first_counts["/clean/a.html"] == 1 and first_counts["/clean/b.html"] == 1
    before = sum(handler.counts.values())
    sources = [source("clean", [f"{base_url}/clean/a.html"], allow=["/clean/"])]
    proc = run_stage(work, crawl_params(sources))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(handler.counts.values()) == before  # zero requests, robots.txt included
    items, _, metrics = outputs(work)
    assert sorted(i["title"] for i in items) == ["Clean A", "Clean B"]
    assert metrics["cache_hits"] == 3  # robots.txt and two pages


def test_bundled_site_crawl_is_deterministic(tmp_path):
    """The default: the stage serves data/site itself; URLs are rebased onto the folder."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "data" / "site", work / "data" / "site")
    shutil.copytree(ROOT / "data" / "datasets", work / "data" / "datasets")
    proc = run_stage(
        work, repo_params() | {"crawl": {**repo_params()["crawl"], "autothrottle_start_delay_s": 0.0}}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    items, rejects, metrics = outputs(work)
    assert metrics["items_by_kind"]["qa"] >= 20 and metrics["items_by_kind"]["doc"] >= 10
    assert all(i["url"].startswith("data/site/") for i in items)
    assert not any("/private/" in i["url"] for i in items)
    assert {r["url"] for r in rejects if r["reason"] == "robots_txt"} == {
        "data/site/private/staff-notes.html",
        "data/site/private/supplier-prices.html",
    }
    assert metrics["dataset_records"] == 30
    # the brewlog manual (bundled_docs): questions under headings, code as on the page
    faq = {
        i["question"]: i["answer"]
        for i in items
        if i["url"] == "data/site/docs/faq.html" and i["kind"] == "qa"
    }
    assert len(faq) == 4 and faq["Why does brewlog reject my recipe file?"].count("```") == 2
    assert (
        "```python\nfrom brewlog import Recipe\n\nrecipe = "
        in faq["How do I scale a recipe to a bigger batch?"]
    )
    assert (
        metrics["sources"]["bundled_docs"]["items"] == 6
    )  # the FAQ's 4 answers, its intro and the manual page
    assert items == sorted(
        items,
        key=lambda i: (
            i["url"],
            i["kind"],
            i.get("question", i.get("title")),
            i.get("answer", i.get("text")),
        ),
    )


def test_bad_selector_fails_at_startup_naming_source_and_key(tmp_path):
    bad = source("shop", ["http://127.0.0.1:9/index.html"], question_css=".qa >> .question")
    proc = run_stage(tmp_path, crawl_params([bad]))
    assert proc.returncode == 2
    assert "crawl.sources[0] (shop).question_css" in proc.stderr
    assert not (tmp_path / "data/raw/crawl.jsonl").exists()


# ---------------------------------------------------------------- pure parts, in process


def crawl_section(**source_overrides):
    data = repo_params()
    data["crawl"]["sources"][0].update(source_overrides)
    return params.section("crawl", data)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"answer_css": "div[[x"}, "crawl.sources[0] (bundled).answer_css"),
        ({"allow": ["(unclosed"]}, "crawl.sources[0] (bundled).allow"),
        ({"max_pages": 0}, "crawl.sources[0] (bundled).max_pages"),
        ({"allowed_domains": []}, "crawl.sources[0] (bundled).allowed_domains"),
        ({"start_urls": ["ftp://example.org/"]}, "crawl.sources[0] (bundled).start_urls"),
    ],
)
def test_check_params_names_source_and_key(overrides, key):
    with pytest.raises(ParamsError, match=key.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        crawl_section(**overrides).check("crawl")


def test_malformed_source_fails_naming_key():
    data = repo_params()
    del data["crawl"]["sources"][0]["depth_limit"]
    with pytest.raises(ParamsError, match=r"crawl.sources\[0\].depth_limit is missing"):
        params.section("crawl", data)
    data = repo_params()
    data["crawl"]["sources"][0]["deph_limit"] = 3
    with pytest.raises(ParamsError, match=r"crawl.sources\[0\].deph_limit is not a known key"):
        params.section("crawl", data)


def test_page_items_qa_mismatch_and_kinds():
    src = crawl_section().sources[0]
    html = (
        '<div class="qa"><p class="question">Q1</p><p class="answer">A1</p><p class="question">Q2</p></div>'
    )
    assert crawl.page_items(html, src, 0) == (
        [{"kind": "qa", "question": "Q1", "answer": "A1"}],
        [("qa_mismatch", "question 'Q2' has no answer after it")],
    )
    html = '<div class="qa"><p class="answer">A0</p><p class="question">Q1</p><p class="answer">A1</p></div>'
    assert crawl.page_items(html, src, 0) == (
        [{"kind": "qa", "question": "Q1", "answer": "A1"}],
        [("qa_mismatch", "answer 'A0' follows no question")],
    )
    items, lost = crawl.page_items("<html><body><p>menu</p></body></html>", src, 0)
    assert items == [] and [r for r, _ in lost] == ["no_content"]
    from dataclasses import replace

    items, lost = crawl.page_items(
        "<h1>T</h1><article><p>a</p><nav>skip</nav><p>b <i>c</i></p></article>", replace(src, kind="doc"), 0
    )
    assert lost == [] and items == [{"kind": "doc", "title": "T", "text": "a\n\nb *c*"}]
    html = (
        '<div class="qa"><p class="question">Q1</p><p class="answer">A1</p>'
        '<p class="question"> </p><p class="answer">A2</p></div>'
    )
    items, lost = crawl.page_items(html, src, 0)
    assert items == [{"kind": "qa", "question": "Q1", "answer": "A1"}] and [r for r, _ in lost] == [
        "qa_empty"
    ]


def test_trafilatura_strips_boilerplate_without_text_selector():
    from dataclasses import replace

    src = replace(crawl_section().sources[0], kind="doc", text_css="")
    body = " ".join(["Grind coffee just before brewing so the aroma stays in the cup."] * 4)
    html = (
        f"<html><head><title>Grinding</title></head><body><nav><a href='/'>Home</a> <a "
        f"href='/faq'>FAQ</a></nav>"
        f"<div class='content'><h1>Grinding</h1><p>{body}</p></div><footer>Copyright Bean and "
        f"Burr</footer></body></html>"
    )
    items, lost = crawl.page_items(html, src, 20)
    assert lost == [] and items[0]["title"] == "Grinding"
    assert "Grind coffee just before brewing" in items[0]["text"]
    assert "Copyright" not in items[0]["text"] and "FAQ" not in items[0]["text"]


def test_missing_dataset_column_names_dataset_and_column(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("question,answer,Topic\nWhat is a burr?,A grinding ring.,grinding\n", encoding="utf-8")
    d = CrawlDataset(
        name="faq",
        path=str(path),
        format="csv",
        split="train",
        columns={"instruction": "query", "output": "answer"},
    )
    with pytest.raises(InputError, match=r"crawl.datasets \(faq\): column 'query' \(mapped to instruction\)"):
        crawl.load_datasets([d])
    # an optional column in another case is a misspelt mapping, not a column the file lacks
    d = dataclasses.replace(d, columns={"instruction": "question", "output": "answer", "category": "topic"})
    with pytest.raises(InputError, match=r"column 'topic' \(mapped to category\).*did you mean 'Topic'"):
        crawl.load_datasets([d])
    ok = CrawlDataset(
        name="faq",
        path=str(path),
        format="csv",
        split="train",
        columns={"instruction": "question", "output": "answer"},
    )
    records, rejects = crawl.load_datasets([ok])
    assert [(r["instruction"], r["output"], r["source"]) for r in records] == [
        ("What is a burr?", "A grinding ring.", "dataset:faq")
    ] and rejects == []


# ---------------------------------------------------------------- user-provided dataset files


def jsonl_dataset(tmp_path: Path, text: str | bytes, fmt: str = "jsonl", **columns) -> CrawlDataset:
    path = tmp_path / f"rows.{fmt}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return CrawlDataset(
        name="rows",
        path=str(path),
        format=fmt,
        split="train",
        columns=columns or {"instruction": "instruction", "output": "output"},
    )


def test_a_bad_jsonl_line_is_a_reject_with_file_line_and_the_good_lines_flow_on(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        '{"instruction": "What is crema?", "output": "Foam."}\n'
        '{"instruction": "Trailing comma?", "output": "Yes.",}\n'
        "\n"
        '["not", "an", "object"]\n'
        '{"instruction": "What is a burr?", "output": "A grinding ring."}\n',
    )
    records, rejects = crawl.load_datasets([d])
    assert [r["instruction"] for r in records] == [
        "What is crema?",
        "What is a burr?",
    ]  # row order: shards are cut in it
    assert [(r["url"], r["reason"]) for r in rejects] == [
        (f"{d.path}:2", "bad_json"),
        (f"{d.path}:4", "bad_json"),
    ]
    assert "Expecting property name" in rejects[0]["detail"] and "got list" in rejects[1]["detail"]


def test_a_jsonl_row_with_unicode_line_separators_in_a_string_stays_one_row(tmp_path):
    # U+2028/U+2029 are legal inside a JSON string; str.splitlines cut such a row in two
    # (two bad_json rejects) and shifted the line number of every later reject.
    d = jsonl_dataset(
        tmp_path,
        '{"instruction": "Line one\u2028line two?", "output": "Para\u2029graph."}\r\n'
        '{"instruction": "Broken", "output": }\n'
        '{"instruction": "What is a burr?", "output": "A grinding ring."}\n',
    )
    records, rejects = crawl.load_datasets([d])
    assert sorted(r["instruction"] for r in records) == ["Line one\u2028line two?", "What is a burr?"]
    assert [r["output"] for r in records if "\u2028" in r["instruction"]] == ["Para\u2029graph."]
    assert [(r["url"], r["reason"]) for r in rejects] == [(f"{d.path}:2", "bad_json")]


def test_a_jsonl_file_that_is_not_utf8_fails_naming_file_and_line(tmp_path):
    d = jsonl_dataset(
        tmp_path, b'\xef\xbb\xbf{"instruction": "a b c", "output": "d e f"}\n{"instruction": "caf\xe9"}\n'
    )
    with pytest.raises(InputError, match=rf"{d.path}:2: not UTF-8 text"):
        crawl.load_datasets([d])


def test_an_empty_jsonl_file_fails_saying_it_is_empty(tmp_path):
    d = jsonl_dataset(tmp_path, "\n  \n")
    with pytest.raises(InputError, match=rf"{d.path} is empty"):
        crawl.load_datasets([d])


def test_a_broken_json_file_fails_naming_file_and_line(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n',
        fmt="json",
    )
    with pytest.raises(InputError, match=rf"{d.path}:3: not valid JSON"):
        crawl.load_datasets([d])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_an_empty_file_says_it_is_empty(tmp_path, fmt):
    d = jsonl_dataset(tmp_path, "\n  \n", fmt=fmt)
    with pytest.raises(InputError, match=r"rows\.\w+ is empty"):
        crawl.load_datasets([d])


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        "\ufeffquestion,answer\nWhat is crema?,Foam.\n".encode("utf-8"),
        fmt="csv",
        instruction="question",
        output="answer",
    )
    records, rejects = crawl.load_datasets([d])
    assert [(r["instruction"], r["output"]) for r in records] == [
        ("What is crema?", "Foam.")
    ] and rejects == []
    d = jsonl_dataset(
        tmp_path, '\ufeff{"instruction": "What is crema?", "output": "Foam."}\n'.encode("utf-8")
    )
    assert len(crawl.load_datasets([d])[0]) == 1


def test_wrong_field_types_are_rejected_never_turned_into_strings(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        '{"instruction": "Be nice?", "output": "Yes.", "system": ["be nice"]}\n'
        '{"instruction": "How many?", "output": 42}\n'
        '{"instruction": "Fine?", "output": "Fine.", "system": null}\n',
        instruction="instruction",
        output="output",
        system="system",
    )
    records, rejects = crawl.load_datasets([d])
    assert [r["instruction"] for r in records] == ["Fine?"] and records[0]["system"] == ""
    assert [(r["url"], r["reason"], r["detail"]) for r in rejects] == [
        (f"{d.path}:1", "wrong_type", "system: expected a string, got list"),
        (f"{d.path}:2", "wrong_type", "output: expected a string, got int"),
    ]


def test_a_missing_column_in_another_case_is_suggested(tmp_path):
    d = jsonl_dataset(tmp_path, '{"Instruction": "What is crema?", "output": "Foam."}\n')
    with pytest.raises(
        InputError,
        match=r"column 'instruction' \(mapped to instruction\) is not in .*did you mean 'Instruction'",
    ):
        crawl.load_datasets([d])


def test_hub_datasets_take_config_and_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"q": "What is crema?", "a": "Foam."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = CrawlDataset(
        name="hub",
        path="org/coffee",
        format="hub",
        split="train",
        config="en",
        revision="0123abc",
        columns={"instruction": "q", "output": "a"},
    )
    records, _ = crawl.load_datasets([d])
    assert calls == [("org/coffee", "en", "train", "0123abc")] and len(records) == 1
    section = crawl_section()
    local = CrawlDataset(
        name="f",
        path="f.csv",
        format="csv",
        split="train",
        revision="main",
        columns={"instruction": "q", "output": "a"},
    )
    with pytest.raises(ParamsError, match=r"revision is for format: hub only"):
        dataclasses.replace(section, datasets=[local]).check("crawl")


# ---------------------------------------------------------------- documentation sites (tests/sites)

SITES = ROOT / "tests" / "sites"
# The params a user writes for each generator's markup (docs/crawl.md shows the same).
DOC_SOURCES = {
    "sphinx": {
        "text_css": "div.body",
        "title_css": "h1",
        "heading_levels": [2, 3],
        "questions_end_with": ["?"],
    },
    "mkdocs": {
        "text_css": "article.md-content__inner",
        "title_css": "h1",
        "heading_levels": [2],
        "questions_end_with": ["?"],
    },
    "docbook": {
        "text_css": "div.chapter, div.book",
        "title_css": "h1.title",
        "heading_levels": [2],
        "questions_end_with": ["?"],
        "deny": ["ch03"],
    },
    # a DocBook <qandaset> (ch03): one table row per question and per answer, read with selectors
    "docbook_qanda": {
        "text_css": "div.chapter",
        "title_css": "h1.title",
        "qa_mode": "pairs",
        "question_css": "tr.question > td:last-child",
        "answer_css": "tr.answer > td:last-child",
    },
}
# The fixture site (folder) and first page of each source.
SITE_OF = {
    "sphinx": "sphinx/index.html",
    "mkdocs": "mkdocs/index.html",
    "docbook": "docbook/index.html",
    "docbook_qanda": "docbook/ch03.html",
}
DOC_ANSWERS = {
    "sphinx": {
        "How do I install kettle?": "Install it from PyPI with pip:\n\n```console\n$ python -m pip install "
        "kettle\n```"
        "\n\nPython 3.10 or newer is needed.",
        "Which platforms are supported?": "Kettle runs wherever Python runs. It is tested on:\n\n"
        "- Linux (glibc and musl)\n- macOS 13 and newer\n- Windows 10 and 11",
        "How do I stop waiting for a kettle that never boils?": (
            "Pass a timeout in seconds and catch `TimeoutError`:\n\n```python\nimport kettle\n\n\n"
            "def boil(litres):\n    k = kettle.Kettle(litres)\n    try:\n        return k.boil(timeout=30)\n"
            "    except TimeoutError:\n        if k.temperature < 90:\n            raise\n        return "
            "k\n```\n\n"
            "The kettle is switched off when the timeout passes."
        ),
        "Can I see the temperature while it heats?": (
            "Yes. Iterate over `Kettle.readings()`:\n\n```pycon\n>>> for t in k.readings():\n...     "
            "print(t)\n"
            "...\n21.5\n48.0\n```\n\n| Field | Unit |\n| --- | --- |\n| t | degrees Celsius |"
        ),
    },
    "mkdocs": {
        "How do I change the "
        "port?": "Set `port` in `teapot.yml`:\n\n```yaml\nserver:\n  port: 8418\n  hosts:\n"
        "    - 127.0.0.1\n```\n\nRestart the server afterwards.",
        "How do I run it as a service?": (
            "The steps depend on the system.\n\n### Linux\n\nWrite a systemd unit:\n\n```ini\n[Service]\n"
            "ExecStart=/usr/bin/teapot --config /etc/teapot.yml\nRestart=on-failure\n```\n\n### Docker\n\n"
            "1. Build the image with `make image`.\n2. Run it with `docker run -p 8418:8418 "
            "teapot`.\n\nNote\n\n"
            "The image runs as an unprivileged user."
        ),
        "Which status codes can it return?": (
            "| Code | When |\n| --- | --- |\n| 418 | always |\n| 503 | while the pot refills |\n\n"
            "A Makefile target that checks it, with its tab:\n\n```make\ncheck:\n"
            "\tcurl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8418/\n```"
        ),
    },
    "docbook": {
        "How do I start the daemon at boot?": (
            "Enable the service with your init system. With systemd:\n\n```\n# systemctl enable --now "
            "samovard\n```"
            "\n\nOn systems without systemd, add this line to `/etc/rc.local`:\n\n```\n"
            "if [ -x /usr/sbin/samovard ]; then\n    /usr/sbin/samovard --daemon \\\n"
            "        --pidfile /run/samovard.pid\nfi\n```"
        ),
        "Where does the daemon write its log?": (
            "To syslog, with the facility `daemon`. The most common messages are:\n\n`kettle cold`\n"
            ":   The heating element has failed.\n\n`pot empty`\n:   Refill the water tank."
        ),
        "How do I check a configuration file?": (
            "Run the daemon with `--check`; it reads the file, reports the first error and exits:\n\n```\n"
            "$ samovard --check /etc/samovar.conf\n/etc/samovar.conf:12: unknown key 'temprature'\n"
            "    did you mean 'temperature'?\n```\n\n### Note\n\nThe check never starts the heater."
        ),
    },
    "docbook_qanda": {
        "How much memory does the daemon "
        "use?": "About 4 MB per hundred users. Measure it on your host with:\n\n"
        "```\n$ ps -o rss= -C samovard\n  4096\n```",
        "Can I reload the configuration without a "
        "restart?": "Yes: send it `SIGHUP`.\n\nUsers who are brewing keep "
        "their old settings until the brew ends.",
    },
}
# Text of the generators' page furniture: none of it may reach an item.
FURNITURE = [
    "¶",
    "Table of Contents",
    "Table of contents",
    "Edit this page",
    "Created using Sphinx",
    "Made with Material",
    "Navigation",
    "Next FAQ",
    "Previous Home",
    "Last update",
    "Prev",
    "—",
]


@pytest.fixture(scope="module")
def docs_crawl(tmp_path_factory):
    """One crawl of the three fixture sites, served from tests/sites on 127.0.0.1."""
    work = tmp_path_factory.mktemp("docs")
    with crawl.serve_directory(SITES) as url:
        sources = [
            source(
                name,
                [url + SITE_OF[name]],
                allow=["/" + SITE_OF[name].split("/")[0] + "/"],
                kind="auto",
                **({"qa_mode": "headings", "question_css": "", "answer_css": ""} | cfg),
            )
            for name, cfg in DOC_SOURCES.items()
        ]
        proc = run_stage(work, crawl_params(sources))
    assert proc.returncode == 0, proc.stderr[-3000:]
    items, rejects, metrics = outputs(work)
    return items, rejects, metrics, url


def page_code_blocks(site: str) -> list[str]:
    """The text of every <pre> on a fixture site's pages, read with lxml as a browser shows it."""
    from lxml import html as lxml_html

    return [
        pre.text_content().strip("\n")
        for page_file in sorted((SITES / site).glob("*.html"))
        for pre in lxml_html.fromstring(page_file.read_bytes()).iter("pre")
    ]


@pytest.mark.parametrize("style", list(DOC_SOURCES))
def test_doc_site_answers_are_complete(docs_crawl, style):
    items, _, metrics, _ = docs_crawl
    mine = [i for i in items if i["source"] == style]
    assert {i["question"]: i["answer"] for i in mine if i["kind"] == "qa"} == DOC_ANSWERS[style]
    assert metrics["sources"][style]["items"] == len(mine)


@pytest.mark.parametrize("site", ["sphinx", "mkdocs", "docbook"])
def test_doc_site_code_blocks_are_byte_for_byte(docs_crawl, site):
    items, _, _, url = docs_crawl
    texts = [i.get("answer", i.get("text", "")) for i in items if i["url"].startswith(f"{url}{site}/")]
    codes = page_code_blocks(site)
    missing = [code for code in codes if not any(f"\n{code}\n```" in t for t in texts)]
    assert len(codes) >= 3 and missing == []  # indentation, tabs and blank lines as on the page


def test_doc_sites_carry_no_page_furniture(docs_crawl):
    items, _, _, _ = docs_crawl
    for item in items:
        for field_ in ("question", "answer", "title", "text"):
            for junk in FURNITURE:
                assert junk not in item.get(field_, ""), (item["url"], field_, junk)
            assert "---" not in item.get(field_, "").split("\n")  # a title page's rule (<hr>)


def test_doc_sites_lose_no_question_answer_or_prose(docs_crawl):
    _, rejects, metrics, url = docs_crawl
    assert sorted((r["reason"], r["url"].removeprefix(url)) for r in rejects) == [
        ("duplicate", "mkdocs/index.html"),  # the same page as mkdocs/ (its logo links to ".")
        ("http_404", "sphinx/genindex.html"),
        (
            "no_content",
            "docbook/index.html",
        ),  # linked from ch03, which docbook_qanda starts at: no qandaset there
    ]
    assert metrics["parse_errors"] == 0


def test_prose_outside_the_faq_is_kept_as_a_document(docs_crawl):
    items, _, _, url = docs_crawl
    doc = next(i for i in items if i["url"] == f"{url}sphinx/faq.html" and i["kind"] == "doc")
    assert doc["title"] == "Frequently asked questions"
    assert doc["text"] == (
        "These are the questions new users of kettle ask most often.\n\n## 1. Installation\n\n"
        "## 2. Usage\n\nEverything here assumes `import kettle` at the top of the module."
    )
    tutorial = next(i for i in items if i["url"] == f"{url}sphinx/tutorial.html")
    assert "```python\nclass Timer:\n    def __enter__(self):\n" in tutorial["text"]


def test_an_answer_element_that_holds_its_question_pairs_with_it():
    src = dataclasses.replace(
        crawl_section().sources[0], question_css="section.qa h3", answer_css="section.qa", text_css="article"
    )
    html = (
        '<article><h1>FAQ</h1><section class="qa"><h3>First?</h3><p>One.</p><p>More one.</p></section>'
        '<section class="qa"><h3>Second?</h3><p>Two.</p></section></article>'
    )
    items, lost = crawl.page_items(html, src, 0)
    assert sorted((i["question"], i["answer"]) for i in items) == [
        ("First?", "One.\n\nMore one."),
        ("Second?", "Two."),
    ]
    assert lost == []
    broad = dataclasses.replace(src, answer_css="article")  # holds both questions: which is its own?
    items, lost = crawl.page_items(html, broad, 0)
    assert items == [] and [r for r, _ in lost] == ["qa_nested"]


def test_prose_beside_selector_qa_is_a_document_with_kind_auto_and_a_reject_with_kind_qa():
    src = dataclasses.replace(crawl_section().sources[0], question_css=".question", answer_css=".answer")
    html = (
        "<article><h1>FAQ</h1><p>We answer within a day.</p>"
        '<div class="qa"><h2 class="question">Why?</h2><div class="answer">Because.</div></div></article>'
    )
    items, lost = crawl.page_items(html, src, 5)
    assert [(i["kind"], i.get("text", i.get("answer"))) for i in items] == [
        ("qa", "Because."),
        ("doc", "We answer within a day."),
    ]
    items, lost = crawl.page_items(html, dataclasses.replace(src, kind="qa"), 5)
    assert [i["kind"] for i in items] == ["qa"] and [r for r, _ in lost] == ["prose_outside_qa"]


def test_exclude_css_and_builtin_exclusions():
    src = dataclasses.replace(crawl_section().sources[0], kind="doc", exclude_css=[".cookie-banner"])
    html = (
        '<article><h1>T</h1><div class="cookie-banner">We use cookies.</div>'
        '<h2>Part<a class="headerlink" href="#p">¶</a></h2><p>Body text.</p></article>'
    )
    items, _ = crawl.page_items(html, src, 0)
    assert items[0]["text"] == "## Part\n\nBody text."
    items, _ = crawl.page_items(html, dataclasses.replace(src, exclude_css=[], builtin_excludes=False), 0)
    assert items[0]["text"] == "We use cookies.\n\n## Part¶\n\nBody text."


def test_headings_mode_answer_runs_to_the_next_heading_of_its_level():
    src = dataclasses.replace(
        crawl_section().sources[0], qa_mode="headings", heading_levels=[2], text_css="main"
    )
    html = (
        "<main><h2>Install</h2><p>Run pip.</p><h3>On Windows</h3><p>Use py.</p>"
        "<h2>Upgrade</h2><p>Run pip -U.</p><h2>Empty</h2></main>"
    )
    items, lost = crawl.page_items(html, src, 0)
    assert [(i["question"], i["answer"]) for i in items] == [
        ("Install", "Run pip.\n\n### On Windows\n\nUse py."),
        ("Upgrade", "Run pip -U."),
    ]
    assert [r for r, _ in lost] == ["qa_empty"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("heading_levels", [0, 2], r"heading_levels is \[0, 2\]"),
        ("exclude_css", ["div[[x"], r"exclude_css\[0\] 'div\[\[x' is not a CSS selector"),
        ("question_css", "xpath://dt/text()", "selects text or attributes, not elements"),
    ],
)
def test_new_source_keys_are_checked(key, value, message):
    with pytest.raises(ParamsError, match=message):
        crawl_section(qa_mode="headings", **{key: value}).check("crawl")


def test_unknown_source_key_is_still_refused():
    data = repo_params()
    data["crawl"]["sources"][0]["qa_mdoe"] = "headings"
    with pytest.raises(ParamsError, match=r"crawl.sources\[0\].qa_mdoe is not a known key"):
        params.section("crawl", data)
    del data["crawl"]["sources"][0]["qa_mdoe"], data["crawl"]["sources"][0]["qa_mode"]
    assert params.section("crawl", data).sources[0].qa_mode == "pairs"  # the default


def parse_error_site(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "index.html").write_text('<a href="a.html">a</a> <a href="b.html">b</a>', encoding="utf-8")
    # `//dt/@id | //dt` picks an attribute where a <dt> has an id: that page raises while parsing
    (root / "a.html").write_text('<dl><dt id="q1">Why?</dt><dd>Because.</dd></dl>', encoding="utf-8")
    (root / "b.html").write_text("<dl><dt>How?</dt><dd>Like this.</dd></dl>", encoding="utf-8")


@pytest.mark.parametrize("fraction, code", [(0.5, 0), (0.1, 1)])
def test_a_page_that_raises_is_a_reject_and_too_many_fail_the_stage(tmp_path, fraction, code):
    parse_error_site(tmp_path / "site")
    with crawl.serve_directory(tmp_path / "site") as url:
        src = source(
            "err",
            [f"{url}index.html"],
            kind="qa",
            question_css="xpath://dt/@id | //dt",
            answer_css="xpath://dd",
        )
        proc = run_stage(tmp_path / "work", crawl_params([src], max_parse_error_fraction=fraction))
    assert proc.returncode == code, proc.stderr[-3000:]
    items, rejects, metrics = outputs(tmp_path / "work")
    errors = [r for r in rejects if r["reason"] == "parse_error"]
    assert [r["url"] for r in errors] == [f"{url}a.html"] and errors[0]["detail"].startswith(
        "AttributeError: "
    )
    assert [i["question"] for i in items] == ["How?"] and metrics["parse_errors"] == 1
    if code:
        assert "1 of 3 pages raised while parsing" in proc.stderr and f"{url}a.html" in proc.stderr


def test_invalid_unicode_in_a_row_is_a_reject_naming_line_and_field(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        '{"instruction": "What is \\ud800?", "output": "Foam."}\n'
        '{"instruction": "Bell?", "output": "Ring\\u0007."}\n'
        '{"instruction": "Tabs?", "output": "a\\tb\\nc"}\n',
    )
    records, rejects = crawl.load_datasets([d])
    assert [r["instruction"] for r in records] == ["Tabs?"]
    assert [(r["url"], r["reason"], r["detail"]) for r in rejects] == [
        (f"{d.path}:1", "bad_unicode", "instruction: lone surrogate U+D800 at character 8"),
        (f"{d.path}:2", "bad_unicode", "output: control character U+0007 at character 4"),
    ]


def test_a_surrogate_row_does_not_crash_the_stage(tmp_path):
    ds = tmp_path / "data" / "rows.jsonl"
    ds.parent.mkdir(parents=True)
    ds.write_text('{"q": "Fine?", "a": "Yes."}\n{"q": "Bad \\udfff?", "a": "No."}\n', encoding="utf-8")
    datasets = [
        {
            "name": "rows",
            "path": "data/rows.jsonl",
            "format": "jsonl",
            "split": "train",
            "columns": {"instruction": "q", "output": "a"},
        }
    ]
    with crawl.serve_directory(SITES / "mkdocs") as url:
        proc = run_stage(tmp_path, crawl_params([source("m", [f"{url}index.html"])], datasets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, rejects, metrics = outputs(tmp_path)
    assert [(r["url"], r["reason"]) for r in rejects if r["source"] == "dataset:rows"] == [
        ("data/rows.jsonl:2", "bad_unicode")
    ]
    assert metrics["dataset_records"] == 1


def test_an_optional_column_a_file_lacks_is_empty_and_a_wrong_case_key_is_named(tmp_path):
    d = jsonl_dataset(
        tmp_path,
        '{"instruction": "What is crema?", "output": "Foam."}\n'
        '{"Instruction": "What is a burr?", "output": "A ring."}\n',
        instruction="instruction",
        output="output",
        system="system",
        history="history",
    )
    records, rejects = crawl.load_datasets([d])
    assert [(r["instruction"], r["system"], r["history"]) for r in records] == [("What is crema?", "", [])]
    assert [(r["reason"], "the row has 'Instruction'" in r["detail"]) for r in rejects] == [
        ("empty_field", True)
    ]


def test_the_sphinx_example_in_docs_crawl_md_loads_and_passes_the_checks():
    import re

    block = re.search(
        r"```yaml\n(.*?)```", (ROOT / "docs" / "crawl.md").read_text(encoding="utf-8"), re.DOTALL
    ).group(1)
    data = repo_params()
    data["crawl"]["sources"] = yaml.safe_load(block)["crawl"]["sources"]
    p = params.section("crawl", data)
    p.check("crawl")
    assert p.sources[0].qa_mode == "headings" and p.sources[0].text_css == DOC_SOURCES["sphinx"]["text_css"]


def test_code_blocks_of_docusaurus_and_github_and_fences_inside_code():
    src = dataclasses.replace(crawl_section().sources[0], kind="doc", exclude_css=["xpath://div[@id='ad']"])
    html = (
        '<article><h1>T</h1><div id="ad">Buy now.</div><p>Docusaurus:</p>'
        '<div class="language-js theme-code-block"><pre class="prism-code language-js"><code>'
        '<span class="token-line">if (x) {<br></span><span class="token-line">  go();<br></span>'
        '<span class="token-line">}</span></code></pre></div>'
        '<p>GitHub:</p><div class="highlight highlight-source-shell"><pre>ls -l\n  | sort</pre></div>'
        '<p>A fence in code:</p><pre><code class="language-markdown">```python\nx = '
        "1\n```</code></pre></article>"
    )
    items, _ = crawl.page_items(html, src, 0)
    assert items[0]["text"] == (
        "Docusaurus:\n\n```js\nif (x) {\n  go();\n}\n```\n\nGitHub:\n\n```shell\nls -l\n  | sort\n```"
        "\n\nA fence in code:\n\n````markdown\n```python\nx = 1\n```\n````"
    )


def test_the_shipped_params_write_the_new_keys_with_their_defaults():
    """params.yaml is where users read the defaults: the dataclass defaults must not drift from it."""
    shipped = repo_params()["crawl"]
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(params.CrawlSource)
        if f.init and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    }
    assert set(defaults) == {
        "qa_mode",
        "heading_levels",
        "questions_end_with",
        "exclude_css",
        "builtin_excludes",
        "allow_empty",
    }
    assert {k: shipped["sources"][0][k] for k in defaults} == defaults
    assert (
        shipped["max_parse_error_fraction"]
        == params.Crawl.__dataclass_fields__["max_parse_error_fraction"].default
    )


def test_without_text_selector_a_page_of_links_and_a_cookie_banner_are_not_text():
    src = dataclasses.replace(crawl_section().sources[0], kind="doc", text_css="")
    links = "".join(
        f'<li><a href="/a{i}.html">Article number {i} about coffee brewing</a></li>' for i in range(8)
    )
    html = f"<html><body><div class='content'><h1>All articles</h1><ul>{links}</ul></div></body></html>"
    assert crawl.page_items(html, src, 40) == (
        [],
        [("navigation_only", "0 characters outside links, fewer than crawl.min_doc_chars 40")],
    )
    body = " ".join(["Grind coffee just before brewing so the aroma stays in the cup."] * 4)
    html = (
        f"<html><body><div id='cookie-banner'>We use cookies to improve your experience. Accept all cookies."
        f"</div><div class='content'><h1>Grinding</h1><p>{body}</p></div></body></html>"
    )
    items, _ = crawl.page_items(html, src, 40)
    assert items[0]["text"] == body


def test_a_source_that_gives_no_record_fails_unless_allowed_empty(tmp_path):
    dead = source("dead", ["http://127.0.0.1:9/index.html"])  # port 9: nothing listens
    proc = run_stage(tmp_path / "a", crawl_params([dead]))
    assert proc.returncode == 2
    assert "crawl.sources[0] (dead) gave no record: 0 pages fetched" in proc.stderr
    assert "or set crawl.sources[0].allow_empty: true" in proc.stderr
    assert (tmp_path / "a" / "data/raw/crawl_rejects.jsonl").exists()  # written first: it says why
    proc = run_stage(tmp_path / "b", crawl_params([{**dead, "allow_empty": True}]))
    assert proc.returncode == 0, proc.stderr[-3000:]


def cache_objects(repo: Path) -> dict[str, int]:
    """The DVC cache's objects (md5 -> bytes); a directory's listing ends in .dir."""
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {f.parent.name + f.name: f.stat().st_size for f in root.glob("*/*")}


def test_rows_appended_to_a_dataset_store_only_the_shards_they_touch_in_the_dvc_cache(tmp_path):
    from tests.pipeline_repo import make_repo, repro, set_param

    repo = make_repo(tmp_path / "repo")
    rows = repo / "data/datasets/rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"q": f"How do I brew cup {i}?", "a": f"Pour {i} grams slowly."}) + "\n"
            for i in range(3000)
        )
    )
    set_param(repo, "base.shard_records", 100)
    set_param(repo, "crawl.sources", [])
    set_param(repo, "crawl.serve_site", False)
    set_param(
        repo,
        "crawl.datasets",
        [
            {
                "name": "rows",
                "path": "data/datasets/rows.jsonl",
                "format": "jsonl",
                "split": "train",
                "columns": {"instruction": "q", "output": "a"},
            }
        ],
    )
    assert "crawl" in repro(repo, "crawl")["ran"]
    shards = repo / "data/raw/datasets"
    before_files = {p.name: p.read_bytes() for p in sorted(shards.iterdir())}
    before = cache_objects(repo)
    assert len(before_files) > 15 and set(before) >= {
        hashlib.md5(b).hexdigest() for b in before_files.values()
    }

    with open(rows, "a", encoding="utf-8") as f:  # 1% new rows at the end
        f.write(
            "".join(
                json.dumps({"q": f"What about cup {i}?", "a": f"Stir {i} times."}) + "\n" for i in range(30)
            )
        )
    assert "crawl" in repro(repo, "crawl")["ran"]
    after_files = {p.name: p.read_bytes() for p in sorted(shards.iterdir())}
    added = {md5: size for md5, size in cache_objects(repo).items() if md5 not in before}
    new_shards = [name for name, blob in after_files.items() if blob not in before_files.values()]
    # the last shard took the new rows (or they made one more): every other shard is the same bytes, and the
    # cache holds only the rewritten shards and the directory's new listing
    assert 1 <= len(new_shards) <= 2 and new_shards[-1] == max(after_files)
    assert set(added) == {hashlib.md5(after_files[n]).hexdigest() for n in new_shards} | {
        md5 for md5 in added if md5.endswith(".dir")
    }
    total = sum(len(b) for b in after_files.values())
    assert sum(size for md5, size in added.items() if not md5.endswith(".dir")) < 0.15 * total
    assert len(read_jsonl_dir(shards)) == 3030
