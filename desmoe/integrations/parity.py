"""Parity check of ``desmoe.patch`` against transformers' own eager experts, on tiny local models.

``python -m desmoe.integrations.parity`` (or ``desmoe parity``) prints, per model type, the largest logit and
gradient difference between the patched model and the stock eager one, and both forward+backward times.
"""
from __future__ import annotations

import copy
import time

import torch


def parity_rows(model_types=None, *, backend: str = "reference", seed: int = 0) -> list[dict]:
    """One dict per model type: ``model_type, logits_max_abs, grad_max_rel, eager_ms, desmoe_ms, ok``."""
    import desmoe
    from .tiny import tiny_model, tiny_model_types

    rows = []
    for mt in model_types or tiny_model_types():
        ref = tiny_model(mt, seed=seed).train()
        ref.set_experts_implementation("eager")
        ours = desmoe.patch(copy.deepcopy(ref), backend=backend)
        ids = torch.randint(3, ref.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
        out, ms = {}, {}
        for name, m in (("eager", ref), ("desmoe", ours)):
            t0 = time.perf_counter()
            o = m(ids, labels=ids)
            o.loss.backward()
            ms[name] = (time.perf_counter() - t0) * 1e3
            out[name] = o.logits.detach()
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
    print(f"{'model_type':<15}{'max |dlogits|':>15}{'max rel dgrad':>15}{'eager ms':>10}{'desmoe ms':>11}  ok")
    for r in rows:
        print(f"{r['model_type']:<15}{r['logits_max_abs']:>15.2e}{r['grad_max_rel']:>15.2e}"
              f"{r['eager_ms']:>10.1f}{r['desmoe_ms']:>11.1f}  {'yes' if r['ok'] else 'NO'}")


def main() -> int:
    rows = parity_rows()
    print_parity(rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
