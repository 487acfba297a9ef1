"""The crawl stage's library: a scrapy spider driven by `crawl:` params, and dataset loading.

One scrapy crawler runs per source (`crawl.sources`), all in one `AsyncCrawlerProcess`, so each
source gets its own depth limit, page budget and HTTP cache file. Politeness and robustness are
scrapy's own settings (`scrapy_settings`): robots.txt, AutoThrottle, retries, timeouts, size cap,
HTTP cache. Page content is Markdown (markdownify): fenced code keeps the page's indentation, and
page furniture (navigation, headerlinks, tables of contents) is taken out first. Q&A comes from
selectors or from headings (documentation sites; docs/crawl.md). Every page that yields no record,
or raises while parsing, is listed as a reject with its reason; items with a content hash seen
before are dropped by `DedupPipeline` and listed too.

Pure parts (`page_items`, `dataset_records`) take values and return values;
`run_crawl` wraps the stateful scrapy run once and returns a `CrawlResult`. Scrapy's twisted
reactor runs once per process, so call `run_crawl` once per process (the stage does).
"""

from __future__ import annotations

import codecs
import contextlib
import copy
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
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from parsel import Selector

from tuneline.common.params import Crawl, CrawlDataset, CrawlSource, ParamsError
from tuneline.common.records import ALPACA_FIELDS, InputError, content_hash, with_ids

# Elements whose text is navigation or code, never page content.
SKIP_TAGS = frozenset({"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template"})
BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "main",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "blockquote",
        "pre",
        "table",
        "tr",
        "td",
        "th",
        "figcaption",
        "br",
        "hr",
    }
)
REDIRECT_MAX_TIMES = 20  # scrapy's default, stated here because the page-count backstop depends on it


# ---------------------------------------------------------------- sources


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


def page_items(
    page: str | Selector, source: CrawlSource, min_doc_chars: int
) -> tuple[list[dict], list[tuple[str, str]]]:
    """The items one HTML page (text, or its parsed Selector) yields, and (reason, detail) for what it lost.

    The page is read from a copy with page furniture taken out (`page_furniture`). Q&A comes from
    the question/answer selectors (`qa_mode: pairs`) or from headings (`qa_mode: headings`, see
    `heading_pairs`); with kind auto the prose left outside the Q&A is kept as a document, with kind
    qa it is a `prose_outside_qa` reject. Pairs: each question is paired with the first answer that
    follows it (before the next question), so one missing answer loses only its own question:
    `qa_mismatch` names the unanswered question or the answer without a question; an answer element
    that holds its question is paired with it (without the question's text); `qa_empty` a pair with
    an empty side. Documents: `no_content` when the selectors match nothing, `navigation_only` when
    fewer than `min_doc_chars` characters of the text are outside links (an index of links, a menu).
    """
    sel = page_furniture(Selector(text=page) if isinstance(page, str) else page, source)
    items: list[dict] = []
    lost: list[tuple[str, str]] = []
    if source.kind in ("auto", "qa"):
        items, lost = (heading_pairs if source.qa_mode == "headings" else _selector_pairs)(sel, source)
        if not items and not lost and source.kind == "qa":
            return [], [("no_content", "no question or answer matched")]
    if items or lost:  # a Q&A page: what is left of it is prose outside the Q&A
        doc, why = _doc_item(sel, source, min_doc_chars)
        if doc and source.kind == "qa":
            lost.append(
                ("prose_outside_qa", f"{len(doc['text'])} characters (kind auto keeps them as a document)")
            )
        elif doc:
            items.append(doc)
        elif why[0] == "navigation_only":
            lost.append(why)
        return items, lost
    doc, why = _doc_item(sel, source, min_doc_chars)
    return ([doc], []) if doc else ([], [why])


