"""Tests of tuneline/crawl.py and stages/crawl.py.

The crawl tests run the real stage (`python -m stages.crawl`, in a subprocess: scrapy's reactor
runs once per process) against a real HTTP server on 127.0.0.1 started here, which counts the
requests it receives, so limits, robots.txt and the HTTP cache are checked server-side.
"""

from __future__ import annotations

import copy
import dataclasses
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

from tuneline import crawl, params
from tuneline.params import CrawlDataset, ParamsError
from tuneline.records import InputError, read_jsonl

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
    "/faq.html", "/article.html", "/article-copy.html", "/private/secret.html", "/missing.html",
    "/slow.html", "/data", "/flaky.html", "/loop-a", "/big.html", "/big-stream.html", "/badenc.html",
    "/deep1.html", "/qa-gap.html", "/links.html", "/gbk.html", "OFFSITE",
]
GBK_TEXT = "手冲咖啡的水温应该是多少？一般在九十到九十六度之间，刚离火的开水最合适。"

STATIC = {
    "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private/\n"),
    "/faq.html": (200, "text/html", page("FAQ", """
        <div class="qa" data-category="grinding"><h2 class="question">Why grind fresh?</h2>
          <div class="answer"><p>Ground coffee loses aroma <b>within minutes</b>.</p></div></div>
        <div class="qa" data-category="beans"><h2 class="question">Where to store beans?</h2>
          <div class="answer">In an airtight tin, away from light.</div></div>
        <div class="qa"><h2 class="question">Do you ship abroad?</h2><div class="answer">Yes, within the EU.</div></div>
    """)),
    "/article.html": (200, "text/html", article("Descaling", "Limescale slows heating.", "Use citric acid.")),
    "/article-copy.html": (200, "text/html", article("Descaling", "Limescale slows heating.", "Use citric acid.")),
    "/private/secret.html": (200, "text/html", article("Secret", "Do not crawl.")),
    "/offsite.html": (200, "text/html", article("Offsite", "Another host.")),
    "/data": (200, "application/json", b'{"not": "html"}'),
    "/big.html": (200, "text/html", article("Big", "x" * 50_000)),
    "/badenc.html": (200, "text/html; charset=utf-8",
                     b"<html><body><article><h1>Bad</h1><p>caf\xe9 \xff\xfe</p></article></body></html>"),
    # Q&A pairs where the second question lost its answer: the other two must still pair up
    "/qa-gap.html": (200, "text/html", page("Gaps", """
        <div class="qa"><h2 class="question">What is crema?</h2><div class="answer">The foam on an espresso.</div></div>
        <div class="qa"><h2 class="question">Is this answered?</h2></div>
        <div class="qa"><h2 class="question">What is a burr?</h2><div class="answer">A grinding ring.</div></div>
    """)),
    # an index of links inside the article: navigation, not a document
    "/links.html": (200, "text/html", page("Links", '<article><h1>All articles</h1><ul>'
                    + "".join(f'<li><a href="/article.html">Article number {i} about coffee</a></li>' for i in range(8))
                    + "</ul></article>")),
    # no charset anywhere: the encoding must be detected, not assumed
    "/gbk.html": (200, "text/html", f"<html><body><article><h1>水温</h1><p>{GBK_TEXT}</p></article></body></html>".encode("gbk")),
    # depth_limit 1: c is first found too deep (s1 -> a -> c), then at depth 1 from the slow s2
    "/depth/s1.html": (200, "text/html", article("Start one", "The first start page.", links=("/depth/a.html",))),
    "/depth/a.html": (200, "text/html", article("Page a", "Linked from start one.", links=("/depth/c.html",))),
    "/depth/c.html": (200, "text/html", article("Page c", "Reachable at depth one.")),
    "/deep1.html": (200, "text/html", article("Deep one", "Level one.", links=("/deep2.html",))),
    "/deep2.html": (200, "text/html", article("Deep two", "Level two.", links=("/deep3.html",))),
    "/deep3.html": (200, "text/html", article("Deep three", "Level three.")),
    # page-limit source: 30 pages that all link to each other
    **{f"/many/{i}.html": (200, "text/html", article(f"Many {i}", f"Page number {i}.",
                                                  links=tuple(f"/many/{j}.html" for j in range(30))))
       for i in range(30)},
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
            links = [u.replace("OFFSITE", f"http://localhost:{self.server.server_address[1]}/offsite.html")
                     for u in INDEX_LINKS]
            return self.send(200, "text/html", page("Home", "".join(f'<a href="{u}">{u}</a>' for u in links)))
        if path == "/flaky.html":  # 503 once, then the page: a retry must fetch it
            if hits == 1:
                return self.send(503, "text/html", b"busy")
            return self.send(200, "text/html", article("Flaky", "Second time lucky."))
        if path == "/depth/s2.html":
            time.sleep(0.3)  # under the tests' download_timeout of 0.5 s
            return self.send(200, "text/html", article("Start two", "The slow start page.", links=("/depth/c.html",)))
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
    p.update(serve_site=False, sources=sources, datasets=datasets or [], retry_times=1,
             download_timeout=0.5, max_page_bytes=20_000, autothrottle_start_delay_s=0.0, min_doc_chars=5, **overrides)
    return {"base": data["base"], "crawl": p}


