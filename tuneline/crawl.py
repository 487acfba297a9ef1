"""The crawl stage's library: a scrapy spider driven by `crawl:` params, and dataset loading.

One scrapy crawler runs per source (`crawl.sources`), all in one `AsyncCrawlerProcess`, so each
source gets its own depth limit, page budget and HTTP cache file. Politeness and robustness are
scrapy's own settings (`scrapy_settings`): robots.txt, AutoThrottle, retries, timeouts, size cap,
HTTP cache. Every page that yields no record is listed as a reject with its reason; items with a
content hash seen before are dropped by `DedupPipeline` and listed too.

Pure parts (`page_items`, `check_params`, `dataset_records`) take values and return values;
`run_crawl` wraps the stateful scrapy run once and returns a `CrawlResult`. Scrapy's twisted
reactor runs once per process, so call `run_crawl` once per process (the stage does).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import functools
import http.server
import io
import json
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from parsel import Selector

from tuneline.params import Crawl, CrawlDataset, CrawlSource, ParamsError
from tuneline.records import ALPACA_FIELDS, InputError, content_hash, with_ids

# Fields a dataset's `columns:` may map; instruction and output are required.
DATASET_FIELDS = (*ALPACA_FIELDS, "category")
# Elements whose text is navigation or code, never page content.
SKIP_TAGS = frozenset({"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template"})
BLOCK_TAGS = frozenset({
    "p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
    "dl", "dt", "dd", "blockquote", "pre", "table", "tr", "td", "th", "figcaption", "br", "hr",
})
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
REDIRECT_MAX_TIMES = 20  # scrapy's default, stated here because the page-count backstop depends on it


# ---------------------------------------------------------------- params checks


def check_params(p: Crawl) -> None:
    """Refuse a `crawl:` section the crawl cannot run with; the message names source and key."""
    names = [s.name for s in p.sources]
    for i, s in enumerate(p.sources):
        _check_source(s, f"crawl.sources[{i}] ({s.name})", p.serve_site)
        if names.count(s.name) > 1:
            raise ParamsError(f"crawl.sources[{i}].name {s.name!r} is used twice; give each source its own name")
    ds_names = [d.name for d in p.datasets]
    for i, d in enumerate(p.datasets):
        _check_dataset(d, f"crawl.datasets[{i}] ({d.name})")
        if ds_names.count(d.name) > 1:
            raise ParamsError(f"crawl.datasets[{i}].name {d.name!r} is used twice; give each dataset its own name")
    minimum = {"retry_times": 0, "http_cache_expiration_s": 0, "autothrottle_start_delay_s": 0,
               "max_page_bytes": 1, "concurrent_requests": 1, "min_doc_chars": 0, "download_timeout": 1e-3}
    for key, low in minimum.items():
        if getattr(p, key) < low:
            raise ParamsError(f"crawl.{key} is {getattr(p, key)}; it must be at least {low}")


def _check_source(s: CrawlSource, where: str, serve_site: bool) -> None:
    if not SOURCE_NAME.match(s.name):
        raise ParamsError(f"{where}.name {s.name!r}: use letters, digits, '-' and '_' only (it names the source's cache file)")
    if not s.start_urls:
        raise ParamsError(f"{where}.start_urls is empty; give at least one URL")
    for url in s.start_urls:
        scheme = urlsplit(url).scheme
        if scheme not in ("", "http", "https"):
            raise ParamsError(f"{where}.start_urls: {url!r} is not an http(s) URL")
        if not scheme and not serve_site:
            raise ParamsError(
                f"{where}.start_urls: {url!r} is relative, which needs crawl.serve_site: true "
                "(it is resolved against the bundled site server); give an absolute URL otherwise"
            )
    if not s.allowed_domains:
        raise ParamsError(f"{where}.allowed_domains is empty; list the domains the crawl may visit")
    for key in ("allow", "deny"):
        for pattern in getattr(s, key):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ParamsError(f"{where}.{key}: {pattern!r} is not a valid regular expression ({err})") from None
    if s.depth_limit < 0:
        raise ParamsError(f"{where}.depth_limit is {s.depth_limit}; use 0 for no limit or a positive depth")
    if s.max_pages < 1:
        raise ParamsError(f"{where}.max_pages is {s.max_pages}; it must be at least 1")
    needed = {"qa": ("question_css", "answer_css"), "doc": ("title_css",), "auto": ("question_css", "answer_css")}
    for key in needed[s.kind]:
        if not getattr(s, key).strip():
            raise ParamsError(f"{where}.{key} is empty but kind is {s.kind!r}; give a CSS selector (or xpath:...)")
    for key in ("question_css", "answer_css", "title_css", "text_css"):
        css = getattr(s, key)
        if css.strip():
            _check_css(css, f"{where}.{key}")


def _check_css(css: str, key: str) -> None:
    kind = "an XPath expression" if css.startswith("xpath:") else "a CSS selector"
    try:
        select(Selector(text="<html><body></body></html>"), css)
    except Exception as err:  # cssselect and lxml raise several types (SelectorSyntaxError, XPathError)
        raise ParamsError(f"{key} {css!r} is not {kind} ({err}); fix the selector") from None


def _check_dataset(d: CrawlDataset, where: str) -> None:
    if d.format != "hub":
        for key in ("config", "revision"):
            if getattr(d, key) is not None:
                raise ParamsError(f"{where}.{key} is for format: hub only; remove it for a {d.format} file")
    if d.format in ("json", "jsonl", "csv") and d.split != "train":
        raise ParamsError(f"{where}.split is {d.split!r}: a {d.format} file has one split, 'train'")
    unknown = sorted(set(d.columns) - set(DATASET_FIELDS))
    if unknown:
        raise ParamsError(f"{where}.columns.{unknown[0]} is not a record field; map onto {', '.join(DATASET_FIELDS)}")
    for key in ("instruction", "output"):
        if not d.columns.get(key):
            raise ParamsError(f"{where}.columns.{key} is not mapped; name the column that holds it")


def resolve_sources(sources: list[CrawlSource], site_url: str | None) -> list[CrawlSource]:
    """Sources with relative start URLs resolved against the bundled site server at `site_url`."""
    resolved = []
    for s in sources:
        if any(not urlsplit(u).scheme for u in s.start_urls):
            if site_url is None:
                raise ParamsError(f"crawl source {s.name!r} has relative start_urls but no site is served")
            s = replace(s, start_urls=[urljoin(site_url, u) for u in s.start_urls])
        resolved.append(s)
    return resolved


# ---------------------------------------------------------------- extraction (pure)


def select(sel: Selector, selector: str) -> Any:
    """The elements `selector` matches: XPath when it starts with `xpath:`, CSS otherwise."""
    if selector.startswith("xpath:"):
        return sel.xpath(selector.removeprefix("xpath:"))
    return sel.css(selector)


def page_items(page: str | Selector, source: CrawlSource, min_doc_chars: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """The items one HTML page (text, or its parsed Selector) yields, and (reason, detail) for what it lost.

    Q&A: each question is paired with the first answer that follows it in the page (before the
    next question), so one missing answer loses only its own question: `qa_mismatch` names the
    unanswered question or the answer without a question; `qa_empty` a pair with an empty side.
    Documents: `no_content` when the selectors match nothing, `navigation_only` when fewer than
    `min_doc_chars` characters of the text are outside links (an index of links, a menu page).
    """
    sel = Selector(text=page) if isinstance(page, str) else page
    if source.kind in ("auto", "qa"):
        questions = select(sel, source.question_css)
        answers = select(sel, source.answer_css)
        if questions or answers:
            return _qa_pairs(sel, questions, answers)
        if source.kind == "qa":
            return [], [("no_content", "no question or answer matched")]
    doc, why = _doc_item(sel, source, min_doc_chars)
    return ([doc], []) if doc else ([], [why])


def _qa_pairs(sel: Selector, questions: Any, answers: Any) -> tuple[list[dict], list[tuple[str, str]]]:
    order = {el: i for i, el in enumerate(sel.root.getroottree().iter())}
    events = sorted([(order.get(q.root, -1), 0, q) for q in questions] + [(order.get(a.root, -1), 1, a) for a in answers],
                    key=lambda e: (e[0], e[1]))
    items, lost = [], []
    pending: Selector | None = None
    for _, is_answer, el in events:
        if not is_answer:
            if pending is not None:
                lost.append(("qa_mismatch", f"question {_short(pending)!r} has no answer after it"))
            pending = el
        elif pending is None:
            lost.append(("qa_mismatch", f"answer {_short(el)!r} follows no question"))
        else:
            item = _qa_item(pending, el)
            if item["question"] and item["answer"]:
                items.append(item)
            else:
                lost.append(("qa_empty", f"question {item['question'][:60]!r} has an empty side"))
            pending = None
    if pending is not None:
        lost.append(("qa_mismatch", f"question {_short(pending)!r} has no answer after it"))
    return items, lost


def _short(el: Selector) -> str:
    return " ".join(block_lines(el.root))[:60]


def _qa_item(question: Selector, answer: Selector) -> dict:
    item = {"kind": "qa", "question": " ".join(block_lines(question.root)),
            "answer": "\n".join(block_lines(answer.root))}
    category = question.xpath("ancestor-or-self::*[@data-category][1]/@data-category").get()
    if category:
        item["category"] = category.strip()
    return item


# Link text outside navigation blocks (block_lines leaves those out already).
_LINK_TEXT = ".//a[not(ancestor::nav or ancestor::header or ancestor::footer or ancestor::aside)]//text()"


def _doc_item(sel: Selector, source: CrawlSource, min_doc_chars: int) -> tuple[dict | None, tuple[str, str]]:
    title_el = select(sel, source.title_css) if source.title_css.strip() else []
    if title_el:
        title = " ".join(block_lines(title_el[0].root))
    else:
        title = " ".join(sel.css("title::text").get("").split())
    category = None
    link_chars = 0
    if source.text_css.strip():
        matches = select(sel, source.text_css)
        if not matches:
            return None, ("no_content", "the text selector matched nothing")
        lines = [line for m in matches for line in block_lines(m.root)]
        link_chars = sum(len("".join(t.split())) for m in matches for t in m.xpath(_LINK_TEXT).getall())
        category = matches[0].xpath("ancestor-or-self::*[@data-category][1]/@data-category").get()
    else:
        lines = _trafilatura_lines(sel.get())
    if lines and lines[0] == title:  # the heading is the title field already
        lines = lines[1:]
    if not lines:
        return None, ("no_content", "no text besides the title")
    text = "\n".join(lines)
    own_chars = len("".join(text.split())) - link_chars
    if own_chars < min_doc_chars:
        return None, ("navigation_only",
                      f"{max(own_chars, 0)} characters outside links, fewer than crawl.min_doc_chars {min_doc_chars}")
    item = {"kind": "doc", "title": title, "text": text}
    if category:
        item["category"] = category.strip()
    return item, ("", "")


def decode_page(body: bytes, content_type: str) -> tuple[str, str, int]:
    """(text, encoding, bytes replaced) of an HTML body.

    The encoding is the declared one (byte-order mark, Content-Type header, `<meta charset>`,
    as scrapy reads them with w3lib); with none declared (or an unknown name), UTF-8 if the
    body is valid UTF-8, else charset_normalizer's guess. Bytes invalid in that encoding are
    replaced by U+FFFD and counted, so a few bad bytes do not lose the page.
    """
    from w3lib.encoding import html_body_declared_encoding, http_content_type_encoding, read_bom, resolve_encoding

    bom, _ = read_bom(body)
    declared = bom or http_content_type_encoding(content_type) or html_body_declared_encoding(body)
    encoding = resolve_encoding(declared) if declared else None
    if encoding is None:
        try:
            body.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            import charset_normalizer

            best = charset_normalizer.from_bytes(body).best()
            encoding = best.encoding if best is not None else "cp1252"
    text = body.decode(encoding, errors="replace")
    replaced = text.count("\ufffd") - body.decode(encoding, errors="ignore").count("\ufffd")
    return text.lstrip("\ufeff"), encoding, replaced


def _trafilatura_lines(html: str) -> list[str]:
    # Imported here: trafilatura is only needed for sources that name no text selector.
    import trafilatura

    text = trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True) or ""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def block_lines(element: Any) -> list[str]:
    """The text of an lxml element, one line per block element, without nav/footer/script text."""
    lines: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        text = " ".join("".join(buf).split())
        buf.clear()
        if text:
            lines.append(text)

    def walk(el: Any) -> None:
        tag = el.tag if isinstance(el.tag, str) else ""  # comments and processing instructions
        if tag and tag not in SKIP_TAGS:
            block = tag in BLOCK_TAGS
            if block:
                flush()
            buf.append(el.text or "")
            for child in el:
                walk(child)
                buf.append(child.tail or "")
            if block:
                flush()

    walk(element)
    flush()
    return lines


# ---------------------------------------------------------------- scrapy: settings, spider, pipeline


def scrapy_settings(p: Crawl, source: CrawlSource, http_cache_dir: str | Path | None) -> dict[str, Any]:
    """The scrapy settings of one source's crawler; `http_cache_dir` None turns the cache off."""
    retry_codes = [500, 502, 503, 504, 522, 524, 408, 429]
    return {
        "USER_AGENT": p.user_agent,
        "ROBOTSTXT_OBEY": True,
        "AUTOTHROTTLE_ENABLED": p.autothrottle,
        "AUTOTHROTTLE_START_DELAY": p.autothrottle_start_delay_s,
        "CONCURRENT_REQUESTS": p.concurrent_requests,
        "CONCURRENT_REQUESTS_PER_DOMAIN": p.concurrent_requests,
        "RETRY_ENABLED": True,
        "RETRY_TIMES": p.retry_times,
        "RETRY_HTTP_CODES": retry_codes,
        "REDIRECT_MAX_TIMES": REDIRECT_MAX_TIMES,
        "DOWNLOAD_TIMEOUT": p.download_timeout,
        "DOWNLOAD_MAXSIZE": p.max_page_bytes,
        "DOWNLOAD_WARNSIZE": p.max_page_bytes,
        # Depth is counted by the spider (see page_request); breadth-first order fetches shallow
        # pages first, so a page is usually first reached by its shortest path.
        "DEPTH_LIMIT": 0,
        "DEPTH_PRIORITY": 1,
        "SCHEDULER_DISK_QUEUE": "scrapy.squeues.PickleFifoDiskQueue",
        "SCHEDULER_MEMORY_QUEUE": "scrapy.squeues.FifoMemoryQueue",
        # The spider keeps to max_pages exactly by not scheduling more pages (see SourceSpider);
        # this is scrapy's backstop on all responses, which also counts robots.txt, retries and
        # redirect hops, so it must not close the crawl before the last page.
        "CLOSESPIDER_PAGECOUNT": source.max_pages * (p.retry_times + 1 + REDIRECT_MAX_TIMES) + 1,
        "HTTPCACHE_ENABLED": http_cache_dir is not None,
        "HTTPCACHE_DIR": str(Path(http_cache_dir).resolve()) if http_cache_dir is not None else "httpcache",
        "HTTPCACHE_EXPIRATION_SECS": p.http_cache_expiration_s,
        # One database file per source instead of six files and a folder per page: about as fast as
        # no cache at all on a cold crawl, and cheap for DVC to hash.
        "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.DbmCacheStorage",
        # A cached 503 would be served to every retry and to the next run: never cache what is retried.
        "HTTPCACHE_IGNORE_HTTP_CODES": retry_codes,
        "ITEM_PIPELINES": {DedupPipeline: 300},
        "DEFAULT_DROPITEM_LOG_LEVEL": "INFO",
        "LOG_LEVEL": "WARNING",
        "TELNETCONSOLE_ENABLED": False,
    }


