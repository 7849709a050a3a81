"""The run's record, written by rank 0: ``train.log`` (messages), ``history.jsonl`` (one record per logged step),
``run_info.json`` (provenance, one line per session), TensorBoard scalars (``tb/``) and the per-phase summary."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch

from .. import provenance
from .plots import Scalars


def rss_mb() -> float | None:
    """Resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def run_info(cfg, device, world_size: int) -> dict:
    """What a person needs to reproduce the session: versions, git sha, host, command line, device."""
    import platform

    sha, dirty = provenance.git_state()
    vers = provenance.versions("desmoe", "torch", "transformers", "triton", "numpy", "tokenizers")
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
            "host": socket.gethostname(), "python": vers.pop("python"), "platform": platform.platform(),
            "versions": vers, "git_sha": sha, "git_dirty": dirty, "device": str(device), "world_size": world_size,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "method": cfg.method.name, "total_steps": cfg.train.max_steps}


def truncate_history(path: str, start: int) -> None:
    """On resume, drop the records of steps >= ``start`` that an interrupted session logged after its checkpoint."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", -1) < start:
                    keep.append(line)
            except ValueError:  # a line cut by the kill
                pass
    with open(path, "w") as f:
        f.writelines(keep)


class RunLog:
    """Every file of the run's record; on other ranks than 0 every method is a no-op."""

    def __init__(self, output_dir: str, *, main: bool, log=print):
        self.dir, self.main, self._log = output_dir, main, log
        self.log_path = os.path.join(output_dir, "train.log")
        self.history_path = os.path.join(output_dir, "history.jsonl")
        self.scalars: Scalars | None = None
        self.phases: dict[str, dict] = {}  # per phase: steps, seconds, tokens, first/last step and task loss

    def start(self, cfg, device, world_size: int, *, resumed: bool) -> None:
        """A new run empties ``train.log`` and ``history.jsonl``; every session appends to ``run_info.json``."""
        if not self.main:
            return
        if not resumed:
            open(self.history_path, "w").close()
            open(self.log_path, "w").close()
        with open(os.path.join(self.dir, "run_info.json"), "a") as f:
            f.write(json.dumps(run_info(cfg, device, world_size), default=str) + "\n")

    def open_scalars(self) -> None:
        self.scalars = Scalars(os.path.join(self.dir, "tb"), enabled=self.main)

    def say(self, msg: str) -> None:
        """A message on the console and in ``train.log``, flushed so a killed job leaves its log behind."""
        if not self.main:
            return
        self._log(msg)
        try:
            sys.stdout.flush()
        except Exception:
            pass
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def step(self, rec: dict, *, write: bool) -> None:
        """TensorBoard scalars of every step; ``history.jsonl`` when ``write``."""
        if not self.main:
            return
        self.scalars.scalars(rec["step"], {k: v for k, v in rec.items() if k not in ("step", "phase")})
        if write:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def phase_step(self, phase: str, step: int, seconds: float, tokens: int, task_loss: float, skipped: bool) -> None:
        pp = self.phases.setdefault(phase, {"steps": 0, "seconds": 0.0, "tokens": 0, "first_step": step,
                                            "task_loss_first": task_loss, "skipped_nonfinite": 0})
        pp["steps"] += 1
        pp["seconds"] += seconds
        pp["tokens"] += tokens
        pp["last_step"] = step
        pp["task_loss_last"] = task_loss
        pp["skipped_nonfinite"] += int(skipped)

    def phase_summary(self) -> dict:
        """``{"phase_timing": ..., "phase_summary": ...}`` for ``summary.json``."""
        return {"phase_timing": {p: {"steps": v["steps"], "seconds": v["seconds"],
                                     "tokens_per_s": v["tokens"] / max(v["seconds"], 1e-9)}
                                 for p, v in self.phases.items()},
                "phase_summary": {p: {**v, "tokens_per_s": v["tokens"] / max(v["seconds"], 1e-9)}
                                  for p, v in self.phases.items()}}

    def write_summary(self, summary: dict) -> None:
        if self.main:
            with open(os.path.join(self.dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()
