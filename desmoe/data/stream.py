"""Tokenized documents -> packed training batches (``MixedDomainStream``) and fixed eval batches.

Packing rule (shared by both): documents are appended to a row each followed by ``eos``; a document that
does not fit in the rest of the row starts the next row (the rest is padding) unless it is longer than a whole
row, in which case it fills the row and continues in the domain's next row. Short documents (a math problem)
are therefore never cut; long ones (a source file) waste nothing.

Supervision: every token of a raw-text document is a target, its EOS included (labels = input_ids, -100 on
padding). An SFT document (:class:`~desmoe.data.sft.SupervisedDoc`) carries one flag per token: its labels are
-100 outside the assistant / completion tokens, and its first token is never a target, so no loss term predicts
one document from the one packed before it.

Attention across documents (``packing``):

- ``"isolated"`` (the default): each batch also has ``position_ids`` that restart at 0 at every document (and at
  the row's padding, and where a long document continues from the previous row). Fed through
  :func:`model_inputs` (``position_ids``, no 2-D ``attention_mask``, ``use_cache=False``), a transformers model
  whose masks come from ``transformers.masking_utils`` (every v5 MoE model) builds a block-diagonal causal mask
  from them (eager / sdpa / flex attention; flash attention takes ``cu_seqlens`` from them, which transformers does
  for a batch of one row, so :func:`packed_forward` flattens the batch to one row there): a document's tokens see
  only that document, and get the logits they would get alone. A document's first token is not a target either
  (as in transformers' ``DataCollatorWithFlattening``): no loss term predicts it from the document before, so a
  packed document's loss is its loss alone. :func:`check_isolated_packing` says when a model cannot do it.
- ``"concatenated"``: no ``position_ids``; documents of a row attend to the earlier documents of that row and
  positions run on across them (the cheaper classic LM packing, and desmoe's behaviour before ``packing``).
"""
from __future__ import annotations

import torch

from ._util import permutation, uniform01
from .sft import tokenize_texts

_IGNORE = -100
PACKING_MODES = ("isolated", "concatenated")


def _check_packing(v) -> str:
    if v not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(map(repr, PACKING_MODES))}, got {v!r}")
    return v


def _positions(starts: list[int], n: int, seq_len: int) -> torch.Tensor:
    """LongTensor[seq_len]: 0, 1, … from each segment start in ``starts`` (ascending, starting at 0) over the ``n``
    real tokens, and again from 0 over the padding ``n..seq_len``."""
    pos = torch.arange(seq_len, dtype=torch.long)
    bounds = list(starts) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        pos[a:b] -= a
    pos[n:] -= n
    return pos


def _check_positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_docs(name: str, docs) -> list[list[int]]:
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(docs).__name__}")
    return [d for d in docs if len(d) > 0]  # no copy: corpora can be millions of tokens


class _Packer:
    """Fills rows from a cursor (doc index, token offset) over an ordered list of documents."""

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len = seq_len
        self.eos_id = eos_id

    def fill(self, row: list[int], doc: list[int], offset: int, sup: list[int] | None = None) -> tuple[int, bool]:
        """Append from ``doc[offset:] + [eos]`` to ``row``; returns (new offset, doc finished). ``sup``: a list
        kept parallel to ``row``, extended with each appended token's supervision flag (1 for raw text).

        Returns offset unchanged (and False) when a short doc does not fit: the row is done.
        """
        unit_len = len(doc) + 1
        space = self.seq_len - len(row)
        remaining = unit_len - offset
        if remaining <= space:
            row.extend(doc[offset:])
            row.append(self.eos_id)
            if sup is not None:
                _extend_sup(sup, doc, offset, len(doc), True)
            return 0, True
        if unit_len > self.seq_len or offset > 0:  # a long doc: cut it at the row boundary
            take = doc[offset: offset + space]
            row.extend(take)
            if sup is not None:
                _extend_sup(sup, doc, offset, offset + len(take), len(take) < space)
            if len(take) < space:  # only the eos was left out
                row.append(self.eos_id)
                return 0, True
            return offset + space, False
        return offset, False


def _extend_sup(sup: list[int], doc, start: int, stop: int, eos: bool) -> None:
    mask = getattr(doc, "mask", None)
    if mask is None:
        sup.extend([1] * (stop - start + eos))
        return
    sup.extend(mask[start:stop])
    if eos:
        sup.append(int(doc.eos_target))


def _has_sft(docs) -> bool:
    return any(getattr(d, "mask", None) is not None for d in docs)


