"""The run's record, written by rank 0: ``train.log`` (messages), ``history.jsonl`` (one record per logged step),
``run_info.json`` (provenance, one line per session), TensorBoard scalars (``tb/``), and what ``summary.json``
says of the steps (losses, tokens/s, time and memory per phase and in total, skipped batches), kept across a
resume through the checkpoint (:meth:`RunLog.progress_state`)."""
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
        self.losses: list[float] = []  # this session's task loss per step
        self.first_loss: float | None = None  # the run's first task loss (from the checkpoint when resumed)
        self.tokens_done, self.t_train = 0, 0.0  # over the run: tokens trained on, seconds of training compute
        self.skipped: list[int] = []  # steps whose batch was skipped (train.skip_nonfinite)
        self.rss0 = self.rss_peak = rss_mb()

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

    def count_step(self, phase: str, step: int, seconds: float, tokens: int, task_loss: float) -> tuple[float, bool]:
        """Count a finished step (``seconds`` of training compute, ``tokens`` over all ranks); returns the run's
        tokens/s so far and whether this step's batch was skipped."""
        self.losses.append(task_loss)
        self.t_train += seconds
        self.tokens_done += tokens
        skipped = bool(self.skipped) and self.skipped[-1] == step
        self.phase_step(phase, step, seconds, tokens, task_loss, skipped)
        return self.tokens_done / max(self.t_train, 1e-9), skipped

    def rss_now(self) -> float | None:
        """The process's resident memory now (MB), also kept as the run's peak."""
        rss = rss_mb()
        if rss is not None:
            self.rss_peak = max(self.rss_peak or 0.0, rss)
        return rss

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

    def progress_state(self) -> dict:
        """What the summary needs of the steps run so far; kept in the checkpoint so that a resumed run's summary
        covers the whole run, not only the last session."""
        first = self.first_loss if self.first_loss is not None else (self.losses[0] if self.losses else None)
        return {"phases": self.phases, "train_loss_first": first,
                "tokens_done": self.tokens_done, "t_train": self.t_train, "skipped": list(self.skipped)}

    def restore_progress(self, st: dict | None) -> None:
        if not st:  # a checkpoint from before this was recorded: the summary covers this session only
            return
        self.phases = {p: dict(v) for p, v in st.get("phases", {}).items()}
        self.first_loss = st.get("train_loss_first")
        self.tokens_done, self.t_train = int(st.get("tokens_done", 0)), float(st.get("t_train", 0.0))
        self.skipped = list(st.get("skipped", []))

    def run_summary(self, cuda_peak_mb: float | None) -> dict:
        """The steps' entries of ``summary.json``: first/last task loss, tokens/s, per phase, skipped, memory."""
        return {
            "train_loss_first": self.first_loss if self.first_loss is not None else (self.losses[0] if self.losses
                                                                                     else None),
            "train_loss_last": self.losses[-1] if self.losses else None,
            "tokens_per_s": self.tokens_done / max(self.t_train, 1e-9),
            **self.phase_summary(), "skipped_nonfinite": self.skipped,
            "memory": {"rss_mb_start": self.rss0, "rss_mb_peak": self.rss_peak, "rss_mb_end": rss_mb(),
                       "cuda_peak_mb": cuda_peak_mb},
        }

    def say_done(self, start: int, stop: int, total: int) -> None:
        self.say(f"done: steps {start}..{stop} of {total}; " + "; ".join(
            f"{p} {v['steps']} steps, task loss {v['task_loss_first']:.4f} -> {v['task_loss_last']:.4f}"
            for p, v in self.phases.items())
            + (f"; {len(self.skipped)} non-finite batches skipped" if self.skipped else ""))

    def write_summary(self, summary: dict) -> None:
        if self.main:
            with open(os.path.join(self.dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()
