"""How specialized a model's experts are to the domains, per MoE layer (``desmoe specialization``).

Three numbers per layer, from the domain × expert routing statistics of held-out tokens
(:func:`desmoe.ops.routing_stats`: each token's K top-k picks are counted, and their routing weights summed):

- **mutual information** ``I(domain; expert)`` in bits between a token's domain and a routed expert, over the
  joint distribution of (domain, pick) of all counted picks; also divided by ``H(domain)`` (``mi_norm``: 0 =
  routing says nothing about the domain, 1 = the domains use disjoint experts).
- **concentration** (ESFT's): for each domain, the share of its routing mass (sum of routing weights) on its
  ``n_top = ceil(top_p · E)`` heaviest experts (a fixed *count* of experts, ``top_p`` = 0.2 of them), averaged
  over domains. Domain-agnostic uniform routing gives ``n_top / E`` (``concentration_uniform``), all of a
  domain's mass on ≤ n_top experts gives 1.
- **mask overlap**: the mean pairwise Jaccard index of the domains' DGES masks
  (:func:`desmoe.method.dges.masks_from_affinity` at ``phi``, ``A`` = each domain's selection shares): 1 = DGES
  gives every domain the same experts (nothing to isolate), 0 = disjoint expert sets.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..context import recording
from ..method.config import MethodConfig
from ..method.dges import masks_from_affinity

TOP_P = 0.2
PHI = MethodConfig.phi  # DGES's default threshold
METRICS = ("mi_bits", "h_domain_bits", "mi_norm", "concentration", "mask_jaccard")


def mutual_information(counts_LME: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(I_L, H_L)``: per layer, I(domain; expert) and H(domain) in bits from counts ``[L, M, E]`` (float64)."""
    c = counts_LME.double()
    n_L11 = c.sum((-1, -2), keepdim=True).clamp(min=1e-300)
    p = c / n_L11
    pd = p.sum(-1, keepdim=True)
    pe = p.sum(-2, keepdim=True)
    ratio = p / (pd * pe).clamp(min=1e-300)
    I_L = torch.where(p > 0, p * torch.log2(ratio.clamp(min=1e-300)), torch.zeros_like(p)).sum((-1, -2))
    pd_LM = pd.squeeze(-1)
    H_L = -torch.where(pd_LM > 0, pd_LM * torch.log2(pd_LM.clamp(min=1e-300)), torch.zeros_like(pd_LM)).sum(-1)
    return I_L.clamp(min=0.0), H_L


def concentration(mass_LME: torch.Tensor, top_p: float = TOP_P) -> tuple[torch.Tensor, int]:
    """``(conc_L, n_top)``: per layer, the mean over domains (those with any mass) of the share of the domain's
    routing mass on its ``n_top = ceil(top_p · E)`` heaviest experts."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    m = mass_LME.double()
    E = m.shape[-1]
    n_top = max(1, math.ceil(top_p * E - 1e-9))
    tot_LM = m.sum(-1)
    top_LM = m.topk(n_top, dim=-1).values.sum(-1)
    seen_LM = tot_LM > 0
    share_LM = torch.where(seen_LM, top_LM / tot_LM.clamp(min=1e-300), torch.zeros_like(tot_LM))
    conc_L = share_LM.sum(-1) / seen_LM.sum(-1).clamp(min=1)
    return conc_L, n_top


def mask_jaccard(counts_LME: torch.Tensor, phi: float = PHI) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(jaccard_L or None, masks_LME)``: the DGES masks at ``phi`` of ``A = rownorm(counts)`` and, per layer,
    their mean pairwise Jaccard index over domain pairs (None with fewer than 2 domains)."""
    c = counts_LME.double()
    A = (c / c.sum(-1, keepdim=True).clamp(min=1e-300)).float()
    masks = masks_from_affinity(A, phi)
    L, M, _ = masks.shape
    if M < 2:
        return None, masks
    mf = masks.double()
    inter = torch.einsum("lae,lbe->lab", mf, mf)
    size = mf.sum(-1)
    union = size.unsqueeze(-1) + size.unsqueeze(-2) - inter
    jac = inter / union.clamp(min=1)  # every mask is non-empty, so union >= 1
    iu = torch.triu_indices(M, M, offset=1)
    return jac[:, iu[0], iu[1]].mean(-1), masks