@dataclass
class ItemSink:
    """Items and rejects of one run, shared by all crawlers; items are keyed by content hash."""

    items: dict[str, dict] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)

    def keep(self, item: dict) -> dict | None:
        """Keep `item` unless its content was seen; return the duplicate that loses, if any.

        The copy with the shortest URL wins (ties: the first in sort order), so the output does not
        depend on fetch order and a page wins over its `-print` or `?page=` variants.
        """
        h = item["content_hash"]
        old = self.items.get(h)
        if old is None:
            self.items[h] = item
            return None
        winner, loser = sorted((old, item), key=lambda i: (len(i["url"]), i["url"], i["source"]))
        self.items[h] = winner
        self.rejects.append(reject(loser["url"], loser["source"], "duplicate", f"same content as {winner['url']}",
                                   content_hash=h))
        return loser

    def reject(self, url: str, source: str, reason: str, detail: str = "") -> None:
        self.rejects.append(reject(url, source, reason, detail))


def reject(url: str, source: str, reason: str, detail: str = "", **extra: Any) -> dict:
    """A rejects-file record."""
    return {"url": url, "source": source, "reason": reason, "detail": detail, **extra}


class DedupPipeline:
    """Item pipeline: adds the content hash and keeps each content once (across sources)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> DedupPipeline:
        return cls(crawler)

    def process_item(self, item: dict) -> dict:
        from scrapy.exceptions import DropItem

        spider = self.crawler.spider
        content = {k: v for k, v in item.items() if k in ("kind", "question", "answer", "title", "text")}
        item["content_hash"] = content_hash(content)
        loser = spider.sink.keep(item)
        self.crawler.stats.inc_value(f"tuneline/items/{item['kind']}")
        if loser is item:
            raise DropItem(f"duplicate content {item['content_hash']} at {item['url']}")
        return item


def _spider_class() -> type:
    # Built on first use so importing this module does not import scrapy (tests of the pure parts).
    import scrapy
    from scrapy.http import HtmlResponse
    from scrapy.linkextractors import LinkExtractor
    from w3lib.url import canonicalize_url

    class SourceSpider(scrapy.Spider):
        """Crawls one source: extracts items from HTML pages and follows links within budget."""

        name = "tuneline"

        def __init__(self, source: CrawlSource, sink: ItemSink, min_doc_chars: int, **kwargs: Any) -> None:
            super().__init__(name=source.name, **kwargs)
            self.source = source
            self.sink = sink
            self.min_doc_chars = min_doc_chars
            self.allowed_domains = list(source.allowed_domains)
            # Domains are checked in page_request: LinkExtractor's allow_domains compares the host
            # with its port ("127.0.0.1:8000"), so it never matches a loopback site on a port.
            self.links = LinkExtractor(allow=source.allow, deny=source.deny)
            # canonical URL -> the shallowest depth it was requested at. Only requested pages are
            # here and count against max_pages: a link beyond depth_limit is not remembered, so
            # the same page can still be fetched when a shallower page links to it.
            self.depth: dict[str, int] = {}

        def page_request(self, url: str, depth: int) -> scrapy.Request | None:
            """A request for `url` found at `depth`, if it is new and within the depth and page budgets."""
            key = canonicalize_url(url)
            limit = self.source.depth_limit
            if not in_domains(url, self.source.allowed_domains):
                self.crawler.stats.inc_value("tuneline/links_offsite")
                return None
            if limit and depth > limit:
                self.crawler.stats.inc_value("tuneline/links_too_deep")
                return None
            old = self.depth.get(key)
            if old is not None:
                if limit and old == limit and depth < old:
                    # Fetched at the limit, so its links were cut; from here they are within it.
                    self.depth[key] = depth
                    self.crawler.stats.inc_value("tuneline/refetched_shallower")
                    return scrapy.Request(url, callback=self.parse, errback=self.on_error, dont_filter=True,
                                          meta={"tl_depth": depth, "links_only": True})
                return None
            if len(self.depth) >= self.source.max_pages:
                self.crawler.stats.inc_value("tuneline/links_over_max_pages")
                return None
            self.depth[key] = depth
            # dont_filter: the dict above already dedups pages; scrapy's dupefilter would drop the
            # second hop of a redirect loop silently instead of letting REDIRECT_MAX_TIMES report it.
            return scrapy.Request(url, callback=self.parse, errback=self.on_error, dont_filter=True,
                                  meta={"tl_depth": depth})

        async def start(self):
            for url in self.source.start_urls:
                if request := self.page_request(url, 0):
                    yield request

        def parse(self, response):
            url, name = response.url, self.source.name
            depth = response.meta["tl_depth"]
            if not isinstance(response, HtmlResponse):
                ctype = response.headers.get("Content-Type", b"").decode("latin-1")
                self.sink.reject(url, name, "non_html", ctype or "no Content-Type")
                return
            ctype = response.headers.get("Content-Type", b"").decode("latin-1")
            text, _, replaced = decode_page(response.body, ctype)
            response = response.replace(body=text.encode("utf-8"), encoding="utf-8")
            if not response.meta.get("links_only"):
                self.crawler.stats.inc_value("tuneline/pages")
                if replaced:
                    self.crawler.stats.inc_value("tuneline/pages_with_bad_bytes")
                    self.crawler.stats.inc_value("tuneline/bad_bytes_replaced", replaced)
                items, lost = page_items(response.selector, self.source, self.min_doc_chars)
                for reason, detail in lost:
                    self.sink.reject(url, name, reason, detail)
                for item in items:
                    yield {"url": url, "source": name, **item}
            for link in self.links.extract_links(response):
                if request := self.page_request(link.url, depth + 1):
                    yield request

        def on_error(self, failure):
            request = failure.request
            reason, detail = error_reason(failure.value, request.meta)
            self.sink.reject(request.url, self.source.name, reason, detail)

    return SourceSpider


def in_domains(url: str, domains: list[str]) -> bool:
    """Whether the host of `url` is one of `domains` or a subdomain of one (any port)."""
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in domains)


def error_reason(error: BaseException, meta: dict) -> tuple[str, str]:
    """The rejects reason and detail for a failed request."""
    from scrapy.exceptions import (CannotResolveHostError, DownloadCancelledError,
                                   DownloadConnectionRefusedError, DownloadTimeoutError, IgnoreRequest)
    from scrapy.spidermiddlewares.httperror import HttpError
    from twisted.internet import defer, error as txerror

    message = str(error)[:200]
    if isinstance(error, HttpError):
        return f"http_{error.response.status}", ""
    if isinstance(error, (DownloadTimeoutError, txerror.TimeoutError)):
        return "timeout", message
    if isinstance(error, (DownloadCancelledError, defer.CancelledError)):
        return "too_large", message or "over crawl.max_page_bytes"
    if isinstance(error, IgnoreRequest):
        if "robots.txt" in message:
            return "robots_txt", ""
        if "redirection" in message:
            hops = meta.get("redirect_urls", [])
            return "redirect_loop", f"{len(hops)} redirects through " + " -> ".join(dict.fromkeys(hops))
        if "offsite" in message:
            return "offsite", message
        return "ignored", message
    if isinstance(error, (CannotResolveHostError, DownloadConnectionRefusedError, txerror.ConnectError)):
        return "connection_error", message
    return type(error).__name__, message


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class CrawlResult:
    """What a crawl produced: items (sorted, deduplicated), rejects (sorted) and scrapy's stats."""

    items: list[dict]
    rejects: list[dict]
    stats: dict[str, dict]