# Page furniture that documentation generators put inside the content: heading permalinks ("¶"),
# tables of contents, breadcrumbs, "edit this page", previous/next links, copy buttons.
BUILTIN_EXCLUDE_CSS = {
    "sphinx": [
        "a.headerlink",
        "div.sphinxsidebar",
        "div.related",
        "div[role=navigation]",
        "div.toctree-wrapper",
        "nav.contents",
        "div.contents.topic",
        "div.rst-footer-buttons",
        "a.viewcode-link",
        "div.footer",
    ],
    "mkdocs_material": [
        "a.headerlink",
        ".md-header",
        ".md-sidebar",
        ".md-footer",
        ".md-nav",
        ".md-path",
        ".md-content__button",
        ".md-source-file",
        ".md-tabs",
        ".md-clipboard",
        ".md-search",
    ],
    "docusaurus": [
        "a.hash-link",
        ".theme-doc-breadcrumbs",
        ".theme-doc-toc-mobile",
        ".theme-doc-toc-desktop",
        ".theme-edit-this-page",
        ".theme-last-updated",
        ".pagination-nav",
        ".theme-doc-footer",
    ],
    "docbook": [
        "div.toc",
        "div.qandaset > dl",
        "div.qandaset tr > td:first-child:not(:last-child)",
        "div.navheader",
        "div.titlepage hr",
        "div.navfooter",
        "div.list-of-tables",
        "div.list-of-figures",
        "div.list-of-examples",
    ],
    "github": ["a.anchor", "svg.octicon", "clipboard-copy", ".zeroclipboard-container"],
    "consent": [
        "#onetrust-consent-sdk",
        ".cc-window",
        "[id^=cookie-banner]",
        "[class^=cookie-banner]",
        "[id^=cookie-consent]",
        "[class^=cookie-consent]",
    ],
}


def exclusions(source: CrawlSource) -> str:
    """The CSS selector of everything `page_furniture` takes out of a page for `source`."""
    css = [*SKIP_TAGS, *(c for c in source.exclude_css if not c.startswith("xpath:"))]
    if source.builtin_excludes:
        css += [c for group in BUILTIN_EXCLUDE_CSS.values() for c in group]
    return ", ".join(dict.fromkeys(css))


def page_furniture(sel: Selector, source: CrawlSource) -> Selector:
    """A copy of the page without navigation, scripts, `exclude_css` and the built-in exclusions.

    A copy: the spider still follows the links in the navigation of the page it was given.
    """
    page = Selector(root=copy.deepcopy(sel.root), type="html")
    xpaths = [c for c in source.exclude_css if c.startswith("xpath:")]
    for el in [*page.css(exclusions(source)), *(e for x in xpaths for e in select(page, x))]:
        if el.root.getparent() is not None:  # inside an element dropped already
            el.drop()
    return page


# ---------------------------------------------------------------- Q&A from selectors


def _selector_pairs(sel: Selector, source: CrawlSource) -> tuple[list[dict], list[tuple[str, str]]]:
    questions = list(select(sel, source.question_css))
    answers = list(select(sel, source.answer_css))
    items, lost, nested = [], [], set()
    for a in answers:  # an answer element that holds its question (a whole <section>)
        inside = [q for q in questions if _contains(a.root, q.root)]
        if len(inside) == 1:
            items.append(_qa_item(inside[0], Selector(root=_without(a.root, inside[0].root), type="html")))
            nested |= {id(a), id(inside[0])}
        elif len(inside) > 1:
            lost.append(
                ("qa_nested", f"answer {_short(a)!r} holds {len(inside)} questions; narrow answer_css")
            )
            nested |= {id(a), *map(id, inside)}
    for q in questions:
        if id(q) not in nested and any(_contains(q.root, a.root) for a in answers):
            lost.append(("qa_nested", f"question {_short(q)!r} holds its answer; narrow question_css"))
            nested.add(id(q))
    order = {el: i for i, el in enumerate(sel.root.getroottree().iter())}
    events = sorted(
        [(order.get(q.root, -1), 0, q) for q in questions if id(q) not in nested]
        + [(order.get(a.root, -1), 1, a) for a in answers if id(a) not in nested],
        key=lambda e: (e[0], e[1]),
    )
    pending: Selector | None = None
    for _, is_answer, el in events:
        if not is_answer:
            if pending is not None:
                lost.append(("qa_mismatch", f"question {_short(pending)!r} has no answer after it"))
            pending = el
        elif pending is None:
            lost.append(("qa_mismatch", f"answer {_short(el)!r} follows no question"))
        else:
            items.append(_qa_item(pending, el))
            pending = None
    if pending is not None:
        lost.append(("qa_mismatch", f"question {_short(pending)!r} has no answer after it"))
    kept = [i for i in items if i["question"] and i["answer"]]
    lost += [
        ("qa_empty", f"question {i['question'][:60]!r} has an empty side") for i in items if i not in kept
    ]
    for el in [*questions, *answers]:  # what is left of the page is prose outside the Q&A
        if el.root.getparent() is not None and _in_tree(sel.root, el.root):
            el.drop()
    return kept, lost


