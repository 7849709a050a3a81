"""What a patched model's modules read beyond their inputs, held keyed by module identity instead of as attributes on
the modules: the DES-MoE expert gradient masks (:class:`MaskScope`), the loss a method adds inside the routers
(:class:`AddedLossScope`, DES-MoE's KD) and the routers' records (:func:`recording`).

The experts forward looks its module up in :func:`expert_masks`, a router in :func:`added_loss` and
:func:`recorder`; only the scope objects below write, and each removes exactly what it put. Why a table in this
module and not a ``ContextVar``: the masks and the added loss must hold from a forward until the backward of that
forward has run, and activation checkpointing replays the forward inside the backward — after the caller's
``with`` has exited, and for CUDA tensors on the autograd engine's device thread, where a ``ContextVar`` set by the
caller is not visible. A plain dict keyed by the module is also what ``torch.compile`` guards on (dynamo cannot
trace ``ContextVar.get``, and a ``WeakKeyDictionary`` lookup is traced without a guard on its contents, so masks
set later would be ignored).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

# experts module -> its masks; router -> the loss it adds (a desmoe.layers.RouterAddedLoss); router -> the Recording
# it writes to. Written only through MaskScope / AddedLossScope / recording.
_MASKS: dict[nn.Module, ExpertMasks] = {}
_ADDED: dict[nn.Module, object] = {}
_RECORDERS: dict[nn.Module, Recording] = {}


@dataclass(frozen=True, eq=False)
class ExpertMasks:
    """The DES-MoE gradient masks one experts module applies in its backward (see :meth:`MaskScope.set`)."""

    expert_trainable_E: torch.Tensor | None = None
    token_domains_T: torch.Tensor | None = None
    domain_expert_mask_ME: torch.Tensor | None = None


def expert_masks(experts: nn.Module) -> ExpertMasks | None:
    """The masks held for ``experts`` (None: none)."""
    return _MASKS.get(experts)


def added_loss(router: nn.Module):
    """The :class:`desmoe.layers.RouterAddedLoss` held for ``router`` (None: none)."""
    return _ADDED.get(router)


def _drop(table: dict, held: dict, mod: nn.Module | None = None) -> None:
    """Remove ``held``'s entries (only ``mod``'s, when given) from ``table``, where no other scope replaced them."""
    for m in list(held) if mod is None else [mod] if mod in held else []:
        value = held.pop(m)
        if table.get(m) is value:
            del table[m]


class _HeldScope:
    """Entries one owner puts in a table (``_table``) keyed by module, held until :meth:`clear` (or the owner's next
    put for that module, or the scope being collected: an abandoned scope leaves nothing behind)."""

    _table: dict

    def __init__(self) -> None:
        self._held: dict[nn.Module, object] = {}
        weakref.finalize(self, _drop, self._table, self._held)

    def _put(self, mod: nn.Module, value) -> None:
        _drop(self._table, self._held, mod)
        if value is not None:
            self._held[mod] = self._table[mod] = value

    def clear(self) -> None:
        """Drop every entry this scope holds."""
        _drop(self._table, self._held)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.clear()


class MaskScope(_HeldScope):
    """The expert gradient masks one owner puts on experts modules, held from a forward through its backward.

    :meth:`set` holds masks for a module until :meth:`clear` (or the next :meth:`set` for it, or the scope being
    collected), so a forward that activation checkpointing replays inside the backward applies the same masks and
    saves the same tensors. :class:`desmoe.method.MethodController` owns one: ``applied`` sets this micro-batch's
    masks, ``applied``/``release``/``begin_step``/``before_optimizer_step`` clear them once the backward is done.
    As a context manager (tests, benchmarks) it clears at exit. Forwards without gradients ignore the masks.
    """

    _table = _MASKS

    def set(
        self,
        experts: nn.Module,
        *,
        expert_trainable_E: torch.Tensor | None = None,
        token_domains_T: torch.Tensor | None = None,
        domain_expert_mask_ME: torch.Tensor | None = None,
    ) -> None:
        """Hold (or, with all ``None``, drop) the masks of ``experts``.

        ``expert_trainable_E``: experts with False get no weight gradient. ``token_domains_T`` (int, one per
        flattened token of the next forward) with ``domain_expert_mask_ME`` (bool [M, E]): a (token, expert) pair
        updates that expert only if the token's domain owns it (per-token masking for mixed-domain batches).
        """
        if token_domains_T is not None and domain_expert_mask_ME is None:
            raise ValueError("token_domains_T needs domain_expert_mask_ME (bool [M, E])")
        given = (expert_trainable_E, token_domains_T, domain_expert_mask_ME)
        self._put(experts, ExpertMasks(*given) if any(t is not None for t in given) else None)


class AddedLossScope(_HeldScope):
    """The loss a method adds inside the routers' forwards (:class:`desmoe.layers.RouterAddedLoss`, DES-MoE's KD),
    held from a forward through its backward, as :class:`MaskScope` holds masks (a layer that activation
    checkpointing replays inside the backward attaches the same term). :class:`desmoe.method.MethodController`
    owns one, set and cleared with its masks."""

    _table = _ADDED

    def set(self, routers, added) -> None:
        """Hold ``added`` (None: drop) for every router of ``routers``."""
        for r in routers:
            self._put(r, added)


class Recording:
    """What each of ``routers`` routed in its latest forward inside :func:`recording` (kept after the scope)."""

    def __init__(self, routers) -> None:
        self.routers = list(routers)
        self._last: dict[nn.Module, dict] = {}

    def put(self, router: nn.Module, record: dict) -> None:
        """Called by the router's forward: ``x_TD``, ``base_logits_TE``, ``logits_TE``, ``topk_ids_TK``,
        ``topk_weights_TK``."""
        self._last[router] = record

    def last(self, router: nn.Module) -> dict | None:
        return self._last.get(router)

    def layers(self) -> list[dict]:
        """One record per router, in order; empty if a router has none (a forward did not complete)."""
        recs = [self._last.get(r) for r in self.routers]
        return recs if all(x is not None for x in recs) else []

    def clear(self) -> None:
        self._last.clear()


def recorder(router: nn.Module) -> Recording | None:
    """The recording ``router`` writes to (None: not recording)."""
    return _RECORDERS.get(router)


@contextlib.contextmanager
def recording(routers):
    """``with recording(routers) as rec:`` — within the scope each router records its forward into ``rec``
    (``rec.layers()``, ``rec.last(router)``); afterwards the routers record nothing (an inner scope over the same
    router records into its own ``rec`` and hands the router back to the outer one)."""
    rec = Recording(routers)
    previous = {r: _RECORDERS.get(r) for r in rec.routers}
    for r in rec.routers:
        _RECORDERS[r] = rec
    try:
        yield rec
    finally:
        for r, prev in previous.items():
            if prev is None:
                _RECORDERS.pop(r, None)
            else:
                _RECORDERS[r] = prev
