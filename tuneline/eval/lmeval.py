"""Standard benchmarks through lm-evaluation-harness: what did fine-tuning make the model forget?

evaluate.lm_eval_tasks names lm-evaluation-harness tasks (hub tasks such as mmlu, cmmlu or
ceval-valid where there is network, or local task YAMLs in evaluate.lm_eval_include_path). Each is
run with `lm_eval.simple_evaluate` on the base and on the tuned model, the very models the evaluate
stage scored (lm_eval's `hf` model type, given the loaded model and tokenizer), and eval.json gets
each task's metrics for both with lm_eval's standard errors, the delta, its 95% interval and a verdict.
lm_eval is an optional extra (`pip install -e '.[lmeval]'`): it is imported only when tasks are named.
"""

from __future__ import annotations

import functools
import math
import os

from tuneline.common.params import ParamsError

# lm_eval's bootstrap of a metric's standard error forks a process pool per metric; in a stage
# that holds a model in memory it runs in-process instead.
os.environ.setdefault("DISABLE_MULTIPROC", "1")

# The resamples behind lm_eval's bootstrapped standard errors (perplexity, BLEU); its default is
# 100,000. Means (acc) have a closed-form standard error.
BOOTSTRAP_ITERS = 1000
Z95 = 1.959964


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str,
    num_fewshot: int | None,
    limit: int | None,
    chat_template: bool,
    batch_size: int,
    seed: int,
) -> dict[str, dict]:
    """Each requested task's metrics of `model`: {"<task>/<metric>": {"value", "stderr", "higher_is_better",
    "documents"}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(tuple(tasks), include_path),
        bootstrap_iters=BOOTSTRAP_ITERS,
        apply_chat_template=chat_template,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return task_scores(results, tasks)


@functools.cache
def task_manager(tasks: tuple[str, ...], include_path: str):
    """lm_eval's index of task YAMLs, built once per stage (base and tuned share it): of include_path
    alone when it holds every requested task, else of lm_eval's own tasks too, whose thousands of
    YAMLs take about 20 s to index on 2 CPU cores."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=include_path)


def task_scores(results: dict, tasks: list[str]) -> dict[str, dict]:
    """The metrics of the requested tasks (a group such as mmlu: its aggregate, not its subtasks) from
    simple_evaluate's results. lm_eval keys a metric "<metric>,<filter>"; the filter is kept in the
    name only when it is not "none" (gsm8k's "exact_match,strict-match")."""
    out = {}
    for task in tasks:
        values = results.get("groups", {}).get(task) or results["results"].get(task)
        if values is None:
            raise ParamsError(f"evaluate.lm_eval_tasks: lm_eval returned no results for {task!r}")
        better = results.get("higher_is_better", {}).get(task, {})
        documents = results.get("n-samples", {}).get(task, {}).get("effective")  # a group has none of its own
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = f"{task}/{metric}" + (f",{filt}" if filt != "none" else "")
            out[name] = {
                "value": round(float(value), 6),
                "stderr": round(float(stderr), 6) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": better.get(metric),
                "documents": documents,
            }
    return out


def compare(base: dict[str, dict], tuned: dict[str, dict]) -> dict:
    """eval.json's `lm_eval` section, shaped like a set's: base, tuned, delta, delta_ci95, verdict,
    each score's standard error and the documents it was computed on (null for a group). The
    interval is delta +/- 1.96 x sqrt(se_base^2 + se_tuned^2): lm_eval reports unpaired standard
    errors, so it is wider than a paired one; a metric without a standard error gets no interval,
    and one whose direction lm_eval does not give, no verdict."""
    out: dict = {
        "base": {},
        "tuned": {},
        "delta": {},
        "delta_ci95": {},
        "verdict": {},
        "stderr": {"base": {}, "tuned": {}},
        "documents": {},
    }
    for name in base:
        b, t = base[name], tuned[name]
        out["base"][name], out["tuned"][name] = b["value"], t["value"]
        delta = t["value"] - b["value"]
        out["delta"][name] = round(delta, 6)
        out["stderr"]["base"][name], out["stderr"]["tuned"][name] = b["stderr"], t["stderr"]
        out["documents"][name] = b.get("documents")
        if b["stderr"] is None or t["stderr"] is None or math.isnan(b["stderr"]) or math.isnan(t["stderr"]):
            continue
        half = Z95 * math.hypot(b["stderr"], t["stderr"])
        out["delta_ci95"][name] = {"low": round(delta - half, 6), "high": round(delta + half, 6)}
        if b["higher_is_better"] is not None:
            out["verdict"][name] = verdict(out["delta_ci95"][name], b["higher_is_better"])
    return out


def verdict(interval: dict[str, float], higher_is_better: bool) -> str:
    """'better', 'worse' or 'within noise': whether the delta's interval leaves out 0, and on which side."""
    if interval["low"] <= 0 <= interval["high"]:
        return "within noise"
    return "better" if (interval["low"] > 0) == higher_is_better else "worse"