def run_stage(workdir: Path, params_data: dict) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params_data, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.crawl"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)


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
    datasets = [{"name": "extra", "path": "data/extra.jsonl", "format": "jsonl", "split": "train",
                 "columns": {"instruction": "q", "output": "a", "category": "topic"}}]
    sources = [
        source("main", [f"{base_url}/index.html"], depth_limit=2),
        source("many", [f"{base_url}/many/0.html"], max_pages=5, allow=["/many/"]),
        source("clean", [f"{base_url}/clean/a.html"], allow=["/clean/"]),
        source("depth", [f"{base_url}/depth/s1.html", f"{base_url}/depth/s2.html"], allow=["/depth/"],
               depth_limit=1, max_pages=4),
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
        ("Why grind fresh?", "Ground coffee loses aroma within minutes.", "grinding"),
    ]
    doc = next(i for i in items if i["url"] == f"{base_url}/article.html")
    assert doc["kind"] == "doc" and doc["title"] == "Descaling" and doc["category"] == "brewing"
    assert doc["text"] == "Limescale slows heating.\nUse citric acid."  # no nav, footer or heading
    for item in items:
        assert set(item) >= {"url", "source", "kind", "content_hash"}
        assert "fetched_at" not in item  # run times go to metrics: two runs of the same pages write the same bytes


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
    src = replace(crawl_section().sources[0], question_css="xpath://dt", answer_css="xpath://dd",
                  title_css="xpath://h1")
    html = "<html><body><h1>FAQ</h1><dl><dt>What is crema?</dt><dd>Foam.</dd><dt>Burr?</dt><dd>A ring.</dd></dl></body></html>"
    items, lost = crawl.page_items(html, src, 0)
    assert [(i["question"], i["answer"]) for i in items] == [("What is crema?", "Foam."), ("Burr?", "A ring.")] and lost == []
    with pytest.raises(ParamsError, match=r"question_css 'xpath://dt\[' is not an XPath expression"):
        crawl.check_params(crawl_section(question_css="xpath://dt["))


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
    records = read_jsonl(work / "data/raw/datasets.jsonl")
    assert [(r["instruction"], r["output"], r["category"], r["source"]) for r in records] == [
        ("What is crema?", "The foam on top of an espresso.", "brewing", "dataset:extra")]
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
    proc = run_stage(work, repo_params() | {"crawl": {**repo_params()["crawl"], "autothrottle_start_delay_s": 0.0}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    items, rejects, metrics = outputs(work)
    assert metrics["items_by_kind"]["qa"] >= 20 and metrics["items_by_kind"]["doc"] >= 10
    assert all(i["url"].startswith("data/site/") for i in items)
    assert not any("/private/" in i["url"] for i in items)
    assert {r["url"] for r in rejects if r["reason"] == "robots_txt"} == {
        "data/site/private/staff-notes.html", "data/site/private/supplier-prices.html"}
    assert metrics["dataset_records"] == 30
    assert items == sorted(items, key=lambda i: (i["url"], i["kind"], i.get("question", i.get("title")),
                                                 i.get("answer", i.get("text"))))


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


@pytest.mark.parametrize("overrides, key", [
    ({"answer_css": "div[[x"}, "crawl.sources[0] (bundled).answer_css"),
    ({"allow": ["(unclosed"]}, "crawl.sources[0] (bundled).allow"),
    ({"max_pages": 0}, "crawl.sources[0] (bundled).max_pages"),
    ({"allowed_domains": []}, "crawl.sources[0] (bundled).allowed_domains"),
    ({"start_urls": ["ftp://example.org/"]}, "crawl.sources[0] (bundled).start_urls"),
])
def test_check_params_names_source_and_key(overrides, key):
    with pytest.raises(ParamsError, match=key.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        crawl.check_params(crawl_section(**overrides))


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
    html = '<div class="qa"><p class="question">Q1</p><p class="answer">A1</p><p class="question">Q2</p></div>'
    assert crawl.page_items(html, src, 0) == ([{"kind": "qa", "question": "Q1", "answer": "A1"}],
                                              [("qa_mismatch", "question 'Q2' has no answer after it")])
    html = '<div class="qa"><p class="answer">A0</p><p class="question">Q1</p><p class="answer">A1</p></div>'
    assert crawl.page_items(html, src, 0) == ([{"kind": "qa", "question": "Q1", "answer": "A1"}],
                                              [("qa_mismatch", "answer 'A0' follows no question")])
    items, lost = crawl.page_items("<html><body><p>menu</p></body></html>", src, 0)
    assert items == [] and [r for r, _ in lost] == ["no_content"]
    from dataclasses import replace
    items, lost = crawl.page_items("<h1>T</h1><article><p>a</p><nav>skip</nav><p>b <i>c</i></p></article>",
                                   replace(src, kind="doc"), 0)
    assert lost == [] and items == [{"kind": "doc", "title": "T", "text": "a\nb c"}]
    html = '<div class="qa"><p class="question">Q1</p><p class="answer">A1</p><p class="question"> </p><p class="answer">A2</p></div>'
    items, lost = crawl.page_items(html, src, 0)
    assert items == [{"kind": "qa", "question": "Q1", "answer": "A1"}] and [r for r, _ in lost] == ["qa_empty"]


def test_trafilatura_strips_boilerplate_without_text_selector():
    from dataclasses import replace
    src = replace(crawl_section().sources[0], kind="doc", text_css="")
    body = " ".join(["Grind coffee just before brewing so the aroma stays in the cup."] * 4)
    html = (f"<html><head><title>Grinding</title></head><body><nav><a href='/'>Home</a> <a href='/faq'>FAQ</a></nav>"
            f"<div class='content'><h1>Grinding</h1><p>{body}</p></div><footer>Copyright Bean and Burr</footer></body></html>")
    items, lost = crawl.page_items(html, src, 20)
    assert lost == [] and items[0]["title"] == "Grinding"
    assert "Grind coffee just before brewing" in items[0]["text"]
    assert "Copyright" not in items[0]["text"] and "FAQ" not in items[0]["text"]


def test_missing_dataset_column_names_dataset_and_column(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("question,answer\nWhat is a burr?,A grinding ring.\n", encoding="utf-8")
    d = CrawlDataset(name="faq", path=str(path), format="csv", split="train",
                     columns={"instruction": "question", "output": "answer", "category": "topic"})
    with pytest.raises(InputError, match=r"crawl.datasets \(faq\): column 'topic' \(mapped to category\)"):
        crawl.load_datasets([d])
    ok = CrawlDataset(name="faq", path=str(path), format="csv", split="train",
                      columns={"instruction": "question", "output": "answer"})
    records, rejects = crawl.load_datasets([ok])
    assert [(r["instruction"], r["output"], r["source"]) for r in records] == [
        ("What is a burr?", "A grinding ring.", "dataset:faq")] and rejects == []


# ---------------------------------------------------------------- user-provided dataset files


def jsonl_dataset(tmp_path: Path, text: str | bytes, fmt: str = "jsonl", **columns) -> CrawlDataset:
    path = tmp_path / f"rows.{fmt}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return CrawlDataset(name="rows", path=str(path), format=fmt, split="train",
                        columns=columns or {"instruction": "instruction", "output": "output"})


def test_a_bad_jsonl_line_is_a_reject_with_file_line_and_the_good_lines_flow_on(tmp_path):
    d = jsonl_dataset(tmp_path, '{"instruction": "What is crema?", "output": "Foam."}\n'
                                '{"instruction": "Trailing comma?", "output": "Yes.",}\n'
                                '\n'
                                '["not", "an", "object"]\n'
                                '{"instruction": "What is a burr?", "output": "A grinding ring."}\n')
    records, rejects = crawl.load_datasets([d])
    assert [r["instruction"] for r in records] == ["What is a burr?", "What is crema?"]
    assert [(r["url"], r["reason"]) for r in rejects] == [(f"{d.path}:2", "bad_json"), (f"{d.path}:4", "bad_json")]
    assert "Expecting property name" in rejects[0]["detail"] and "got list" in rejects[1]["detail"]


def test_a_jsonl_row_with_unicode_line_separators_in_a_string_stays_one_row(tmp_path):
    # U+2028/U+2029 are legal inside a JSON string; str.splitlines cut such a row in two
    # (two bad_json rejects) and shifted the line number of every later reject.
    d = jsonl_dataset(tmp_path, '{"instruction": "Line one\u2028line two?", "output": "Para\u2029graph."}\r\n'
                                '{"instruction": "Broken", "output": }\n'
                                '{"instruction": "What is a burr?", "output": "A grinding ring."}\n')
    records, rejects = crawl.load_datasets([d])
    assert sorted(r["instruction"] for r in records) == ["Line one\u2028line two?", "What is a burr?"]
    assert [r["output"] for r in records if "\u2028" in r["instruction"]] == ["Para\u2029graph."]
    assert [(r["url"], r["reason"]) for r in rejects] == [(f"{d.path}:2", "bad_json")]


def test_a_jsonl_file_that_is_not_utf8_fails_naming_file_and_line(tmp_path):
    d = jsonl_dataset(tmp_path, b'\xef\xbb\xbf{"instruction": "a b c", "output": "d e f"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"{d.path}:2: not UTF-8 text"):
        crawl.load_datasets([d])


def test_an_empty_jsonl_file_fails_saying_it_is_empty(tmp_path):
    d = jsonl_dataset(tmp_path, "\n  \n")
    with pytest.raises(InputError, match=rf"{d.path} is empty"):
        crawl.load_datasets([d])


def test_a_broken_json_file_fails_naming_file_and_line(tmp_path):
    d = jsonl_dataset(tmp_path, '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n', fmt="json")
    with pytest.raises(InputError, match=rf"{d.path}:3: not valid JSON"):
        crawl.load_datasets([d])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_an_empty_file_says_it_is_empty(tmp_path, fmt):
    d = jsonl_dataset(tmp_path, "\n  \n", fmt=fmt)
    with pytest.raises(InputError, match=r"rows\.\w+ is empty"):
        crawl.load_datasets([d])


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    d = jsonl_dataset(tmp_path, "\ufeffquestion,answer\nWhat is crema?,Foam.\n".encode("utf-8"), fmt="csv",
                      instruction="question", output="answer")
    records, rejects = crawl.load_datasets([d])
    assert [(r["instruction"], r["output"]) for r in records] == [("What is crema?", "Foam.")] and rejects == []
    d = jsonl_dataset(tmp_path, '\ufeff{"instruction": "What is crema?", "output": "Foam."}\n'.encode("utf-8"))
    assert len(crawl.load_datasets([d])[0]) == 1


def test_wrong_field_types_are_rejected_never_turned_into_strings(tmp_path):
    d = jsonl_dataset(tmp_path, '{"instruction": "Be nice?", "output": "Yes.", "system": ["be nice"]}\n'
                                '{"instruction": "How many?", "output": 42}\n'
                                '{"instruction": "Fine?", "output": "Fine.", "system": null}\n',
                      instruction="instruction", output="output", system="system")
    records, rejects = crawl.load_datasets([d])
    assert [r["instruction"] for r in records] == ["Fine?"] and records[0]["system"] == ""
    assert [(r["url"], r["reason"], r["detail"]) for r in rejects] == [
        (f"{d.path}:1", "wrong_type", "system: expected a string, got list"),
        (f"{d.path}:2", "wrong_type", "output: expected a string, got int"),
    ]


def test_a_missing_column_in_another_case_is_suggested(tmp_path):
    d = jsonl_dataset(tmp_path, '{"Instruction": "What is crema?", "output": "Foam."}\n')
    with pytest.raises(InputError, match=r"column 'instruction' \(mapped to instruction\) is not in .*did you mean 'Instruction'"):
        crawl.load_datasets([d])


def test_hub_datasets_take_config_and_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"q": "What is crema?", "a": "Foam."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = CrawlDataset(name="hub", path="org/coffee", format="hub", split="train", config="en",
                     revision="0123abc", columns={"instruction": "q", "output": "a"})
    records, _ = crawl.load_datasets([d])
    assert calls == [("org/coffee", "en", "train", "0123abc")] and len(records) == 1
    section = crawl_section()
    local = CrawlDataset(name="f", path="f.csv", format="csv", split="train", revision="main",
                         columns={"instruction": "q", "output": "a"})
    with pytest.raises(ParamsError, match=r"revision is for format: hub only"):
        crawl.check_params(dataclasses.replace(section, datasets=[local]))
