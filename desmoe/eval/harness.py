"""General-ability benchmarks through lm-evaluation-harness (``desmoe eval --tasks``), on the trained model as it
routes (ALR included) or on an export, next to the held-out losses.

lm-eval is an optional extra (``pip install 'desmoe[eval]'``). Its tasks are used as lm-eval defines them; a
task of your own (a YAML and a local JSONL) is found with ``--include-path DIR``. Nothing is downloaded by desmoe:
a task whose dataset is on the hub needs it in the local HF cache.
"""
from __future__ import annotations


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"desmoe eval --tasks needs lm-evaluation-harness: pip install 'desmoe[eval]' "
                          f"(the lm-eval package) ({e})") from None
    return lm_eval, HFLM, TaskManager


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              batch_size: int = 1, device="cpu") -> dict:
    """``{task: {metric: value}}`` of lm-eval ``tasks`` on ``model`` (a loaded transformers model, patched or
    stock). Unknown task names are a ``ValueError`` naming them."""
    import os

    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"--tasks: expected comma-separated lm-eval task names, got {tasks!r}")
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"--include-path: {include_path!r} is not a directory (a folder of lm-eval task YAMLs)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: expected an int >= 1, got {limit!r}")
    lm_eval, HFLM, TaskManager = _harness()
    tm = TaskManager(include_path=include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {unknown}"
                         + ("" if include_path else "; a task of your own needs --include-path DIR (its YAML)"))
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=False)
    res = {}
    for task in tasks:
        row = out["results"].get(task, {})
        res[task] = {k: v for k, v in row.items() if k != "alias" and isinstance(v, (int, float))}
    return res


def format_tasks(res: dict) -> str:
    lines = [f"{'task':<28}{'metric':<22}{'value':>10}"]
    for task, metrics in res.items():
        for m, v in sorted(metrics.items()):
            lines.append(f"{task:<28}{m:<22}{v:>10.4f}")
    return "\n".join(lines)