def run_crawl(p: Crawl, sources: list[CrawlSource], http_cache_dir: str | Path,
              uncached: frozenset[str] = frozenset()) -> CrawlResult:
    """Crawl every source (one scrapy crawler each, concurrently); once per process.

    Sources named in `uncached` skip the HTTP cache (the bundled site is local and changes with
    the repository; a cached copy could only be stale).
    """
    from scrapy.crawler import AsyncCrawlerProcess, Crawler

    spider_cls = _spider_class()
    sink = ItemSink()
    process = AsyncCrawlerProcess({"LOG_LEVEL": "WARNING", "TELNETCONSOLE_ENABLED": False})
    crawlers = []
    for source in sources:
        cache = None if source.name in uncached else http_cache_dir
        crawler = Crawler(spider_cls, scrapy_settings(p, source, cache))
        crawlers.append(crawler)
        process.crawl(crawler, source=source, sink=sink, min_doc_chars=p.min_doc_chars)
    process.start()
    stats = {c.spider.name: _plain(c.stats.get_stats()) for c in crawlers}
    return CrawlResult(sorted_items(sink.items.values()), sorted_rejects(sink.rejects), stats)


def _plain(stats: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in stats.items()}


def sorted_items(items: Any) -> list[dict]:
    """Items in a stable order: by URL, then content."""
    return sorted(items, key=lambda i: (i["url"], i["kind"], i.get("question", i.get("title", "")),
                                        i.get("answer", i.get("text", ""))))


