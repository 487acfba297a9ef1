"""The pull-request report: did this change make the model better?

It opens with a summary of three lines: for each headline metric, the tuned model at the revision ->
the tuned model now, with a paired interval over the records both scored and a verdict. Then the
verdict: each evaluation delta (tuned - base) with its 95% paired bootstrap
interval and one word (better / worse / within noise), beside the same delta at the revision
compared against, and the LLM judge's rates when the judge ran. Then the params that changed
(`dvc params diff --md`), then the other metrics that changed (`dvc metrics diff --md` less
eval.json, which the verdict shows) folded in `<details>`, timings and throughput (rows and
curves) left out unless asked for, and the training curves as PNG
images rendered from DVC's own plot specs (`dvc plots diff --json`, through vl-convert), which CML
uploads with the comment (`cml comment create report.md`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

# The summary's metrics: (set, metric, the per-record file of that set, its column).
from tuneline.common import timings
from tuneline.eval import intervals

# The summary's metrics: (set, metric, the per-record file of that set, its column).
HEADLINE = (
    ("unseen", "loss", "records.jsonl", "tuned_loss"),
    ("unseen", "rouge_l", "records.jsonl", "tuned_rouge_l"),
    ("seen", "rouge_l", "seen_records.jsonl", "tuned_rouge_l"),
)
# The training curves worth a picture: loss (train and validation) and the learning rate, not epoch or tokens
# seen.
CURVES = re.compile(r"(^|/)(loss|learning_rate)\.tsv$")

# Rows of `dvc metrics diff` about how long or how fast, not how good (the timings files, and the
# Trainer's floating-point operation count): left out unless asked for.
TIMING = re.compile(rf"{timings.TIMING.pattern}|flos")


def dvc(*args: str, cwd: str | Path = ".") -> str:
    """The standard output of a dvc command (the dvc installed beside tuneline); a failure raises with its
    message."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def json_at(rev: str, path: str, cwd: str | Path = ".") -> dict | None:
    """The JSON file `path` as committed at `rev` (metrics are git-tracked), or None where it is not."""
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def jsonl_at(rev: str, path: str, cwd: str | Path = ".") -> list[dict] | None:
    """The JSON-lines file `path` as committed at `rev`, or None where it is not."""
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def paired_change(before: list[dict], now: list[dict], column: str, seed: int) -> dict | None:
    """Mean of `column` at the revision and now over the records both scored (paired by id), the
    95% bootstrap interval of the change and its verdict; None when no record has it on both sides."""
    old = {r["id"]: r[column] for r in before if column in r}
    pairs = [(old[r["id"]], r[column]) for r in now if column in r and r["id"] in old]
    if not pairs:
        return None
    was, new = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    idx = intervals.resample_indexes(len(pairs), seed)
    interval = intervals.percentile_interval((new - was)[idx].mean(1))
    metric = column.removeprefix("tuned_")
    return {
        "before": float(was.mean()),
        "now": float(new.mean()),
        "delta": float((new - was).mean()),
        "ci95": interval,
        "verdict": intervals.verdict(metric, interval),
        "records": len(pairs),
    }


def summary_lines(metrics_dir: str, rev: str, seed: int, cwd: str | Path = ".") -> list[str]:
    """The report's first lines: each headline metric of the tuned model at `rev` -> now, paired."""
    lines = []
    for set_name, metric, file, column in HEADLINE:
        path = f"{metrics_dir}/eval/{file}"
        now_file = Path(cwd) / path
        now = (
            [json.loads(x) for x in now_file.read_text(encoding="utf-8").splitlines() if x.strip()]
            if now_file.is_file()
            else None
        )
        before = jsonl_at(rev, path, cwd)
        change = paired_change(before, now, column, seed) if now and before else None
        if change is None:
            lines.append(
                f"- **{set_name} {metric}**: no per-record scores to pair "
                f"({'at `' + rev + '`' if now else 'in the workspace: run `dvc repro`'})"
            )
            continue
        ci = change["ci95"]
        mean = " (mean over records)" if metric == "loss" else ""
        lines.append(
            f"- **{set_name} {metric}**{mean}: tuned at `{rev}` {change['before']:.4f} -> tuned now "
            f"{change['now']:.4f}, {change['delta']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] over the "
            f"same "
            f"{change['records']} records: **{change['verdict']}**"
        )
    return lines


def verdict_rows(now: dict) -> list[list[str]]:
    """[set, metric, base, tuned, delta with interval, verdict] for each metric of eval.json."""
    rows = []
    for name, result in now.items():
        if not isinstance(result, dict) or "delta" not in result:
            continue
        for key, delta in result["delta"].items():
            rows.append(
                [
                    name,
                    key,
                    f"{result['base'][key]:.4f}",
                    f"{result['tuned'][key]:.4f}",
                    _delta(delta, result.get("delta_ci95", {}).get(key)),
                    result.get("verdict", {}).get(key, "no interval"),
                ]
            )
    return rows


