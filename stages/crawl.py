"""Stage `crawl`: crawl the configured web sources and load the configured datasets.

Reads  params.yaml `base` and `crawl`; the bundled site in base.site_dir (served on 127.0.0.1
       while the stage runs when crawl.serve_site is true); dataset files named in crawl.datasets.
Writes {base.raw_dir}/crawl.jsonl          one item per line: qa (question, answer) or doc (title, text),
Markdown
       {base.raw_dir}/datasets/            Alpaca records mapped from crawl.datasets, in JSON Lines shards
                                           (tuneline.common.records.write_jsonl_shards; base.shard_records a
                                           shard)
       {base.raw_dir}/crawl_rejects.jsonl  every page, request or row that gave no record, with its reason
       {base.cache_dir}/http               scrapy's HTTP cache (DVC persist: a rerun does not refetch)
       {base.metrics_dir}/crawl.json       pages, items by kind, rejects by reason, cache hits, bytes
Run    python -m stages.crawl  (or `dvc repro crawl`), from the repository root. Exits 2 on bad params or
       input, 1 when more than crawl.max_parse_error_fraction of the pages raised while parsing.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import InputError, write_jsonl, write_jsonl_shards
from tuneline.data import crawl


def main() -> int:
    try:
        base, p = params.load("base", "crawl")
        # Datasets first: a missing column fails in seconds, not after the crawl.
        records, dataset_rejects = crawl.load_datasets(p.datasets)
        http_cache = Path(base.cache_dir) / "http"
        http_cache.mkdir(parents=True, exist_ok=True)  # a DVC out even when every source is uncached
        with _site(base.site_dir, p.serve_site) as site_url:
            sources = crawl.resolve_sources(p.sources, site_url)
            # The served site is local and a DVC dep: a cached copy of it could only be stale.
            served = frozenset(s.name for s, orig in zip(sources, p.sources) if s != orig)
            result = crawl.run_crawl(p, sources, http_cache, uncached=served)
            if site_url:
                result = crawl.rebase_urls(result, site_url, base.site_dir)
    except (params.ParamsError, InputError) as err:
        print(f"crawl: {err}", file=sys.stderr)
        return 2

    raw = Path(base.raw_dir)
    write_jsonl(raw / "crawl.jsonl", result.items)
    write_jsonl_shards(raw / "datasets", records, base.shard_records, crawl.dataset_order)
    write_jsonl(raw / "crawl_rejects.jsonl", crawl.sorted_rejects(result.rejects + dataset_rejects))
    metrics = crawl.crawl_metrics(result, records, dataset_rejects)
    timings.write_metrics(Path(base.metrics_dir) / "crawl.json", metrics, base.metrics_dir, "crawl")
    if metrics["parse_errors"] > p.max_parse_error_fraction * metrics["pages_fetched"]:
        first = next(r for r in result.rejects if r["reason"] == "parse_error")
        print(
            f"crawl: {metrics['parse_errors']} of {metrics['pages_fetched']} pages raised while parsing, "
            f"more than crawl.max_parse_error_fraction {p.max_parse_error_fraction}; first: {first['url']}: "
            f"{first['detail']}. All are parse_error rejects in {raw / 'crawl_rejects.jsonl'}; "
            "fix the source's selectors",
            file=sys.stderr,
        )
        return 1
    print(
        f"crawl: {metrics['pages_fetched']} pages, {metrics['items']} items {metrics['items_by_kind']}, "
        f"{metrics['dataset_records']} dataset records, {metrics['rejects']} rejects "
        f"{metrics['rejects_by_reason']}, {metrics['cache_hits']} cache hits"
    )
    empty = crawl.empty_sources(p.sources, metrics, result.rejects)
    for message in empty:  # after the outputs are written, so the rejects say why
        print(f"crawl: {message}", file=sys.stderr)
    return 2 if empty else 0


def _site(site_dir: str, serve: bool) -> contextlib.AbstractContextManager[str | None]:
    """The bundled site's base URL while it is served, or None when crawl.serve_site is false."""
    return crawl.serve_directory(site_dir) if serve else contextlib.nullcontext(None)


if __name__ == "__main__":
    run(main)
