"""Do lr-1e-5 AdamW updates survive? float32 vs bf16 autocast over float32 master weights vs pure bf16 parameters.

Trains a tiny Qwen3-MoE (full fine-tuning, the training path's own builders: ``build_model``, ``build_optimizer``,
``use_bf16``, ``task_loss``) for a few steps on CPU from the same seed and batches, and compares each run's weight
updates with the float32 run's. ``tests/train/test_precision.py`` asserts on it; the README quotes its output::

    python -m benchmarks.precision_updates --steps 10
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch


def lr_updates(dtype: str, pure: bool, steps: int = 8, lr: float = 1e-5) -> dict:
    """``{"delta": flat float32 weight updates, "bf16": autocast on, "param_dtype", "state_dtypes", "warnings"}``."""
    from desmoe.method import MethodConfig, MethodController
    from desmoe.train.builders import build_model, build_optimizer, use_bf16
    from desmoe.train.config import Config, ModelConfig, TrainConfig
    from desmoe.train.loss import task_loss

    cfg = Config(model=ModelConfig(tiny="qwen3_moe", dtype=dtype, pure_dtype=pure, backend="reference"),
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
    for s in range(steps):
        ids = torch.randint(3, 64, (2, 16), generator=g)
        b = {"input_ids": ids, "labels": ids.clone(), "domain_ids": torch.zeros(2, 16, dtype=torch.long)}
        ctl.begin_step(s)
        with ctl.applied(b["domain_ids"].reshape(-1)):
            loss, _, _, _ = task_loss(m, b, dev, bf16, aux=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"delta": torch.cat([(p.detach().float() - p0[n]).flatten() for n, p in m.named_parameters()]),
            "bf16": bf16, "param_dtype": next(m.parameters()).dtype,
            "state_dtypes": {st["exp_avg"].dtype for st in opt.state.values()},
            "warnings": [str(w.message) for w in caught]}


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
    out = {"torch": torch.__version__, "steps": a.steps, "lr": a.lr, "float32": compare(ref, ref),
           "bf16_autocast_fp32_master": compare(lr_updates("bfloat16", False, a.steps, a.lr)["delta"], ref),
           "pure_bf16": compare(lr_updates("bfloat16", True, a.steps, a.lr)["delta"], ref)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
