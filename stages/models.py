"""Build the small offline base models that stand in for hub models.

Reads:  base.seeds and base.site_dir (the bundled text the tokenizer is trained on), `models:`.
Writes: base.base_models_dir/<name>/ for each entry of models.tiny: config, safetensors weights,
        tokenizer with its chat template, all loadable with `from_pretrained(path)`.
Run:    python -m stages.models
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lxml.html

from tuneline import params
from tuneline.records import read_jsonl
from tuneline.tinymodels import build_tiny_model


def corpus(seeds_path: str, site_dir: str) -> list[str]:
    """The bundled text, in a stable order: seed records, then the visible text of the site pages."""
    texts = []
    for record in read_jsonl(seeds_path):
        texts.append(record.get("system") or "")
        for user, answer in record.get("history") or []:
            texts += [user, answer]
        texts += [record["instruction"], record.get("input") or "", record["output"]]
    for page in sorted(Path(site_dir).rglob("*.html")):
        texts.append(lxml.html.fromstring(page.read_bytes()).text_content())
    return [t for t in texts if t.strip()]


def main() -> None:
    base, p = params.load("base", "models")
    texts = corpus(base.seeds, base.site_dir)
    out_root = Path(base.base_models_dir)
    shutil.rmtree(out_root, ignore_errors=True)
    for name, spec in p.tiny.items():
        n = build_tiny_model(spec, texts, p.vocab_size, base.seed, out_root / name)
        print(f"models: built {name} ({spec.arch}, {n / 1e6:.2f}M parameters) in {out_root / name}")


if __name__ == "__main__":
    main()
