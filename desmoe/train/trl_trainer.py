"""DES-MoE inside TRL's ``SFTTrainer``: chat / prompt-completion SFT data, the loss on the assistant (completion)
tokens only, TRL's defaults (activation checkpointing on, bf16).

    from desmoe.train import DesMoESFTTrainer
    from trl import SFTConfig
    trainer = DesMoESFTTrainer(model=model, args=SFTConfig(output_dir="out", max_steps=2000,
                                                           assistant_only_loss=True),
                               train_dataset=ds,  # rows: "messages" (or prompt/completion) + "domain"
                               processing_class=tokenizer,
                               method={"name": "des_moe"}, domain_names=["math", "code", "law"])
    trainer.train()

Each row names its domain in the ``domain`` column (a name from ``domain_names`` or its index; ``domain_column=``
renames it); every token of the row gets that domain in ``domain_ids`` (``-1`` on padding), packed rows included,
so phases, per-token DGES masks, KD and checkpoints behave exactly as in :class:`desmoe.train.DesMoETrainer` (the
same :class:`~desmoe.train.hf_trainer.DesMoEMixin`). The KD term is computed over the tokens the loss supervises.
An evaluation dataset may lack the column (a general set: no domains needed to evaluate). A tokenizer without a
chat template gets :data:`CHAT_TEMPLATE` (ChatML-style, with the ``{% generation %}`` markers TRL's
``assistant_only_loss`` needs). Packing uses TRL's ``bfd`` strategy (rows never split across packed sequences);
TRL computes per-document position ids for packed rows, which attention honours with ``padding_free`` / a
flash-attention implementation; with eager / SDPA attention a packed row's documents attend to each other, as in
TRL itself.
"""
from __future__ import annotations

import torch

try:
    from trl import SFTTrainer
    from trl.data_utils import pack_dataset
except ImportError as e:  # pragma: no cover - optional extra
    raise ImportError(f"desmoe.train.DesMoESFTTrainer needs TRL (`pip install 'desmoe[trl]'`): {e}") from None

from ..data.sft import CHAT_TEMPLATE  # noqa: F401  (re-exported: the template given to bare tokenizers)
from .hf_trainer import DesMoEMixin

_INDEX = "desmoe_domain"


class DesMoESFTTrainer(DesMoEMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with DES-MoE (or a baseline); see the module docstring."""

    _desmoe_name = "DesMoESFTTrainer"

    def __init__(self, *args, domain_column: str = "domain", **kwargs):
        if not isinstance(domain_column, str) or not domain_column:
            raise ValueError(f"DesMoESFTTrainer: domain_column must be a column name, got {domain_column!r}")
        self.desmoe_domain_column = domain_column
        tok = kwargs.get("processing_class")
        if tok is not None and getattr(tok, "chat_template", None) is None and hasattr(tok, "chat_template"):
            tok.chat_template = CHAT_TEMPLATE
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(targs, "packing", False) and getattr(targs, "packing_strategy", "bfd") != "bfd":
            raise ValueError(f"DesMoESFTTrainer: args.packing_strategy={targs.packing_strategy!r} is not supported "
                             f"with per-token domains; use 'bfd' (rows are never split across packed sequences)")
        super().__init__(*args, **kwargs)
        self.data_collator = _WithDomainIds(self.data_collator)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        from trl.data_utils import get_dataset_column_names

        names, col = self.desmoe.domain_names, self.desmoe_domain_column
        cols = get_dataset_column_names(dataset)
        if col in cols:
            def to_index(example, i):
                d = example[col]
                if isinstance(d, str) and d in names:
                    return {_INDEX: names.index(d)}
                if isinstance(d, int) and not isinstance(d, bool) and 0 <= d < len(names):
                    return {_INDEX: d}
                raise ValueError(f"DesMoESFTTrainer: {dataset_name} dataset row {i}: {col}={d!r} is not one of the "
                                 f"domain_names {names} (or their index 0..{len(names) - 1})")

            dataset = dataset.map(to_index, with_indices=True)
        elif dataset_name == "train":
            raise ValueError(f"DesMoESFTTrainer: the train dataset has no {col!r} column (each row's domain, one of "
                             f"{names}); its columns are {cols}. Add it, or name it with domain_column=")
        out = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        has = _INDEX in get_dataset_column_names(out)

        def domain_ids(example):
            return {"domain_ids": [example[_INDEX] if has else -1] * len(example["input_ids"])}

        out = out.map(domain_ids)
        if has:
            out = out.remove_columns([_INDEX])
        if packing:
            if args.max_length is None:
                raise ValueError("DesMoESFTTrainer: packing needs args.max_length")
            out = pack_dataset(out.select_columns(["input_ids", "labels", "domain_ids"]), args.max_length, "bfd")
        return out

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "domain_ids" not in self._signature_columns:
            self._signature_columns.append("domain_ids")


class _WithDomainIds:
    """Wraps TRL's collator: its batch, plus ``domain_ids`` [B, S] laid out like ``input_ids`` (right padding with
    -1; one flattened row under ``padding_free``)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        doms = [torch.as_tensor(ex["domain_ids"], dtype=torch.long) for ex in examples]
        out = self.inner([{k: v for k, v in ex.items() if k != "domain_ids"} for ex in examples])
        B, S = out["input_ids"].shape
        # TRL turns padding-free on by itself (e.g. with bfd packing): read it off the collator it built
        rows = [torch.cat(doms)] if getattr(self.inner, "padding_free", False) else doms
        if len(rows) != B:
            raise ValueError(f"DesMoESFTTrainer: the collator made {B} rows from {len(examples)} examples")
        dom = torch.full((B, S), -1, dtype=torch.long)
        for i, d in enumerate(rows):
            dom[i, :min(len(d), S)] = d[:S]
        out["domain_ids"] = dom
        return out