def text_table(rows: list[list[str]]) -> str:
    """Rows as aligned plain-text columns, the first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def verdict_text(now: dict) -> str:
    """eval.json as an aligned plain-text table, for the terminal (`tuneline verdict`, the end of `make
    run`)."""
    if "skipped" in now:
        return "Evaluation skipped: an API model was chosen and is used as is (see metrics/select_table.md)."
    table = text_table(
        [["set", "metric", "base", "tuned", "tuned - base [95% interval]", "verdict"], *verdict_rows(now)]
    )
    return (
        table
        + "\nseen: training records (did fine-tuning take?); unseen: the test split (does it generalise?)"
    )


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def experiment_runs(shown: list[dict]) -> list[tuple[str, dict, dict]]:
    """(name, params.yaml flattened, metrics by file) of each commit and experiment of `dvc exp show
    --json`."""
    runs = []
    for commit in shown:
        entries = [
            (
                commit.get("name") or commit["rev"][:7] if commit["rev"] != "workspace" else "workspace",
                commit.get("data"),
            )
        ]
        entries += [
            (rev.get("name") or rev["rev"][:7], rev.get("data"))
            for exp in commit.get("experiments") or []
            for rev in exp.get("revs", [])
        ]
        for name, data in entries:
            if data:
                runs.append(
                    (
                        name,
                        _flat((data.get("params") or {}).get("params.yaml", {}).get("data") or {}),
                        {path: m.get("data") or {} for path, m in (data.get("metrics") or {}).items()},
                    )
                )
    return runs


def experiments_rows(shown: list[dict], eval_path: str) -> list[list[str]]:
    """A table of the runs: the params that differ between them and the tuned model's headline
    metrics, each with its verdict against the base; timings are left out."""
    runs = experiment_runs(shown)
    changed = sorted({k for _, p, _ in runs for k in p if len({repr(q.get(k)) for _, q, _ in runs}) > 1})
    header = ["experiment", *changed, *(f"{s} {m}" for s, m, _, _ in HEADLINE)]
    rows = [header]
    for name, p, metrics in runs:
        ev = metrics.get(eval_path, {})
        cells = []
        for set_name, metric, _, _ in HEADLINE:
            value = ev.get(set_name, {}).get("tuned", {}).get(metric)
            word = ev.get(set_name, {}).get("verdict", {}).get(metric)
            cells.append("-" if value is None else f"{value:.4f}" + (f" ({word})" if word else ""))
        rows.append([name, *(str(p.get(k, "-")) for k in changed), *cells])
    return rows


def experiments_table(metrics_dir: str, all_commits: bool = False, cwd: str | Path = ".") -> str:
    """`tuneline exps`: the experiments of HEAD (or of every commit) as an aligned table."""
    shown = json.loads(dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else []), cwd=cwd))
    return text_table(experiments_rows(shown, f"{metrics_dir}/eval.json")) + (
        "\ntuned model's metrics, each with its verdict against the base; `dvc exp show` has every column"
    )


def _delta(value: float, interval: dict | None) -> str:
    shown = f"{value:+.4f}"
    return shown + (f" [{interval['low']:+.4f}, {interval['high']:+.4f}]" if interval else "")


def verdict_section(now: dict | None, before: dict | None, rev: str) -> str:
    """The report's first section, from eval.json in the workspace (`now`) and at `rev` (`before`)."""
    if now is None:
        return "No evaluation in the workspace: run `dvc repro` first."
    if "skipped" in now:
        return "Evaluation skipped: an API model was chosen and is used as is (see metrics/select_table.md)."
    lines = [
        f"Tuned vs base, with the 95% paired bootstrap interval of the difference; `{rev}` shows the same at "
        f"that revision.",
        "",
        f"| set | metric | base | tuned | tuned - base [95% interval] | verdict | at `{rev}` |",
        "|---|---|---|---|---|---|---|",
    ]
    judge_lines = []
    for name, result in now.items():
        if not isinstance(result, dict):
            continue
        was = (before or {}).get(name) or {}
        for key, delta in result.get("delta", {}).items():
            interval = result.get("delta_ci95", {}).get(key)
            word = result.get("verdict", {}).get(key, "no interval")
            if key in was.get("delta", {}):
                old = f"{_delta(was['delta'][key], None)} ({was.get('verdict', {}).get(key, 'no interval')})"
                old = old if was["delta"][key] != delta else "same"
            else:
                old = "new"
            lines.append(
                f"| {name} | {key} | {result['base'][key]:.4f} | {result['tuned'][key]:.4f} | "
                f"{_delta(delta, interval)} | **{word}** | {old} |"
            )
        if "judge" in result:
            j = result["judge"]
            net = j.get("net_win_ci95")
            judge_lines.append(
                f"LLM judge on {name} ({j['pairs']} pairs, each judged in both orders): the tuned model wins "
                f"{j['win']:.0%}, "
                f"ties {j['tie']:.0%}, loses {j['loss']:.0%}, unparsed {j['unparsed']:.0%}; position "
                f"consistency "
                + (f"{j['position_consistency']:.0%}" if j["position_consistency"] is not None else "n/a")
                + (f"; win - loss 95% interval [{net['low']:+.2f}, {net['high']:+.2f}]" if net else "")
                + "."
            )
    if len(lines) == 4:  # no metric had a delta: a line, not an empty table
        lines = ["No tuned-vs-base deltas in eval.json."]
    return "\n".join(
        lines + ([""] + judge_lines if judge_lines else ["", "LLM judge: off (evaluate.judge.enabled)."])
    )