def sorted_rejects(rejects: list[dict]) -> list[dict]:
    return sorted(rejects, key=lambda r: (r["url"], r["source"], r["reason"], r["detail"]))


def rebase_urls(result: CrawlResult, served_url: str, site_dir: str) -> CrawlResult:
    """The result with the bundled site's server URL (a new port each run) replaced by its folder.

    `http://127.0.0.1:PORT/faq/a.html` becomes `data/site/faq/a.html`: stable across runs, and it
    names the file the record came from.
    """
    prefix = site_dir.rstrip("/") + "/"

    def fix(record: dict) -> dict:
        return {k: v.replace(served_url, prefix) if k in ("url", "detail") and isinstance(v, str) else v
                for k, v in record.items()}

    return CrawlResult(sorted_items(map(fix, result.items)), sorted_rejects([fix(r) for r in result.rejects]),
                       result.stats)


def crawl_metrics(result: CrawlResult, dataset_records: list[dict], dataset_rejects: list[dict]) -> dict:
    """metrics/crawl.json: pages, items by kind, rejects by reason, cache hits, bytes, per source."""
    def total(key: str) -> int:
        return sum(int(s.get(key, 0)) for s in result.stats.values())

    return {
        "pages_fetched": total("tuneline/pages"),
        "requests": total("downloader/request_count"),
        "responses": total("downloader/response_count"),
        "retries": total("retry/count"),
        "cache_hits": total("httpcache/hit"),
        "cache_misses": total("httpcache/miss"),
        "bytes": total("downloader/response_bytes"),
        "links_over_max_pages": total("tuneline/links_over_max_pages"),
        "links_too_deep": total("tuneline/links_too_deep"),
        "refetched_shallower": total("tuneline/refetched_shallower"),
        "pages_with_bad_bytes": total("tuneline/pages_with_bad_bytes"),
        "bad_bytes_replaced": total("tuneline/bad_bytes_replaced"),
        "links_offsite": total("tuneline/links_offsite"),
        "items": len(result.items),
        "items_by_kind": dict(sorted(Counter(i["kind"] for i in result.items).items())),
        "rejects": len(result.rejects) + len(dataset_rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in result.rejects + dataset_rejects).items())),
        "dataset_records": len(dataset_records),
        # Every dataset row is a record or a reject: rows_in = records + rejects.
        "dataset_rows_in": len(dataset_records) + len(dataset_rejects),
        "dataset_rejects_by_reason": dict(sorted(Counter(r["reason"] for r in dataset_rejects).items())),
        "sources": {
            name: {
                "pages": int(s.get("tuneline/pages", 0)),
                "items": sum(1 for i in result.items if i["source"] == name),
                "finish_reason": s.get("finish_reason", ""),
                "elapsed_s": round(float(s.get("elapsed_time_seconds", 0.0)), 3),
                # When the pages were fetched: here, not in crawl.jsonl, whose hash must not change
                # between two runs that fetched the same pages.
                "started_at": s.get("start_time", ""),
            }
            for name, s in sorted(result.stats.items())
        },
    }