def _contains(outer: Any, inner: Any) -> bool:
    return outer is not inner and any(a is outer for a in inner.iterancestors())


def _in_tree(root: Any, el: Any) -> bool:
    return el is root or any(a is root for a in el.iterancestors())


def _without(el: Any, inner: Any) -> Any:
    """A copy of `el` without its descendant `inner` (the text after `inner` is kept)."""
    path = []
    node = inner
    while node is not el:
        parent = node.getparent()
        path.append(parent.index(node))
        node = parent
    out = copy.deepcopy(el)
    target = out
    for i in reversed(path):
        target = target[i]
    target.drop_tree()
    return out


def _short(el: Selector) -> str:
    return " ".join(block_lines(el.root))[:60]


def _qa_item(question: Selector, answer: Selector) -> dict:
    item = {"kind": "qa", "question": question_text(question.root), "answer": markdown([answer.root])}
    category = question.xpath("ancestor-or-self::*[@data-category][1]/@data-category").get()
    if category:
        item["category"] = category.strip()
    return item


_NUMBERING = re.compile(r"^(?:\d+\.)+\s+")


def question_text(element: Any) -> str:
    """A question heading's text on one line, without a section number ("1.2. ")."""
    return _NUMBERING.sub("", " ".join(block_lines(element)))


# ---------------------------------------------------------------- Q&A from headings

HEADING_TAGS = ("h1", "h2", "h3", "h4", "h5", "h6")


def heading_pairs(sel: Selector, source: CrawlSource) -> tuple[list[dict], list[tuple[str, str]]]:
    """Q&A where a question is a heading and its answer every block after it (`qa_mode: headings`).

    A question is a heading of a level in `heading_levels` (ending in one of `questions_end_with`
    when that is set); its answer runs up to the next heading of the same or a higher level, or
    the next question: several paragraphs, lists, tables and code blocks, as Markdown. The scope
    is what `text_css` matches (the whole body when empty). The questions and answers are taken
    out of `sel`, so what is left is the page's other prose.
    """
    scopes = [m.root for m in (select(sel, source.text_css) if source.text_css.strip() else sel.css("body"))]
    scopes = [s for s in scopes if not any(_contains(o, s) for o in scopes)]  # a match inside another: once
    items, lost, taken = [], [], []
    for scope in scopes:
        heads = [h for h in scope.iter(*HEADING_TAGS)]
        is_q = [_is_question(h, source) for h in heads]
        for i, head in enumerate(heads):
            if not is_q[i]:
                continue
            level = int(head.tag[1])
            later = zip(heads[i + 1 :], is_q[i + 1 :])
            end = next((h for h, q in later if q or int(h.tag[1]) <= level), None)
            pieces = range_pieces(scope, head, end)
            item = {"kind": "qa", "question": question_text(head), "answer": markdown(pieces)}
            category = (
                Selector(root=head, type="html")
                .xpath("ancestor-or-self::*[@data-category][1]/@data-category")
                .get()
            )
            if category:
                item["category"] = category.strip()
            if item["answer"]:
                items.append(item)
            else:
                lost.append(
                    ("qa_empty", f"question {item['question'][:60]!r} has no text before the next heading")
                )
            taken.append((head, pieces))
    for head, pieces in taken:
        _remove_pieces([("el", head), *pieces])
    return items, lost


def _is_question(head: Any, source: CrawlSource) -> bool:
    if int(head.tag[1]) not in source.heading_levels:
        return False
    text = question_text(head)
    return bool(text) and (not source.questions_end_with or text.endswith(tuple(source.questions_end_with)))


