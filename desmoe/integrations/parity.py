"""Parity check of ``desmoe.patch`` against transformers' own eager experts, on tiny local models.

``python -m desmoe.integrations.parity`` (or ``desmoe parity``) prints, per model type, the largest logit and
gradient difference between the patched model and the stock eager one, and both forward+backward times, warm:
the median of ``timing_iters`` calls after the first (the first call's one-off costs, such as lazy imports and
allocator growth, are not the model's speed).
"""
from __future__ import annotations

import copy
import time

import torch


def _warm_ms(m, ids, iters: int) -> float | None:
    """Median wall time (ms) of ``iters`` forward+backward calls of ``m`` (gradients restored afterwards)."""
    if iters < 1:
        return None
    saved = {n: p.grad for n, p in m.named_parameters()}
    times = []
    for _ in range(iters):
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        m(ids, labels=ids).loss.backward()
        times.append((time.perf_counter() - t0) * 1e3)
    for n, p in m.named_parameters():
        p.grad = saved[n]
    return sorted(times)[len(times) // 2]


def parity_rows(model_types=None, *, backend: str = "reference", seed: int = 0, timing_iters: int = 3) -> list[dict]:
    """One dict per model type: ``model_type, logits_max_abs, grad_max_rel, eager_ms, desmoe_ms, ok``; the times
    are warm medians of ``timing_iters`` calls (None with 0)."""
    from .hf import patch
    from .tiny import tiny_model, tiny_model_types

    rows = []
    for mt in model_types or tiny_model_types():
        ref = tiny_model(mt, seed=seed).train()
        ref.set_experts_implementation("eager")
        ours = patch(copy.deepcopy(ref), backend=backend)
        ids = torch.randint(3, ref.config.get_text_config().vocab_size, (2, 16),
                            generator=torch.Generator().manual_seed(seed))
        out = {}
        for name, m in (("eager", ref), ("desmoe", ours)):
            torch.manual_seed(seed)  # a family that samples in training (phimoe's SparseMixer) draws the same
            o = m(ids, labels=ids)
            o.loss.backward()
            out[name] = o.logits.detach()
        ms = {name: _warm_ms(m, ids, timing_iters) for name, m in (("eager", ref), ("desmoe", ours))}
        logits_diff = (out["eager"] - out["desmoe"]).abs().max().item()
        grads_o = dict(ours.named_parameters())
        rel = 0.0
        for n, p in ref.named_parameters():
            if p.grad is not None and grads_o[n].grad is not None:
                rel = max(rel, ((p.grad - grads_o[n].grad).norm() / p.grad.norm().clamp_min(1e-12)).item())
        rows.append({"model_type": mt, "logits_max_abs": logits_diff, "grad_max_rel": rel,
                     "eager_ms": ms["eager"], "desmoe_ms": ms["desmoe"],
                     "ok": logits_diff < 1e-4 and rel < 1e-4})
    return rows


def print_parity(rows: list[dict]) -> None:
    def ms(v):
        return f"{v:.1f}" if v is not None else "-"

    print(f"{'model_type':<15}{'max |dlogits|':>15}{'max rel dgrad':>15}{'eager ms':>10}{'desmoe ms':>11}  ok"
          "   (fwd+bwd, warm median)")
    for r in rows:
        print(f"{r['model_type']:<15}{r['logits_max_abs']:>15.2e}{r['grad_max_rel']:>15.2e}"
              f"{ms(r['eager_ms']):>10}{ms(r['desmoe_ms']):>11}  {'yes' if r['ok'] else 'NO'}")


def main() -> int:
    rows = parity_rows()
    print_parity(rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