def other_metrics(metrics_md: str, eval_path: str, timings: bool = False) -> str:
    """`dvc metrics diff --md` without the rows of `eval_path` (the verdict shows them) and, unless
    `timings`, without the rows of timings and throughput."""
    kept = []
    for line in metrics_md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (
            line.startswith("|")
            and len(cells) > 1
            and (cells[0] == eval_path or (not timings and TIMING.search(cells[1])))
        ):
            continue
        kept.append(line)
    return "\n".join(kept)


def render(
    rev: str,
    verdict_md: str,
    params_md: str,
    metrics_md: str,
    images: list[str],
    timings: bool = False,
    summary: list[str] | None = None,
) -> str:
    """The report's Markdown: the summary and the verdict first, then params, the other metrics
    (`other_metrics`) folded, the curves; a section with nothing in it says so in one line, no empty table."""
    other = (
        [
            "<details><summary>Other metrics changed"
            + ("" if timings else " (timings left out; `tuneline report --timings` shows them)")
            + "</summary>",
            "",
            metrics_md.strip(),
            "",
            "</details>",
        ]
        if _has_rows(metrics_md)
        else ["No other metrics changed."]
    )
    return "\n".join(
        [
            f"# tuneline report: workspace vs `{rev}`",
            "",
            *(summary or []),
            "",
            "## Verdict",
            "",
            verdict_md,
            "",
            "## Params changed",
            "",
            params_md.strip() if _has_rows(params_md) else "No params changed.",
            "",
            *other,
            "",
            "## Training curves",
            "",
            *(
                [f"![{Path(i).stem}]({i})" for i in images]
                or [f"No training curves (`dvc plots diff {rev}` shows none)."]
            ),
            "",
        ]
    )


def _has_rows(table_md: str) -> bool:
    """True when a Markdown table has a row below its header and separator."""
    return sum(line.lstrip().startswith("|") for line in table_md.splitlines()) > 2


def render_curves(
    rev: str, plots_dir: str | Path, prefix: str, cwd: str | Path = ".", timings: bool = False
) -> list[str]:
    """PNG images of the plots under `prefix` (workspace and `rev` overlaid), as DVC specifies them,
    timing and throughput curves only with `timings`; their paths relative to `cwd`."""
    import vl_convert

    specs = json.loads(dvc("plots", "diff", rev, "--json", cwd=cwd)).get("data", {})
    out = Path(cwd) / plots_dir
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for plot_id, plots in sorted(specs.items()):
        if not plot_id.startswith(prefix):
            continue
        for plot in plots:
            if plot.get("type") != "vega":
                continue
            # DVCLive writes <dir>/plots/metrics/<name>.tsv (train/loss.tsv, eval/loss.tsv): name the image
            # after <name>
            curve = plot_id.removeprefix(prefix).split("plots/metrics/")[-1]
            name = re.sub(r"[^\w.-]+", "_", curve.strip("/")).removesuffix(".tsv") + ".png"
            if not timings and TIMING.search(name.removesuffix(".png")):
                continue
            if not CURVES.search(curve) and not (timings and TIMING.search(curve)):
                continue
            (out / name).write_bytes(vl_convert.vegalite_to_png(plot["content"], scale=1))
            images.append(f"{Path(plots_dir).as_posix()}/{name}")
    return images


def write_report(
    rev: str,
    out: str | Path = "report.md",
    plots_dir: str = "report_plots",
    cwd: str | Path = ".",
    timings: bool = False,
) -> Path:
    """Write the report comparing the workspace with `rev`; return its path."""
    from tuneline.common import params

    base = params.section("base", path=Path(cwd) / params.PARAMS_FILE)
    eval_path = f"{base.metrics_dir}/eval.json"
    now_file = Path(cwd) / eval_path
    now = json.loads(now_file.read_text(encoding="utf-8")) if now_file.is_file() else None
    verdict_md = verdict_section(now, json_at(rev, eval_path, cwd), rev)
    summary = summary_lines(base.metrics_dir, rev, base.seed, cwd)
    params_md = dvc("params", "diff", rev, "--md", cwd=cwd)
    metrics_md = other_metrics(dvc("metrics", "diff", rev, "--md", cwd=cwd), eval_path, timings)
    if timings:  # not declared as metrics (dvc.yaml), so named here
        timings_md = dvc(
            "metrics", "diff", rev, "--md", "-R", "--targets", f"{base.metrics_dir}/timings", cwd=cwd
        )
        metrics_md = "\n\n".join(t.strip() for t in (metrics_md, timings_md) if _has_rows(t))
    images = render_curves(rev, plots_dir, f"{base.metrics_dir}/train/", cwd, timings)
    path = Path(cwd) / out
    path.write_text(
        render(rev, verdict_md, params_md, metrics_md, images, timings, summary), encoding="utf-8"
    )
    return path