def range_pieces(root: Any, start: Any, end: Any | None) -> list[tuple[str, Any]]:
    """The parts of `root` after `start` and before `end` (None: to the end of `root`), in page order.

    Each part is ("el", element) for a whole element with the text after it, ("text", element)
    for the text at the start of an element that holds `end`, or ("tail", element) for the text
    after an element. Headings nest in sections (Sphinx) or in title wrappers (DocBook), so the
    walk goes up from `start` and down into the element that holds `end`.
    """
    pieces: list[tuple[str, Any]] = [("tail", start)]
    holders = [] if end is None else [end, *end.iterancestors()]
    node = start
    while node is not root:
        for sib in node.itersiblings():
            if any(sib is h for h in holders):
                _pieces_until(sib, end, pieces)
                return pieces
            pieces.append(("el", sib))
        node = node.getparent()
        if node is None or node is root:
            break
        pieces.append(("tail", node))
    return pieces


def _pieces_until(el: Any, end: Any, pieces: list[tuple[str, Any]]) -> None:
    while el is not end:
        pieces.append(("text", el))
        for child in el:
            if child is end or _contains(child, end):
                el = child
                break
            pieces.append(("el", child))
        else:
            return


def _remove_pieces(pieces: list[tuple[str, Any]]) -> None:
    for kind, el in pieces:
        if kind == "el":
            el.tail = None
            if el.getparent() is not None:
                el.getparent().remove(el)
        else:
            setattr(el, kind, None)


# ---------------------------------------------------------------- Markdown


def markdown(parts: list) -> str:
    """Markdown of the content of lxml elements, or of `range_pieces` parts: headings, lists, tables,
    link text, and fenced code blocks whose lines are the page's `<pre>` text as it is, with its language.

    An element's content, not the element: an answer in a `<dd>` or `<li>` is not a list item.
    """
    import html as htmllib

    from lxml import html as lxml_html

    pieces = []
    for part in parts:
        pieces += [part] if isinstance(part, tuple) else [("text", part), *(("el", c) for c in part)]
    chunks = []
    for kind, el in pieces:
        if kind == "el":
            chunks.append(lxml_html.tostring(el, encoding="unicode", with_tail=False))
        chunks.append(htmllib.escape((el.text if kind == "text" else el.tail) or ""))
    return _converter().convert("".join(chunks)).strip()


@functools.cache
def _converter() -> Any:
    from markdownify import MarkdownConverter

    class DocsConverter(MarkdownConverter):
        """markdownify, with a `<br>` inside `<pre>` a plain newline (Docusaurus writes code lines so)."""

        def convert_br(self, el: Any, text: str, parent_tags: set) -> str:
            return "\n" if "pre" in parent_tags else super().convert_br(el, text, parent_tags)

        def convert_pre(self, el: Any, text: str, parent_tags: set) -> str:
            """A fence longer than any run of backticks in the code (a Markdown tutorial shows fences)."""
            out = super().convert_pre(el, text, parent_tags)
            longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=0)
            if not longest:
                return out
            fence = "`" * (longest + 1)
            head, _, rest = out.partition("```")
            body, _, tail = rest.rpartition("```")
            return head + fence + body + fence + tail

    # bs4 on lxml: a third faster than on html.parser, and lxml reads the pages already.
    return DocsConverter(
        heading_style="atx",
        bullets="-",
        strip=["a", "img"],
        escape_underscores=False,
        escape_asterisks=False,
        code_language_callback=code_language,
        bs4_options="lxml",
    )


_LANGUAGE_CLASS = re.compile(r"^(?:language|lang|highlight-source|highlight)-([A-Za-z0-9_+#.-]+)$")


def code_language(pre: Any) -> str | None:
    """The language a code block's classes name (Sphinx `highlight-python`, MkDocs `language-python`,
    GitHub `highlight-source-python`), on the `<pre>`, its `<code>` or the two elements around it."""
    code = pre.find("code")
    for el in [pre, code, pre.parent, pre.parent.parent if pre.parent else None]:
        for cls in (el.get("class") or []) if el is not None else []:
            m = _LANGUAGE_CLASS.match(cls)
            if m and m.group(1) not in ("default", "none", "notranslate"):
                return m.group(1)
    return None