def metrics_from_stats(counts_LME: torch.Tensor, mass_LME: torch.Tensor, *, top_p: float = TOP_P,
                       phi: float = PHI) -> dict:
    """All three measures from routing statistics ``[L, M, E]`` (counts of picks; summed routing weights)."""
    if counts_LME.dim() != 3 or mass_LME.shape != counts_LME.shape:
        raise ValueError(f"counts_LME and mass_LME must both be [L, M, E], got {tuple(counts_LME.shape)} and "
                         f"{tuple(mass_LME.shape)}")
    I_L, H_L = mutual_information(counts_LME)
    conc_L, n_top = concentration(mass_LME, top_p)
    jac_L, masks = mask_jaccard(counts_LME, phi)
    L, M, E = counts_LME.shape
    layers = []
    for l in range(L):
        h = float(H_L[l])
        layers.append({"layer": l, "mi_bits": float(I_L[l]), "h_domain_bits": h,
                       "mi_norm": float(I_L[l]) / h if h > 0 else None,
                       "concentration": float(conc_L[l]),
                       "mask_jaccard": None if jac_L is None else float(jac_L[l]),
                       "mask_sizes": masks[l].sum(-1).tolist()})
    mean = {}
    for k in METRICS:
        vals = [r[k] for r in layers if r[k] is not None]
        mean[k] = sum(vals) / len(vals) if vals else None
    return {"layers": layers, "mean": mean, "num_experts": E, "num_domains": M, "top_p": top_p, "n_top": n_top,
            "concentration_uniform": n_top / E, "phi": phi}


@torch.no_grad()
def routing_stats_by_domain(model, batches_by_domain: dict[str, list[dict]], max_tokens: int | None = None):
    """``(counts_LME, mass_LME, tokens_M)``: the patched ``model``'s routing on each domain's batches (dicts with
    ``input_ids`` and optional ``attention_mask``; padding not counted), at most ``max_tokens`` tokens a domain."""
    from ..integrations.hf import routers as get_routers

    routers = get_routers(model)
    if not routers:
        raise ValueError("the model has no desmoe routers (was it patched?)")
    E = routers[0].num_experts
    M = len(batches_by_domain)
    dev = routers[0].weight.device
    counts = mass = None
    tokens = [0] * M
    with recording(routers) as rec:
        for m, batches in enumerate(batches_by_domain.values()):
            for b in batches:
                left = None if max_tokens is None else max_tokens - tokens[m]
                if left is not None and left <= 0:
                    break
                ids = b["input_ids"].to(dev)
                am = b.get("attention_mask")
                model(input_ids=ids, attention_mask=None if am is None else am.to(dev))
                valid_T = (torch.ones(ids.numel(), dtype=torch.bool, device=dev) if am is None
                           else am.reshape(-1).bool().to(dev))
                if left is not None:  # the first `left` valid tokens only
                    valid_T &= valid_T.cumsum(0) <= left
                ids_LTK = torch.stack([x["topk_ids_TK"] for x in rec.layers()])
                w_LTK = torch.stack([x["topk_weights_TK"].float() for x in rec.layers()])
                dom_T = torch.full((ids_LTK.shape[1],), m, dtype=torch.long, device=dev)
                c, w, _ = ops.routing_stats(ids_LTK, dom_T, M, E, topk_weights_LTK=w_LTK, valid_T=valid_T)
                counts = c if counts is None else counts + c
                mass = w.double() if mass is None else mass + w.double()
                tokens[m] += int(valid_T.sum())
                rec.clear()
    if counts is None:
        raise ValueError("no tokens to measure routing on")
    return counts.cpu(), mass.cpu(), tokens


