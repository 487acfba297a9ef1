"""Bench the crawl stage: pages/s against a loopback static site, and the cached rerun.

Builds a static site of 1 index + 40 section pages + 1,200 leaf pages (half FAQ, half articles)
in a temporary folder, serves it on 127.0.0.1, and runs `python -m stages.crawl` on it twice
with AutoThrottle off: a cold crawl, then a rerun served from the HTTP cache (requests counted at
the server). Baseline in the same run: fetching the same pages one by one with urllib (no
parsing), the simplest crawler one could write. Target: >= 100 pages/s cold.

Run:  .venv/bin/python bench/crawl.py   (writes bench/results/crawl.json)
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTIONS, LEAVES_PER_SECTION = 40, 30
TARGET_PAGES_PER_S = 100.0


def build_site(root: Path) -> list[str]:
    """Write the site; return the paths of all pages."""
    nav = '<nav><a href="/index.html">Home</a></nav>'
    footer = "<footer>Bean &amp; Burr bench site</footer>"
    paths = ["/index.html"]

    def write(path: str, title: str, body: str) -> None:
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(
            f"<html><head><title>{title}</title></head><body>{nav}<main>{body}</main>{footer}</body></html>",
            encoding="utf-8",
        )

    sections = [f"/s{s}/index.html" for s in range(SECTIONS)]
    write("/index.html", "Home", "".join(f'<a href="{u}">section {i}</a>' for i, u in enumerate(sections)))
    for s, section_path in enumerate(sections):
        leaves = [f"/s{s}/p{i}.html" for i in range(LEAVES_PER_SECTION)]
        write(section_path, f"Section {s}", "".join(f'<a href="{u}">page {u}</a>' for u in leaves))
        paths.append(section_path)
        for i, leaf in enumerate(leaves):
            if i % 2:
                qa = "".join(
                    f'<div class="qa" data-category="brewing"><h2 class="question">Question {s}-{i}-{k}?</h2>'
                    f'<div class="answer"><p>Answer {s}-{i}-{k}: brew at 93 degrees for {k + 2} '
                    f"minutes.</p></div></div>"
                    for k in range(3)
                )
                write(leaf, f"FAQ {s}-{i}", qa)
            else:
                paras = "".join(
                    f"<p>Paragraph {k} of article {s}-{i} about grinding and brewing coffee.</p>"
                    for k in range(5)
                )
                write(leaf, f"Article {s}-{i}", f"<article><h1>Article {s}-{i}</h1>{paras}</article>")
            paths.append(leaf)
    return paths


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            CountingHandler.requests += 1
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
        pass


def run_stage(work: Path, base_url: str) -> tuple[float, dict]:
    """Run the crawl stage in `work`; return its wall time and metrics."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p = data["crawl"]
    source = dict(
        p["sources"][0], name="bench", start_urls=[f"{base_url}/index.html"], depth_limit=3, max_pages=5000
    )
    p.update(serve_site=False, sources=[source], datasets=[], autothrottle=False, concurrent_requests=16)
    (work / "params.yaml").write_text(yaml.safe_dump({"base": data["base"], "crawl": p}), encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.crawl"],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"crawl stage failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((work / "metrics" / "crawl.json").read_text(encoding="utf-8"))
    clock = json.loads(
        (work / "metrics" / "timings" / "crawl.json").read_text(encoding="utf-8")
    )  # tuneline.common.timings
    for name, source in clock["sources"].items():
        metrics["sources"][name].update(source)
    return wall, metrics


def urllib_baseline(base_url: str, paths: list[str]) -> float:
    """Seconds to fetch every page one by one with urllib (no parsing, no politeness)."""
    start = time.perf_counter()
    for path in paths:
        with urllib.request.urlopen(base_url + path) as r:
            r.read()
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        site, work = Path(tmp) / "site", Path(tmp) / "work"
        work.mkdir()
        paths = build_site(site)
        handler = functools.partial(CountingHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            baseline_s = urllib_baseline(base_url, paths)
            CountingHandler.requests = 0
            cold_wall, cold = run_stage(work, base_url)
            cold_requests = CountingHandler.requests
            warm_wall, warm = run_stage(work, base_url)
            warm_requests = CountingHandler.requests - cold_requests
        finally:
            server.shutdown()
            server.server_close()

    pages = cold["pages_fetched"]
    cold_crawl_s = cold["sources"]["bench"]["elapsed_s"]
    warm_crawl_s = warm["sources"]["bench"]["elapsed_s"]
    rows = [
        ("urllib one by one (baseline)", len(paths), baseline_s, None, len(paths)),
        ("crawl stage, cold", pages, cold_crawl_s, cold_wall, cold_requests),
        ("crawl stage, HTTP cache rerun", warm["pages_fetched"], warm_crawl_s, warm_wall, warm_requests),
    ]
    print(f"site: {len(paths)} pages on {base_url}; AutoThrottle off, 16 concurrent requests")
    print(
        f"{'run':32} {'pages':>6} {'crawl s':>8} {'pages/s':>8} {'stage wall s':>12} {'server requests':>16}"
    )
    for name, n, secs, wall, reqs in rows:
        wall_text = f"{wall:12.2f}" if wall is not None else f"{'-':>12}"
        print(f"{name:32} {n:6d} {secs:8.2f} {n / secs:8.1f} {wall_text} {reqs:16d}")
    cold_rate = pages / cold_crawl_s
    print(
        f"target >= {TARGET_PAGES_PER_S:.0f} pages/s cold: "
        f"{'met' if cold_rate >= TARGET_PAGES_PER_S else 'NOT met'} "
        f"({cold_rate:.1f}); items {cold['items_by_kind']}"
    )

    result = {
        "site_pages": len(paths),
        "baseline_urllib_sequential": {
            "pages": len(paths),
            "seconds": round(baseline_s, 3),
            "pages_per_s": round(len(paths) / baseline_s, 1),
        },
        "cold": {
            "pages": pages,
            "crawl_seconds": cold_crawl_s,
            "stage_wall_seconds": round(cold_wall, 3),
            "pages_per_s": round(cold_rate, 1),
            "server_requests": cold_requests,
            "items_by_kind": cold["items_by_kind"],
        },
        "cached_rerun": {
            "pages": warm["pages_fetched"],
            "crawl_seconds": warm_crawl_s,
            "stage_wall_seconds": round(warm_wall, 3),
            "server_requests": warm_requests,
            "cache_hits": warm["cache_hits"],
        },
        "target_pages_per_s": TARGET_PAGES_PER_S,
        "target_met": cold_rate >= TARGET_PAGES_PER_S,
    }
    out = ROOT / "bench" / "results" / "crawl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
