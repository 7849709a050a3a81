"""AdamW whose routed-expert weights keep moments only for the experts that may train.

An experts weight is one ``[E, ...]`` tensor per layer. Under DES-MoE's masks (and ESFT's selection) most of its
rows do not train in a step; a plain AdamW still holds ``exp_avg``/``exp_avg_sq`` for all of them (kept at zero by
:meth:`~desmoe.method.controller.MethodController.before_optimizer_step`) and runs its elementwise update over all
of them. :class:`ExpertRowAdamW` keeps those two moments for the current trainable rows only and updates only
those rows: the state of an experts weight is ``[n_rows, ...]`` with the row ids beside it (``desmoe_rows``, a
list of ints, so checkpoints keep them exactly). A row that stops training drops its moments, a row that starts
gets zeros — what the plain optimizer's zeroed rows hold — so every update is the plain optimizer's, bitwise on
the same kernels (the same AdamW code runs on the gathered rows). Other parameters, and experts weights sharded
as DTensors (FSDP2, whose distributed optimizer checkpoint expects state shaped like the parameter), take the
plain path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

EXPERTS_GROUP_KEY = "desmoe_expert_decay"  # the controller's experts parameter group carries this key
ROWS_KEY = "desmoe_rows"


class ExpertRowAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over ``params`` (the controller's :meth:`param_groups`) with compact moments for the
    experts group. ``rows_of()``: ``{id(experts weight): bool [E]}``, the rows that may train now (asked once per
    step), or None when all rows of every experts weight may."""

    def __init__(self, params, *, rows_of: Callable[[], Optional[dict]], **kwargs):
        super().__init__(params, **kwargs)
        self._rows_of = rows_of

    def _compact(self, p: torch.Tensor) -> bool:
        return p.grad is not None and not hasattr(p, "to_local") and p.dim() >= 1

    @torch.no_grad()
    def _rows_state(self, p: torch.Tensor, rows: list[int]) -> dict:
        """``self.state[p]`` with its moments moved onto ``rows`` (kept rows keep theirs, new rows get zeros)."""
        st = self.state[p]
        if not st:  # first step: AdamW makes zero moments shaped like the gathered rows
            return st
        if st.get(ROWS_KEY) == rows:
            return st
        old = st.get(ROWS_KEY)
        if old is None:  # state made by the plain path (all rows), e.g. loaded from a plain AdamW checkpoint
            old = list(range(p.shape[0]))
        pos = {r: i for i, r in enumerate(old)}
        keep_new = [i for i, r in enumerate(rows) if r in pos]
        keep_old = [pos[rows[i]] for i in keep_new]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                t = st[key]
                new = torch.zeros((len(rows), *t.shape[1:]), dtype=t.dtype, device=t.device)
                if keep_new:
                    new[torch.tensor(keep_new, device=t.device)] = t[torch.tensor(keep_old, device=t.device)]
                st[key] = new
        st[ROWS_KEY] = rows
        return st

    @torch.no_grad()
    def step(self, closure=None):
        groups = [(g, g["params"]) for g in self.param_groups if EXPERTS_GROUP_KEY in g]
        stand_ins = []  # (parameter, its gathered rows stepped in its place, row index)
        masks = self._rows_of() if groups else None
        try:
            for g, params in groups:
                stepped = []
                for p in params:
                    if not self._compact(p):
                        stepped.append(p)
                        continue
                    rows = (list(range(p.shape[0])) if masks is None
                            else masks[id(p)].nonzero().flatten().tolist())
                    st = self._rows_state(p, rows)
                    idx = torch.tensor(rows, dtype=torch.long, device=p.device)
                    t = p.detach().index_select(0, idx)
                    t.grad = p.grad.index_select(0, idx)
                    self.state[t] = st  # the same dict: AdamW updates the compact moments in place
                    self.state.pop(p)
                    stand_ins.append((p, t, idx))
                    stepped.append(t)
                g["params"] = stepped
            loss = super().step(closure)
        finally:
            for g, params in groups:
                g["params"] = params
            for p, t, idx in stand_ins:
                self.state[p] = st = self.state.pop(t)
                if st:
                    st[ROWS_KEY] = idx.tolist()
        for p, t, idx in stand_ins:
            p.detach().index_copy_(0, idx, t)
        return loss

    # the parent's step is already wrapped with the optimizer hooks; this one must not run them a second time
    step.hooked = True