def specialization(model, batches_by_domain: dict[str, list[dict]], *, max_tokens: int | None = None,
                   top_p: float = TOP_P, phi: float = PHI) -> dict:
    """Per MoE layer and their mean: I(domain; expert), concentration and DGES-mask overlap of a patched model
    on per-domain batches (see the module docstring)."""
    counts, mass, tokens = routing_stats_by_domain(model, batches_by_domain, max_tokens)
    res = metrics_from_stats(counts, mass, top_p=top_p, phi=phi)
    res["domains"] = list(batches_by_domain)
    res["tokens"] = dict(zip(batches_by_domain, tokens))
    return res


def specialization_of_checkpoint(path: str, *, tokens: int = 16384, device: str = "cpu", top_p: float = TOP_P,
                                 phi: float | None = None) -> dict:
    """:func:`specialization` of a run directory's latest checkpoint (or a checkpoint directory), loaded as
    ``desmoe eval`` / :func:`desmoe.from_pretrained` load it (verified against its manifest, ALR included), on
    ``tokens`` held-out (test split) tokens of each of the run's training domains. ``phi``: default the run's
    ``method.phi``."""
    import os

    from ..export import _domain_batches, _load_model_dir, _model_dir
    from ..train import checkpoint as ck
    from ..train.config import load_config

    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"--tokens must be an int >= 1, got {tokens!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    mdir = _model_dir(path)
    ckpt = os.path.dirname(os.path.abspath(mdir))
    cfg_path = ck.run_config_path(ckpt) if os.path.basename(os.path.abspath(mdir)) == "model" else None
    if cfg_path is None:
        raise FileNotFoundError(f"--checkpoint {path!r}: no run config.yaml beside the checkpoint: the domains to "
                                f"measure are unknown")
    cfg = load_config(cfg_path)
    model, tok = _load_model_dir(mdir, device=device, dtype=torch.float32,
                                 backend="reference" if device == "cpu" else "auto")
    if tok is None:
        raise FileNotFoundError(f"--checkpoint {path!r}: no tokenizer in {mdir!r}")
    domains = list(cfg.data.domains)
    held = _domain_batches(cfg, tok, "test", domains, tokens)
    per_batch = cfg.data.seq_len * cfg.data.batch_size
    if per_batch * len(next(iter(held.values()))[1]) < tokens:  # _domain_batches rounds down: top up to N
        from ..data import eval_batches

        n = -(-tokens // per_batch)
        held = {d: (docs, list(eval_batches(docs, cfg.data.seq_len, cfg.data.batch_size, tok.eos_token_id,
                                            max_batches=n))) for d, (docs, _) in held.items()}
    res = specialization(model, {d: bs for d, (_, bs) in held.items()}, max_tokens=tokens, top_p=top_p,
                         phi=cfg.method.phi if phi is None else phi)
    res["checkpoint"] = os.path.abspath(ckpt)
    res["split"] = "test"
    res["tokens_requested"] = tokens
    return res


def format_table(res: dict) -> str:
    def f(v, w=8, p=3):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

    head = (f"{'layer':>5} {'I(d;e)':>8} {'H(d)':>8} {'I/H':>8} {'conc':>8} {'jaccard':>8}  mask sizes")
    lines = [f"domains {', '.join(res['domains'])}; tokens {res['tokens']}; E={res['num_experts']}, "
             f"conc = mass share on top {res['n_top']} experts (uniform {res['concentration_uniform']:.3f}); "
             f"DGES phi={res['phi']}", head]
    for r in res["layers"]:
        lines.append(f"{r['layer']:>5} {f(r['mi_bits'])} {f(r['h_domain_bits'])} {f(r['mi_norm'])} "
                     f"{f(r['concentration'])} {f(r['mask_jaccard'])}  {r['mask_sizes']}")
    m = res["mean"]
    lines.append(f"{'mean':>5} {f(m['mi_bits'])} {f(m['h_domain_bits'])} {f(m['mi_norm'])} "
                 f"{f(m['concentration'])} {f(m['mask_jaccard'])}")
    return "\n".join(lines)
