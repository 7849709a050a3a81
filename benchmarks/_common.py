"""The project's one benchmark results format, shared by every script in ``benchmarks/``.

    {"benchmark", "device", "torch", "triton", "transformers", "date", "git_sha",
     "records": [{"shape", "T", "impl", "pass", "ms", "tflops" | "gbps", "peak_mem_gb", ...}]}

written to ``<benchmark>-<device>-<date>[-quick].json``. ``impl`` is one of ``IMPLS``; extra keys in a record are
allowed (e.g. ``"note"``), the listed ones are required.

Where results go (:func:`add_output_args`, :func:`output_dir`): ``runs/bench/`` under the current directory by
default (git-ignored), ``--out-dir DIR`` where asked, and the committed ``benchmarks/results/`` only with ``--save``.
A quick-mode result is tagged ``"quick": true`` and its file name ends in ``-quick``; ``--save`` refuses it, and
``report.py`` never puts one in the README's tables.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from typing import Callable

import torch

# CPU: subnormal floats flushed to zero in every benchmark, as in every desmoe entry point (desmoe/train/numerics.py:
# they slowed CPU training steps up to 5x and change no kept digit)
torch.set_flush_denormal(True)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("desmoe", "eager", "grouped_mm", "batched_mm", "torch", "liger", "reference", "extension")
REQUIRED_RECORD_KEYS = ("shape", "T", "impl", "pass", "ms", "peak_mem_gb")


def device_name(device: torch.device | str | None = None) -> str:
    """A short, file-name-safe device name: ``"NVIDIA-H100-80GB-HBM3"`` or ``"cpu-<model>"``."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = "cpu-" + (platform.processor() or platform.machine() or "unknown")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, stderr=subprocess.DEVNULL)
        return out.decode().strip()
    except Exception:
        return "unknown"


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def header(benchmark: str, device=None) -> dict:
    return {"benchmark": benchmark, "device": device_name(device), **versions(),
            "date": _dt.date.today().isoformat(), "git_sha": git_sha(), "records": []}


def check_record(rec: dict) -> dict:
    missing = [k for k in REQUIRED_RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"benchmark record is missing {missing}: {rec}")
    if rec["impl"] not in IMPLS:
        raise ValueError(f"record impl must be one of {IMPLS}, got {rec['impl']!r}")
    if "tflops" not in rec and "gbps" not in rec:
        raise ValueError(f"record needs 'tflops' or 'gbps': {rec}")
    return rec


def add_output_args(p) -> None:
    """The output options every benchmark script takes (see the module docstring)."""
    p.add_argument("--save", action="store_true",
                   help=f"write the results JSON into {os.path.relpath(RESULTS_DIR)} (the committed results; "
                        "not for --quick runs)")
    p.add_argument("--out-dir", default=None,
                   help="write the results JSON into this folder (default: runs/bench/ under the current directory)")
    p.add_argument("--no-write", action="store_true", help="print the table only, write no file")


def default_out_dir() -> str:
    return os.path.join(os.getcwd(), "runs", "bench")


def output_dir(args, *, quick: bool) -> str | None:
    """Where this run's JSON goes, or None for ``--no-write``; ValueError for contradictory options."""
    if args.save and args.out_dir:
        raise ValueError(f"--save writes into {RESULTS_DIR}; do not also pass --out-dir {args.out_dir!r}")
    if args.save and args.no_write:
        raise ValueError("--save and --no-write contradict each other")
    if args.save and quick:
        raise ValueError("--save with a quick-mode run: quick results are smoke tests, not committed results "
                         "(use --out-dir, or run without --quick)")
    if args.no_write:
        return None
    return RESULTS_DIR if args.save else (args.out_dir or default_out_dir())


def write_results(result: dict, out_dir: str | None = None) -> str:
    """Validate every record and write ``<benchmark>-<device>-<date>[-quick].json`` into ``out_dir`` (default
    ``runs/bench/`` under the current directory, never the source tree); returns the path."""
    for rec in result["records"]:
        check_record(rec)
    out_dir = out_dir or default_out_dir()
    if os.path.abspath(out_dir) == os.path.abspath(RESULTS_DIR) and result.get("quick"):
        raise ValueError("quick-mode results are not written into benchmarks/results (the committed results)")
    os.makedirs(out_dir, exist_ok=True)
    tag = "-quick" if result.get("quick") else ""
    path = os.path.join(out_dir, f"{result['benchmark']}-{result['device']}-{result['date']}{tag}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the tensors autograd saves for the backward while active (each storage once): the activation
    memory a step holds, counted the same way on any device."""

    def __init__(self):
        self.bytes, self._seen = 0, set()

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    self.bytes += t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage (meta/functional)
                pass
            return t

        super().__init__(pack, lambda t: t)


def time_fn(fn: Callable[[], object], *, warmup: int = 2, iters: int = 5, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised on GPU)."""
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_mem_gb(device=None) -> float:
    """Peak CUDA memory since the last reset, in GB (0.0 on CPU, where it is not tracked)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return 0.0


def reset_peak(device=None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats()


def print_table(records: list[dict],
                cols=("shape", "T", "impl", "pass", "ms", "tflops", "gbps", "peak_mem_gb")) -> None:
    cols = [c for c in cols if any(c in r for r in records)]
    rows = [[_fmt(r.get(c, "")) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
