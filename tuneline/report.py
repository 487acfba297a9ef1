"""The pull-request report: what changed in params and metrics against a revision, with the curves.

It is DVC's own output (`dvc params diff --md`, `dvc metrics diff --md`, `dvc plots diff`)
gathered into one Markdown file that CI posts as a comment on the pull request.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def dvc(*args: str, cwd: str | Path = ".") -> str:
    """The standard output of a dvc command; a failure raises with its message."""
    result = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def render(rev: str, params_md: str, metrics_md: str, plots_dir: str) -> str:
    """The report's Markdown from the diffs' Markdown."""
    return "\n".join([
        f"# tuneline report: workspace vs `{rev}`",
        "",
        "## Params changed",
        "",
        params_md.strip() or "No params changed.",
        "",
        "## Metrics changed",
        "",
        metrics_md.strip() or "No metrics changed.",
        "",
        "## Training curves",
        "",
        f"`dvc plots diff {rev}` rendered to [{plots_dir}/index.html]({plots_dir}/index.html).",
        "",
    ])


def write_report(rev: str, out: str | Path = "report.md", plots_dir: str = "report_plots", cwd: str | Path = ".") -> Path:
    """Write the report comparing the workspace with `rev`; return its path."""
    params_md = dvc("params", "diff", rev, "--md", cwd=cwd)
    metrics_md = dvc("metrics", "diff", rev, "--md", cwd=cwd)
    dvc("plots", "diff", rev, "--out", plots_dir, cwd=cwd)
    path = Path(cwd) / out
    path.write_text(render(rev, params_md, metrics_md, plots_dir), encoding="utf-8")
    return path