# ---------------------------------------------------------------- documents

# Link text outside navigation blocks (page_furniture takes those out already).
_LINK_TEXT = ".//a//text()"


_LIST_MARK = re.compile(r"^(?:[-*+]|\d+\.)\s+")


def _chars(texts: list[str]) -> int:
    return sum(len("".join(t.split())) for t in texts)


def _doc_item(sel: Selector, source: CrawlSource, min_doc_chars: int) -> tuple[dict | None, tuple[str, str]]:
    title_el = select(sel, source.title_css) if source.title_css.strip() else []
    if title_el:
        title = " ".join(block_lines(title_el[0].root))
    else:
        title = " ".join(sel.css("title::text").get("").split())
    category = None
    if source.text_css.strip():
        matches = select(sel, source.text_css)
        if not matches:
            return None, ("no_content", "the text selector matched nothing")
        lines = markdown([m.root for m in matches]).split("\n")
        # Counted on the page's text, not on the Markdown, whose list and table marks are not text.
        all_chars = sum(_chars(m.xpath(".//text()").getall()) for m in matches)
        own_chars = all_chars - sum(_chars(m.xpath(_LINK_TEXT).getall()) for m in matches)
        category = matches[0].xpath("ancestor-or-self::*[@data-category][1]/@data-category").get()
    else:
        lines = _trafilatura_lines(sel.get())
        # trafilatura drops the links; a line that is only a link's text is navigation, not text.
        links = {" ".join("".join(a.xpath(".//text()").getall()).split()) for a in sel.css("body a")}
        all_chars = _chars(lines)
        own_chars = _chars([line for line in lines if _LIST_MARK.sub("", line) not in links])
    if lines and lines[0].lstrip("#").strip() == title:  # the heading is the title field already
        all_chars, own_chars = all_chars - _chars([title]), own_chars - _chars([title])
        lines = lines[1:]
    text = "\n".join(lines).strip()
    if not text or all_chars <= 0 or all(line.startswith("#") for line in text.split("\n") if line.strip()):
        return None, ("no_content", "no text besides the title and headings")
    if own_chars < min_doc_chars:
        return None, (
            "navigation_only",
            f"{max(own_chars, 0)} characters outside links, fewer than crawl.min_doc_chars {min_doc_chars}",
        )
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
    from w3lib.encoding import (
        html_body_declared_encoding,
        http_content_type_encoding,
        read_bom,
        resolve_encoding,
    )

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
        self.rejects.append(
            reject(
                loser["url"], loser["source"], "duplicate", f"same content as {winner['url']}", content_hash=h
            )
        )
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
                    return scrapy.Request(
                        url,
                        callback=self.parse,
                        errback=self.on_error,
                        dont_filter=True,
                        meta={"tl_depth": depth, "links_only": True},
                    )
                return None
            if len(self.depth) >= self.source.max_pages:
                self.crawler.stats.inc_value("tuneline/links_over_max_pages")
                return None
            self.depth[key] = depth
            # dont_filter: the dict above already dedups pages; scrapy's dupefilter would drop the
            # second hop of a redirect loop silently instead of letting REDIRECT_MAX_TIMES report it.
            return scrapy.Request(
                url, callback=self.parse, errback=self.on_error, dont_filter=True, meta={"tl_depth": depth}
            )

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
                try:
                    items, lost = page_items(response.selector, self.source, self.min_doc_chars)
                except Exception as err:  # one page's markup or selector must not stop the crawl, nor vanish
                    self.crawler.stats.inc_value("tuneline/parse_errors")
                    items, lost = [], [("parse_error", f"{type(err).__name__}: {err}"[:300])]
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
    from scrapy.exceptions import (
        CannotResolveHostError,
        DownloadCancelledError,
        DownloadConnectionRefusedError,
        DownloadTimeoutError,
        IgnoreRequest,
    )
    from scrapy.spidermiddlewares.httperror import HttpError
    from twisted.internet import defer
    from twisted.internet import error as txerror

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


