"""Do lr-1e-5 AdamW updates survive? float32 vs bf16 autocast over float32 master weights vs pure bf16 parameters.

Trains a tiny Qwen3-MoE (full fine-tuning, the training path's own builders: ``build_model``, ``build_optimizer``,
``use_bf16``, ``task_loss``) for a few steps on CPU from the same seed and batches, and compares each run's weight
updates with the float32 run's. ``tests/train/test_precision.py`` asserts on it; the README quotes its output::

    python -m benchmarks.precision_updates --steps 10
"""
from __future__ import annotations

import argparse
import contextlib
import json
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def lr_updates(dtype: str, pure: bool, steps: int = 8, lr: float = 1e-5) -> dict:
    """``{"delta": flat float32 weight updates, "bf16": autocast on, "param_dtype", "state_dtypes", "warnings"}``."""
    from desmoe.method import MethodConfig, MethodController
    from desmoe.train.builders import build_model, build_optimizer, use_bf16
    from desmoe.train.config import Config, ModelConfig, TrainConfig
    from desmoe.train.loss import task_loss

    # the default backend (``auto``: the grouped custom ops on CPU), which is what users train with
    cfg = Config(model=ModelConfig(tiny="qwen3_moe", dtype=dtype, pure_dtype=pure),
                 train=TrainConfig(lr=lr, lr_schedule="constant", warmup_steps=0, max_steps=steps, max_grad_norm=None))
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = build_model(cfg, 64)
    ctl = MethodController(m, MethodConfig(name="fft"), steps, ["a"])
    opt, _ = build_optimizer(ctl, cfg)
    dev = torch.device("cpu")
    bf16 = use_bf16(cfg, dev)
    p0 = {n: p.detach().float().clone() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(0)
    seen = _ExpertsOperandDtypes()
    for s in range(steps):
        ids = torch.randint(3, 64, (2, 16), generator=g)
        b = {"input_ids": ids, "labels": ids.clone(), "domain_ids": torch.zeros(2, 16, dtype=torch.long)}
        ctl.begin_step(s)
        with ctl.applied(b["domain_ids"].reshape(-1)), (seen if s == 0 else contextlib.nullcontext()):
            loss, _, _, _ = task_loss(m, b, dev, bf16, aux=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"delta": torch.cat([(p.detach().float() - p0[n]).flatten() for n, p in m.named_parameters()]),
            "bf16": bf16, "param_dtype": next(m.parameters()).dtype,
            "state_dtypes": {st["exp_avg"].dtype for st in opt.state.values()},
            "experts_operand_dtypes": sorted(seen.dtypes),
            "warnings": [str(w.message) for w in caught]}


class _ExpertsOperandDtypes(TorchDispatchMode):
    """The dtypes of (x, W_gate_up, W_down) as the experts op's implementation receives them (below autocast)."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("desmoe.") and "experts_fwd" in str(func):
            self.dtypes.update(str(a.dtype).replace("torch.", "") for a in args[:3])
        return func(*args, **(kwargs or {}))


def compare(d: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"cosine": float(d @ ref / (d.norm() * ref.norm()).clamp(min=1e-30)),
            "rel_err": float((d - ref).norm() / ref.norm()), "changed": float((d != 0).float().mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = lr_updates("float32", False, a.steps, a.lr)["delta"]
    mixed, pure = lr_updates("bfloat16", False, a.steps, a.lr), lr_updates("bfloat16", True, a.steps, a.lr)
    out = {"torch": torch.__version__, "backend": "auto (grouped custom ops on CPU)", "steps": a.steps, "lr": a.lr,
           "float32": compare(ref, ref),
           "bf16_autocast_fp32_master": {**compare(mixed["delta"], ref),
                                         "experts_operand_dtypes": mixed["experts_operand_dtypes"]},
           "pure_bf16": {**compare(pure["delta"], ref), "experts_operand_dtypes": pure["experts_operand_dtypes"]}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
