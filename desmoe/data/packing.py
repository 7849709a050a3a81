"""Feeding packed batches to a transformers model so that each document attends only to itself.

A batch from :class:`~desmoe.data.MixedDomainStream` / :func:`~desmoe.data.eval_batches` packed with
``packing="isolated"`` carries ``position_ids`` that restart at 0 at every document. transformers (v5) turns those
into per-document attention by itself, in ``masking_utils`` (a block-diagonal causal mask for eager / sdpa / flex)
and in its flash-attention path (``cu_seqlens``), but only when the forward gets **no 2-D attention mask and no
KV cache**, and flash attention only for a batch of one row. :func:`packed_forward` calls the model that way;
:func:`check_isolated_packing` says, with a clear error, when a model cannot separate documents.
"""
from __future__ import annotations

import inspect
import sys


def _unwrap(model):
    for _ in range(8):  # DDP / FSDP wrappers (.module), torch.compile (._orig_mod), PEFT (.get_base_model())
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        if inner is None or inner is model:
            return model
        model = inner
    return model


def _modeling_class(cls: type) -> type:
    """The class whose module holds the modeling code: past wrapper subclasses made at run time (FSDP2's
    ``fully_shard`` turns ``Qwen3MoeForCausalLM`` into ``FSDPQwen3MoeForCausalLM``, defined in torch)."""
    for c in cls.__mro__:
        if not c.__module__.startswith("torch."):
            return c
    return cls


def check_isolated_packing(model) -> str:
    """The model's attention implementation, when it separates packed documents given per-document
    ``position_ids`` (see the module docstring); else ``ValueError`` naming why and the way out
    (``data.packing: concatenated``)."""
    from transformers import masking_utils

    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    name = type(m).__name__
    impl = getattr(cfg, "_attn_implementation", None)
    how = "set data.packing: concatenated (documents of a row then attend to the earlier ones of that row)"
    known = set(getattr(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", {}))
    if cfg is None or impl not in known:
        raise ValueError(f"data.packing='isolated': {name} uses attention implementation {impl!r}, for which "
                         f"transformers builds no per-document mask from position_ids (it does for "
                         f"{', '.join(sorted(known))}); load the model with one of those, or {how}")
    cls = _modeling_class(type(m))
    name = cls.__name__
    module = sys.modules.get(cls.__module__)
    uses_masking = module is not None and any(
        getattr(v, "__module__", None) == masking_utils.__name__ for v in vars(module).values() if callable(v))
    try:
        takes_pos = "position_ids" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        takes_pos = False
    if not (uses_masking and takes_pos):
        why = "its forward takes no position_ids" if not takes_pos else \
            f"its modeling code ({cls.__module__}) does not build masks with transformers.masking_utils"
        raise ValueError(f"data.packing='isolated': {name} cannot separate packed documents ({why}); {how}")
    return impl


def model_inputs(batch: dict, model=None) -> dict:
    """The forward's keyword arguments for ``batch`` (its tensors as they are; ``domain_ids`` / ``labels`` left out):
    ``input_ids`` and ``position_ids`` with ``use_cache=False`` and no 2-D mask for an isolated-packing batch (one
    row per batch under flash attention, else ``ValueError``: use :func:`packed_forward`, which flattens), else
    ``input_ids`` and ``attention_mask``. ``model`` (optional): checked with :func:`check_isolated_packing`."""
    pos = batch.get("position_ids")
    if pos is None:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if model is not None:
        impl = check_isolated_packing(model)
        if impl.startswith("flash") and batch["input_ids"].shape[0] > 1:
            raise ValueError(f"data.packing='isolated' under {impl}: transformers separates packed documents in "
                             f"flash attention only for a batch of one row, got {batch['input_ids'].shape[0]} rows; "
                             f"call desmoe.data.packed_forward (it flattens the batch), or use batch size 1, or "
                             f"data.packing: concatenated")
    return {"input_ids": batch["input_ids"], "position_ids": pos, "use_cache": False}


def packed_forward(fwd, batch: dict, *, model=None, device=None, **kwargs):
    """``fwd(...)`` on ``batch`` (tensors moved to ``device`` when given), with each packed document attending only
    to itself when the batch has ``position_ids`` (isolated packing), else with its 2-D ``attention_mask``.
    ``model``: the module ``fwd`` wraps (a DDP wrapper's module), default ``fwd``. Under flash attention a batch of
    several rows goes in flattened to one row (transformers takes ``cu_seqlens`` from ``position_ids`` only then)
    and its ``logits`` come back as [B, S, V]. Returns the model's output."""
    def dev(t):
        return t if t is None or device is None else t.to(device)

    pos = batch.get("position_ids")
    if pos is None:
        return fwd(input_ids=dev(batch["input_ids"]), attention_mask=dev(batch.get("attention_mask")), **kwargs)
    impl = check_isolated_packing(model if model is not None else fwd)
    ids = dev(batch["input_ids"])
    pos = dev(pos)
    B, S = ids.shape
    flat = impl.startswith("flash") and B > 1
    if flat:
        ids, pos = ids.reshape(1, B * S), pos.reshape(1, B * S)
    out = fwd(input_ids=ids, position_ids=pos, use_cache=False, **kwargs)
    if flat and getattr(out, "logits", None) is not None:
        out.logits = out.logits.reshape(B, S, -1)
    return out