# ---------------------------------------------------------------- the bundled site server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass


@contextlib.contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: the site folder (base.site_dir) does not exist")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------- datasets
#
# json, jsonl and csv files are read here, row by row, so that one bad row is a reject naming
# `file:line` while the good rows flow on; parquet files and hub datasets go through
# `datasets.load_dataset` (their rows are named `file#row<n>`). A json file is one JSON array
# of objects: a syntax error there fails the stage naming the file, line and column, since
# nothing after it can be read. An empty file fails saying it is empty.

TEXT_FIELDS = ("instruction", "input", "output", "system")


def _dataset_error(d: CrawlDataset, message: str) -> InputError:
    return InputError(f"crawl.datasets ({d.name}): {message}")


def _read_text(d: CrawlDataset) -> str:
    path = Path(d.path)
    if not path.is_file():
        raise _dataset_error(d, f"{d.path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the data
    except UnicodeDecodeError as err:
        raise _dataset_error(d, f"{d.path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if not text.strip():
        raise _dataset_error(d, f"{d.path} is empty; remove the entry from crawl.datasets or fill the file")
    return text


def _jsonl_lines(d: CrawlDataset) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a jsonl file, read in a stream; lines end at LF only.

    A binary read splits at the LF byte alone, so U+2028/U+2029 (line separators to `str.splitlines`,
    but legal inside a JSON string) never cut a row in two, and memory does not grow with the
    file. Fails naming the file when it is missing, empty or not UTF-8 (naming the line too).
    """
    path = Path(d.path)
    if not path.is_file():
        raise _dataset_error(d, f"{d.path} does not exist")
    seen_text = False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark is not part of the data
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _dataset_error(
                    d, f"{d.path}:{line_no}: not UTF-8 text (byte {err.start} of the line: {err.reason}); save it as UTF-8"
                ) from None
            seen_text = seen_text or bool(line.strip())
            yield line_no, line
    if not seen_text:
        raise _dataset_error(d, f"{d.path} is empty; remove the entry from crawl.datasets or fill the file")


def _jsonl_rows(d: CrawlDataset, lines: Iterable[tuple[int, str]]) -> tuple[list[tuple[str, dict]], list[dict]]:
    rows, rejects = [], []
    for line_no, line in lines:
        if not line.strip():
            continue
        where = f"{d.path}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            rejects.append(reject(where, f"dataset:{d.name}", "bad_json", f"{err.msg} at column {err.colno}"))
            continue
        if not isinstance(value, dict):
            rejects.append(reject(where, f"dataset:{d.name}", "bad_json", f"expected a JSON object, got {_type_name(value)}"))
            continue
        rows.append((where, value))
    return rows, rejects


def _json_rows(d: CrawlDataset, text: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise _dataset_error(d, f"{d.path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                "fix the file (format: json is one JSON array of objects; use format: jsonl "
                                "for one object per line, where a bad line is rejected and the rest kept)") from None
    if not isinstance(value, list):
        raise _dataset_error(d, f"{d.path}: expected a JSON array of objects, got {_type_name(value)}")
    rows, rejects = [], []
    for index, row in enumerate(value):
        where = f"{d.path}#row{index}"
        if isinstance(row, dict):
            rows.append((where, row))
        else:
            rejects.append(reject(where, f"dataset:{d.name}", "bad_json", f"expected a JSON object, got {_type_name(row)}"))
    return rows, rejects


def _csv_rows(d: CrawlDataset, text: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, rejects = [], []
    line_no = 2  # the line the next row starts on (line 1 is the header)
    for row in reader:
        where = f"{d.path}:{line_no}"
        line_no = reader.line_num + 1
        if None in row or None in row.values():
            rejects.append(reject(where, f"dataset:{d.name}", "bad_csv",
                                  f"{len(reader.fieldnames or [])} columns in the header, a different number in this row"))
            continue
        rows.append((where, row))
    return rows, rejects


def _type_name(value: Any) -> str:
    return type(value).__name__


def load_dataset_rows(d: CrawlDataset) -> tuple[list[tuple[str, dict]], list[dict], list[str]]:
    """(where, row) for each row of one `crawl.datasets` entry, rows rejected unread, and the columns."""
    if d.format in ("json", "jsonl", "csv"):
        if d.format == "jsonl":
            rows, rejects = _jsonl_rows(d, _jsonl_lines(d))
        else:
            rows, rejects = {"json": _json_rows, "csv": _csv_rows}[d.format](d, _read_text(d))
        columns = list(dict.fromkeys(k for _, row in rows for k in row))
        return rows, rejects, columns

    import datasets

    if d.format != "hub" and not Path(d.path).is_file():
        raise _dataset_error(d, f"{d.path} does not exist")
    try:
        if d.format == "hub":
            ds = datasets.load_dataset(d.path, d.config, split=d.split, revision=d.revision)
        else:
            ds = datasets.load_dataset(d.format, data_files=d.path, split=d.split)
    except Exception as err:  # parse errors, unknown split or config, hub unreachable: name the dataset
        raise _dataset_error(d, f"cannot load {d.path} as {d.format}: {err}") from None
    if len(ds) == 0:
        raise _dataset_error(d, f"{d.path} (split {d.split}) is empty")
    return [(f"{d.path}#row{i}", row) for i, row in enumerate(ds)], [], list(ds.column_names)


def check_columns(d: CrawlDataset, columns: list[str]) -> None:
    """Fail when a mapped column is not in the data, suggesting the column meant (`Instruction` for `instruction`)."""
    for field_, col in d.columns.items():
        if not col or col in columns:
            continue
        same = [c for c in columns if c.casefold() == col.casefold()]
        close = same or difflib.get_close_matches(col, columns, n=1)
        hint = f"; did you mean {close[0]!r}? (column names are case-sensitive)" if close else ""
        raise _dataset_error(
            d, f"column {col!r} (mapped to {field_}) is not in {d.path}{hint}; its columns are {', '.join(columns)}"
        )


def _field_problem(field_: str, value: Any) -> str | None:
    """Why a row's value cannot be the record field `field_` (None: it can). Nothing is coerced."""
    if value is None:
        return None
    if field_ in TEXT_FIELDS:
        return None if isinstance(value, str) else f"{field_}: expected a string, got {_type_name(value)}"
    if field_ == "category":
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return None if ok else f"category: expected a string or an integer label, got {_type_name(value)}"
    if field_ == "history":
        if value == "":
            return None
        pairs = isinstance(value, list) and all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in value)
        return None if pairs else "history: expected a list of [user, assistant] string pairs"
    return None


def dataset_records(d: CrawlDataset, rows: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    """Alpaca records from (where, row) pairs via `d.columns`, and the rows rejected (with reasons).

    A value of the wrong type (`"system": ["be nice"]`, `"output": 42`) rejects the row as
    `wrong_type`, naming the field and the type found: it is never turned into a string.
    """
    records, rejects = [], []
    for where, row in rows:
        problems = [q for f, col in d.columns.items() if col and (q := _field_problem(f, row.get(col)))]
        if problems:
            reason = "bad_history" if problems[0].startswith("history") else "wrong_type"
            rejects.append(reject(where, f"dataset:{d.name}", reason, "; ".join(problems)))
            continue
        rec: dict[str, Any] = {}
        for key in ALPACA_FIELDS:
            col = d.columns.get(key)
            value = row.get(col) if col else None
            if key == "history":
                rec[key] = [list(t) for t in value] if value else []
            else:
                rec[key] = "" if value is None else value.strip()
        if not rec["instruction"] or not rec["output"]:
            rejects.append(reject(where, f"dataset:{d.name}", "empty_field", "instruction or output is empty"))
            continue
        rec["source"] = f"dataset:{d.name}"
        category = row.get(d.columns["category"]) if d.columns.get("category") else None
        if category not in (None, ""):
            rec["category"] = str(category).strip()
        rec["row"] = where
        records.append(rec)
    return with_ids(records), rejects


def load_datasets(entries: list[CrawlDataset]) -> tuple[list[dict], list[dict]]:
    """All `crawl.datasets` as Alpaca records (same content kept once, sorted) plus rejects.

    Of records with the same content the first (in params order, then row order) is kept; the
    others are rejected as `duplicate` with `duplicate_of` naming the kept record's id.
    """
    records: dict[str, dict] = {}
    rejects: list[dict] = []
    for d in entries:
        rows, unread, columns = load_dataset_rows(d)
        check_columns(d, columns)
        recs, bad = dataset_records(d, rows)
        rejects += unread + bad
        for rec in recs:
            kept = records.get(rec["content_hash"])
            if kept is not None:
                rejects.append(reject(rec["row"], rec["source"], "duplicate", f"same content as {kept['row']}",
                                      content_hash=rec["content_hash"], id=rec["id"], duplicate_of=kept["id"]))
            else:
                records[rec["content_hash"]] = rec
    ordered = sorted(records.values(), key=lambda r: (r["source"], r["instruction"], r["id"]))
    return ordered, sorted_rejects(rejects)