def run_crawl(
    p: Crawl, sources: list[CrawlSource], http_cache_dir: str | Path, uncached: frozenset[str] = frozenset()
) -> CrawlResult:
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
    return sorted(
        items,
        key=lambda i: (
            i["url"],
            i["kind"],
            i.get("question", i.get("title", "")),
            i.get("answer", i.get("text", "")),
        ),
    )


def sorted_rejects(rejects: list[dict]) -> list[dict]:
    return sorted(rejects, key=lambda r: (r["url"], r["source"], r["reason"], r["detail"]))


def rebase_urls(result: CrawlResult, served_url: str, site_dir: str) -> CrawlResult:
    """The result with the bundled site's server URL (a new port each run) replaced by its folder.

    `http://127.0.0.1:PORT/faq/a.html` becomes `data/site/faq/a.html`: stable across runs, and it
    names the file the record came from.
    """
    prefix = site_dir.rstrip("/") + "/"

    def fix(record: dict) -> dict:
        return {
            k: v.replace(served_url, prefix) if k in ("url", "detail") and isinstance(v, str) else v
            for k, v in record.items()
        }

    return CrawlResult(
        sorted_items(map(fix, result.items)), sorted_rejects([fix(r) for r in result.rejects]), result.stats
    )


def empty_sources(sources: list[CrawlSource], metrics: dict, rejects: list[dict]) -> list[str]:
    """A message for each source that gave no record and does not say `allow_empty: true`: a dead
    start URL or selectors that match nothing must fail the stage, not pass with 0 pages."""
    found = []
    for i, s in enumerate(sources):
        counts = metrics["sources"].get(s.name, {})
        if counts.get("items", 0) or s.allow_empty:
            continue
        why = Counter(r["reason"] for r in rejects if r["source"] == s.name)
        found.append(
            f"crawl.sources[{i}] ({s.name}) gave no record: {counts.get('pages', 0)} pages fetched, "
            f"rejects {dict(sorted(why.items()))}; check its start_urls and selectors "
            f"(data/raw/crawl_rejects.jsonl has each reason), or set crawl.sources[{i}].allow_empty: true"
        )
    return found


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
        "parse_errors": total("tuneline/parse_errors"),
        "items": len(result.items),
        "items_by_kind": dict(sorted(Counter(i["kind"] for i in result.items).items())),
        "rejects": len(result.rejects) + len(dataset_rejects),
        "rejects_by_reason": dict(
            sorted(Counter(r["reason"] for r in result.rejects + dataset_rejects).items())
        ),
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
        raise _dataset_error(
            d, f"{d.path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
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
                    d,
                    f"{d.path}:{line_no}: not UTF-8 text (byte {err.start} of the line: {err.reason}); save "
                    f"it as UTF-8",
                ) from None
            seen_text = seen_text or bool(line.strip())
            yield line_no, line
    if not seen_text:
        raise _dataset_error(d, f"{d.path} is empty; remove the entry from crawl.datasets or fill the file")


def _jsonl_rows(
    d: CrawlDataset, lines: Iterable[tuple[int, str]]
) -> tuple[list[tuple[str, dict]], list[dict]]:
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
            rejects.append(
                reject(
                    where, f"dataset:{d.name}", "bad_json", f"expected a JSON object, got {_type_name(value)}"
                )
            )
            continue
        rows.append((where, value))
    return rows, rejects


