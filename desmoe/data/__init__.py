"""Data without internet: built-in offline domains, local/hub datasets, a small BPE tokenizer, and
deterministic, resumable domain-balanced packing (DESIGN.md section 6).

>>> texts = {d: load_domain_texts(d, "train", max_docs=500) for d in ("math", "general")}
>>> tok = default_tokenizer()
>>> stream = MixedDomainStream(tokenize_domains(tok, texts), seq_len=256, batch_size=8, eos_id=tok.eos_token_id)
>>> batch = stream.next_batch()   # input_ids / labels / domain_ids / attention_mask / position_ids, [8, 256]
>>> out = packed_forward(model, batch)   # each packed document attends only to itself
"""
from __future__ import annotations

from .builtin import DOMAINS, DataSourceError
from .packing import check_isolated_packing, model_inputs, packed_forward
from .mathgen import extract_answer, format_math, math_problems
from .sources import format_record, load_domain_texts
from .stream import PACKING_MODES, MixedDomainStream, eval_batches, tokenize_domains
from .tokenizer import default_tokenizer, train_tokenizer

__all__ = ["DOMAINS", "DataSourceError", "load_domain_texts", "math_problems", "format_math", "extract_answer",
           "format_record", "train_tokenizer", "default_tokenizer", "MixedDomainStream", "tokenize_domains",
           "eval_batches", "PACKING_MODES", "packed_forward", "model_inputs", "check_isolated_packing"]