class MixedDomainStream:
    """Deterministic, resumable, domain-balanced stream of packed sequences.

    ``token_docs`` maps domain name -> tokenized documents; domain ``i`` is the ``i``-th key
    (:attr:`domain_names`). Every row of the global row sequence is packed from ONE domain, drawn from a seeded
    counter-based RNG: with ``weights=None`` domains come in shuffled blocks of one row each (exactly balanced
    every ``len(domains)`` rows); with ``weights`` each row's domain is drawn independently with those
    probabilities. Each domain walks its documents in a per-epoch seeded shuffle. Global batch ``k`` is rows
    ``[k*B*W, (k+1)*B*W)``; rank ``r`` takes rows ``r*B .. r*B+B-1`` of it (B = batch_size, W = world_size).

    :meth:`next_batch` returns ``input_ids``, ``labels`` (input_ids, -100 on padding, on the tokens of SFT
    documents that are not targets and, isolated, on the first token of each document after a row's first),
    ``domain_ids`` (domain index per token, -1 on padding), ``attention_mask`` (1 real / 0 padding) and, with
    ``packing="isolated"`` (default), ``position_ids`` (restarting at 0 at every document), all LongTensor[B, S].
    Feed the model with :func:`~desmoe.data.packed_forward` / :func:`~desmoe.data.model_inputs`, not
    ``model(**batch)``: transformers reads document boundaries off ``position_ids`` only when no 2-D attention mask
    is passed (see the module docstring).
    :meth:`state_dict` is a small JSON-able dict; :meth:`load_state_dict` resumes exactly.
    """

    def __init__(self, token_docs: dict[str, list[list[int]]], seq_len: int, batch_size: int, *, seed: int = 0,
                 weights: dict[str, float] | None = None, eos_id: int, rank: int = 0, world_size: int = 1,
                 packing: str = "isolated"):
        if not isinstance(token_docs, dict) or not token_docs:
            raise ValueError("token_docs must be a non-empty dict {domain name: list of token-id lists}")
        self.seq_len = _check_positive("seq_len", seq_len)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.world_size = _check_positive("world_size", world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(eos_id, int) or isinstance(eos_id, bool) or eos_id < 0:
            raise ValueError(f"eos_id must be a non-negative int, got {eos_id!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed, self.rank, self.eos_id = seed, rank, eos_id
        self.packing = _check_packing(packing)
        self.domain_names = list(token_docs)
        self._docs = []
        for name in self.domain_names:
            docs = _check_docs(f"token_docs[{name!r}]", token_docs[name])
            if not docs:
                raise ValueError(f"token_docs[{name!r}] has no non-empty documents")
            self._docs.append(docs)
        self._cum_weights = None
        if weights is not None:
            if not isinstance(weights, dict) or set(weights) != set(self.domain_names):
                raise ValueError(f"weights must be a dict with exactly the domains {self.domain_names}, "
                                 f"got keys {list(weights) if isinstance(weights, dict) else weights!r}")
            w = [float(weights[n]) for n in self.domain_names]
            if any(not (x >= 0) for x in w) or sum(w) <= 0:
                raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
            total, acc, self._cum_weights = sum(w), 0.0, []
            for x in w:
                acc += x / total
                self._cum_weights.append(acc)
        self._packer = _Packer(seq_len, eos_id)
        self._sft = any(_has_sft(docs) for docs in self._docs)  # supervision flags needed (else every token)
        self._row = 0  # next global row index
        self._cursors = [[0, 0, 0] for _ in self._docs]  # per domain: [epoch, position in epoch order, offset]
        self._perms: dict[int, tuple[int, list[int]]] = {}

    # ------------------------------------------------------------------------------------------- internals
    def _domain_of_row(self, row: int) -> int:
        m = len(self._docs)
        if self._cum_weights is None:
            block, pos = divmod(row, m)
            return permutation(m, "block", self.seed, block)[pos]
        u = uniform01("row", self.seed, row)
        for d, c in enumerate(self._cum_weights):
            if u < c:
                return d
        return m - 1

    def _order(self, d: int, epoch: int) -> list[int]:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, permutation(len(self._docs[d]), "epoch", self.seed, d, epoch))
            self._perms[d] = cached
        return cached[1]

    def _next_row(self) -> tuple[list[int], int, list[int] | None, list[int]]:
        d = self._domain_of_row(self._row)
        self._row += 1
        docs, cur = self._docs[d], self._cursors[d]
        row: list[int] = []
        sup: list[int] | None = [] if self._sft else None
        starts: list[int] = []  # where each document (or the rest of a long one) begins in the row
        while len(row) < self.seq_len:
            epoch, pos, offset = cur
            doc = docs[self._order(d, epoch)[pos]]
            start = len(row)
            offset, done = self._packer.fill(row, doc, offset, sup)
            if len(row) > start:
                starts.append(start)
            if done:
                pos += 1
                if pos == len(docs):
                    epoch, pos = epoch + 1, 0
                cur[:] = [epoch, pos, 0]
            else:  # a short doc did not fit (row is done), or the row filled up mid-doc
                cur[2] = offset
                break
        return row, d, sup, starts

    # ------------------------------------------------------------------------------------------- public API
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next [batch_size, seq_len] batch of this rank (see the class docstring for the fields)."""
        B, S = self.batch_size, self.seq_len
        input_ids = torch.full((B, S), self.eos_id, dtype=torch.long)
        domain_ids = torch.full((B, S), -1, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        target = torch.ones((B, S), dtype=torch.bool)
        isolated = self.packing == "isolated"
        position_ids = torch.zeros((B, S), dtype=torch.long) if isolated else None
        for r in range(self.world_size):
            for b in range(B):
                row, d, sup, starts = self._next_row()  # every rank advances through the whole global batch
                if r != self.rank:
                    continue
                n = len(row)
                input_ids[b, :n] = torch.tensor(row, dtype=torch.long)
                domain_ids[b, :n] = d
                attention_mask[b, :n] = 1
                if sup is not None:
                    target[b, :n] = torch.tensor(sup, dtype=torch.bool)
                if isolated:
                    position_ids[b] = _positions(starts, n, S)
        labels = input_ids.masked_fill((attention_mask == 0) | ~target, _IGNORE)
        out = {"input_ids": input_ids, "labels": labels, "domain_ids": domain_ids, "attention_mask": attention_mask}
        if isolated:
            out["position_ids"] = position_ids
            labels[:, 1:].masked_fill_(position_ids[:, 1:] == 0, _IGNORE)  # no document predicted from the last
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Position of the stream: small and JSON-able (the RNG is counter-based, so its state is the row)."""
        return {"version": 1, "seed": self.seed, "domain_names": list(self.domain_names),
                "num_docs": [len(d) for d in self._docs], "seq_len": self.seq_len, "row": self._row,
                "cursors": [list(c) for c in self._cursors]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the following batches equal those of an uninterrupted stream."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("state must be a dict produced by MixedDomainStream.state_dict() (version 1)")
        for key, mine in (("seed", self.seed), ("domain_names", self.domain_names), ("seq_len", self.seq_len),
                          ("num_docs", [len(d) for d in self._docs])):
            theirs = state.get(key)
            if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != mine:
                raise ValueError(f"stream state has {key}={theirs!r} but this stream has {key}={mine!r}")
        cursors = state["cursors"]
        if len(cursors) != len(self._docs) or any(len(c) != 3 for c in cursors):
            raise ValueError("stream state 'cursors' must hold one [epoch, position, offset] per domain")
        self._row = int(state["row"])
        self._cursors = [[int(x) for x in c] for c in cursors]
        self._perms = {}


def tokenize_domains(tokenizer, texts_by_domain: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Token ids (no special tokens) of every document, per domain; keeps the dict order. SFT documents
    (:class:`~desmoe.data.sft.SFTDoc`) become :class:`~desmoe.data.sft.SupervisedDoc` (ids + supervision mask)."""
    if not isinstance(texts_by_domain, dict):
        raise TypeError(f"texts_by_domain must be a dict {{domain: list of str}}, got {type(texts_by_domain).__name__}")
    out = {}
    for name, texts in texts_by_domain.items():
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts_by_domain[{name!r}] must be a list of str, got {type(texts).__name__}")
        out[name] = tokenize_texts(tokenizer, texts)
    return out


def eval_batches(token_docs: list[list[int]], seq_len: int, batch_size: int, eos_id: int,
                 max_batches: int | None = None, packing: str = "isolated") -> list[dict]:
    """Fixed held-out batches: documents packed in order (no shuffle) with the training packing rule.

    Each dict has ``input_ids``, ``labels`` (-100 on padding and on SFT documents' non-target tokens),
    ``attention_mask`` and, with ``packing="isolated"``, ``position_ids`` (see the module docstring),
    LongTensor[b, seq_len]; the last batch may have fewer rows. At most ``max_batches`` batches.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    _check_packing(packing)
    docs = _check_docs("token_docs", token_docs)
    packer = _Packer(seq_len, eos_id)
    sft = _has_sft(docs)
    max_rows = None if max_batches is None else max_batches * batch_size
    rows: list[list[int]] = []
    sups: list[list[int] | None] = []
    row_starts: list[list[int]] = []
    i, offset, row, sup, starts = 0, 0, [], [] if sft else None, []
    while i < len(docs) and (max_rows is None or len(rows) < max_rows):
        n0 = len(row)
        offset, done = packer.fill(row, docs[i], offset, sup)
        if len(row) > n0:
            starts.append(n0)
        if done:
            i += 1
        if len(row) == seq_len or not done:  # full, or the next doc starts a new row
            rows.append(row)
            sups.append(sup)
            row_starts.append(starts)
            row, sup, starts = [], [] if sft else None, []
    if row and (max_rows is None or len(rows) < max_rows):
        rows.append(row)
        sups.append(sup)
        row_starts.append(starts)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids = torch.full((len(chunk), seq_len), eos_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), seq_len), dtype=torch.long)
        target = torch.ones((len(chunk), seq_len), dtype=torch.bool)
        pos = torch.zeros((len(chunk), seq_len), dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
            if sups[start + b] is not None:
                target[b, :len(r)] = torch.tensor(sups[start + b], dtype=torch.bool)
            pos[b] = _positions(row_starts[start + b], len(r), seq_len)
        batch = {"input_ids": ids, "labels": ids.masked_fill((mask == 0) | ~target, _IGNORE),
                 "attention_mask": mask}
        if packing == "isolated":
            batch["position_ids"] = pos
            batch["labels"][:, 1:].masked_fill_(pos[:, 1:] == 0, _IGNORE)
        batches.append(batch)
    return batches