def _json_rows(d: CrawlDataset, text: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise _dataset_error(
            d,
            f"{d.path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
            "fix the file (format: json is one JSON array of objects; use format: jsonl "
            "for one object per line, where a bad line is rejected and the rest kept)",
        ) from None
    if not isinstance(value, list):
        raise _dataset_error(d, f"{d.path}: expected a JSON array of objects, got {_type_name(value)}")
    rows, rejects = [], []
    for index, row in enumerate(value):
        where = f"{d.path}#row{index}"
        if isinstance(row, dict):
            rows.append((where, row))
        else:
            rejects.append(
                reject(
                    where, f"dataset:{d.name}", "bad_json", f"expected a JSON object, got {_type_name(row)}"
                )
            )
    return rows, rejects


def _csv_rows(d: CrawlDataset, text: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, rejects = [], []
    line_no = 2  # the line the next row starts on (line 1 is the header)
    for row in reader:
        where = f"{d.path}:{line_no}"
        line_no = reader.line_num + 1
        if None in row or None in row.values():
            rejects.append(
                reject(
                    where,
                    f"dataset:{d.name}",
                    "bad_csv",
                    f"{len(reader.fieldnames or [])} columns in the header, a different number in this row",
                )
            )
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
    """Fail when a mapped column is not in the data, suggesting the one meant (`Instruction` for
    `instruction`).

    An optional column (anything but instruction and output) that the file lacks is empty for
    this file, unless the file has it in another case: that is a misspelt mapping.
    """
    for field_, col in d.columns.items():
        if not col or col in columns:
            continue
        same = [c for c in columns if c.casefold() == col.casefold()]
        if field_ not in ("instruction", "output") and not same:
            continue
        close = same or difflib.get_close_matches(col, columns, n=1)
        hint = f"; did you mean {close[0]!r}? (column names are case-sensitive)" if close else ""
        raise _dataset_error(
            d,
            f"column {col!r} (mapped to {field_}) is not in {d.path}{hint}; its columns are "
            f"{', '.join(columns)}",
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
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in value
        )
        return None if pairs else "history: expected a list of [user, assistant] string pairs"
    return None


# Lone surrogates (valid in JSON as "\ud800", not in UTF-8) and C0 controls other than tab and newlines.
_BAD_CHARS = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _unicode_problem(field_: str, value: Any) -> str | None:
    """Why a value's text is not valid text: the field, the character and where (None: it is)."""
    strings = [value] if isinstance(value, str) else []
    if field_ == "history" and value:
        strings = [x for pair in value for x in pair]
    for text in strings:
        if m := _BAD_CHARS.search(text):
            kind = "lone surrogate" if "\ud800" <= m.group() <= "\udfff" else "control character"
            return f"{field_}: {kind} U+{ord(m.group()):04X} at character {m.start()}"
    return None


def _case_hint(d: CrawlDataset, row: dict) -> str:
    """'; the row has 'Instruction' ...' when a mapped required column is in the row in another case."""
    for field_ in ("instruction", "output"):
        col = d.columns.get(field_) or ""
        if col not in row:
            same = [k for k in row if k.casefold() == col.casefold()]
            if same:
                return (
                    f"; the row has {same[0]!r}, not the mapped {col!r} ({field_}): "
                    "column names are case-sensitive"
                )
    return ""


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
        bad = [q for f, col in d.columns.items() if col and (q := _unicode_problem(f, row.get(col)))]
        if bad:  # a lone surrogate cannot be written as UTF-8; control characters are not text
            rejects.append(reject(where, f"dataset:{d.name}", "bad_unicode", "; ".join(bad)))
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
            rejects.append(
                reject(
                    where,
                    f"dataset:{d.name}",
                    "empty_field",
                    "instruction or output is empty" + _case_hint(d, row),
                )
            )
            continue
        rec["source"] = f"dataset:{d.name}"
        category = row.get(d.columns["category"]) if d.columns.get("category") else None
        if category not in (None, ""):
            rec["category"] = str(category).strip()
        rec["row"] = where
        records.append(rec)
    return with_ids(records), rejects


def load_datasets(entries: list[CrawlDataset]) -> tuple[list[dict], list[dict]]:
    """All `crawl.datasets` as Alpaca records (same content kept once) plus rejects.

    Records come in arrival order (params order, then row order), which the stage's shards are cut
    in; `dataset_order` is the order within a shard. Of records with the same content the first is
    kept; the others are rejected as `duplicate` with `duplicate_of` naming the kept record's id.
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
                rejects.append(
                    reject(
                        rec["row"],
                        rec["source"],
                        "duplicate",
                        f"same content as {kept['row']}",
                        content_hash=rec["content_hash"],
                        id=rec["id"],
                        duplicate_of=kept["id"],
                    )
                )
            else:
                records[rec["content_hash"]] = rec
    return list(records.values()), sorted_rejects(rejects)


def dataset_order(record: dict) -> tuple:
    """The order of dataset records within a shard of datasets/: by source, instruction, id."""
    return record["source"], record["instruction"], record["id"]
