"""Held-out evaluation: per-domain loss / perplexity, math exact match by greedy generation, general loss.

Inference needs no domain label: the ALR routes. :func:`evaluate_model` returns a JSON-able dict;
:func:`format_table` renders it. Evaluating a run's checkpoint is :func:`desmoe.train.evaluate.evaluate_checkpoint`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def token_losses(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position ``[B, S-1]`` (float32) and its validity mask (labels != -100)."""
    logits = logits_BSV[:, :-1].float()
    tgt = labels_BS[:, 1:]
    valid = tgt != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.clamp(min=0).reshape(-1), reduction="none")
    return ce.view(tgt.shape) * valid, valid


def autocast_ctx(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def domain_loss(model, docs: list[list[int]], *, seq_len: int, batch_size: int, eos_id: int,
                max_batches: int | None = None, device="cpu", bf16: bool = False, packing: str = "isolated") -> dict:
    """Mean next-token loss and perplexity of ``model`` on one domain's held-out token docs, packed as in training
    (``packing``: see :mod:`desmoe.data.stream`; isolated: each document scored as if alone).

    Also ``loss_se``, the standard error of ``loss`` with the packed rows (sequences) as the sampling units: row
    ``i`` has mean loss ``x_i`` over ``w_i`` valid tokens, ``loss = Σ w_i x_i / Σ w_i`` and (ratio estimator)
    ``loss_se = sqrt(Σ w_i² (x_i - loss)²) / Σ w_i``; ``rows``: the number of rows with a valid token."""
    from ..data import eval_batches, packed_forward

    device = torch.device(device)
    was = model.training
    model.eval()
    sums_R, counts_R = [], []  # per row: summed loss and valid tokens
    for b in eval_batches(docs, seq_len, batch_size, eos_id, max_batches=max_batches, packing=packing):
        with autocast_ctx(device, bf16):
            logits = packed_forward(model, b, device=device).logits
        ce, valid = token_losses(logits, b["labels"].to(device))
        sums_R += ce.double().sum(1).tolist()
        counts_R += valid.sum(1).tolist()
    model.train(was)
    rows = [(s, w) for s, w in zip(sums_R, counts_R) if w > 0]
    n = sum(w for _, w in rows)
    loss = sum(s for s, _ in rows) / max(n, 1)
    se = math.sqrt(sum((s - w * loss) ** 2 for s, w in rows)) / max(n, 1)  # w_i (x_i - loss) = s_i - w_i loss
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n, "loss_se": se, "rows": len(rows)}


@torch.no_grad()
def math_exact_match(model, tokenizer, *, n: int = 16, seed: int = 0, max_new_tokens: int = 12, device="cpu") -> dict:
    """Greedy-decode the answers of ``n`` held-out math problems; exact match of the first line."""
    from ..data import extract_answer, format_math, math_problems

    device = torch.device(device)
    was = model.training
    model.eval()
    correct, samples = 0, []
    for q, a in math_problems(n, "test", seed):
        prompt = format_math(q)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
        out = []
        for _ in range(max_new_tokens):
            # full re-forward per token: short answers, and no KV-cache API differences across transformers versions
            logits = model(input_ids=ids).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id or "\n" in tokenizer.decode(out):
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        text = tokenizer.decode(out)
        pred = extract_answer(text)
        ok = pred.strip() == str(a).strip()
        correct += ok
        if len(samples) < 3:
            samples.append({"prompt": prompt, "answer": a, "prediction": pred})
    model.train(was)
    return {"exact_match": correct / max(n, 1), "n": n, "samples": samples}


def evaluate_model(model, tokenizer, eval_docs: dict[str, list[list[int]]], *, seq_len: int, batch_size: int,
                   max_batches: int | None = 4, math_n: int = 16, device="cpu", bf16: bool = False,
                   general: str | None = "general", packing: str = "isolated") -> dict:
    """Per-domain held-out loss/ppl for every domain in ``eval_docs`` (+ math exact match when ``math`` is one
    of them); ``general`` is reported separately as the forgetting probe."""
    from ..progress import bar

    eos = tokenizer.eos_token_id
    res = {"domains": {}}
    for d, docs in bar(eval_docs.items(), "evaluating held-out loss", total=len(eval_docs), unit="domain",
                       leave=False):
        res["domains"][d] = domain_loss(model, docs, seq_len=seq_len, batch_size=batch_size, eos_id=eos,
                                        max_batches=max_batches, device=device, bf16=bf16, packing=packing)
    if general is not None and general in res["domains"]:
        res["general"] = res["domains"][general]
    if "math" in eval_docs and math_n > 0:
        res["math"] = math_exact_match(model, tokenizer, n=math_n, device=device)
    return res


def format_table(res: dict) -> str:
    lines = [f"{'domain':<14}{'loss':>9}{'ppl':>11}{'tokens':>9}"]
    for d, r in res["domains"].items():
        tag = "  (general: forgetting probe)" if res.get("general") is r else ""
        lines.append(f"{d:<14}{r['loss']:>9.4f}{r['ppl']:>11.2f}{r['tokens']:>9d}{tag}")
    if "math" in res:
        m = res["math"]
        lines.append(f"math exact match: {m['exact_match']:.3f} on {m['n']} held-out problems (greedy)")
    return "\n".join(lines)
