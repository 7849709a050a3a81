"""Data without internet: built-in offline domains, local/hub datasets, a small BPE tokenizer, and
deterministic, resumable domain-balanced packing (DESIGN.md section 6).

>>> texts = {d: load_domain_texts(d, "train", max_docs=500) for d in ("math", "general")}
>>> tok = default_tokenizer()
>>> stream = MixedDomainStream(tokenize_domains(tok, texts), seq_len=256, batch_size=8, eos_id=tok.eos_token_id)
>>> batch = stream.next_batch()   # input_ids / labels / domain_ids / attention_mask, LongTensor[8, 256]
"""
from __future__ import annotations

from .builtin import DOMAINS, DataSourceError
from .mathgen import extract_answer, format_math, math_problems
from .sources import format_record, load_domain_texts
from .stream import MixedDomainStream, eval_batches, tokenize_domains
from .tokenizer import default_tokenizer, train_tokenizer

__all__ = ["DOMAINS", "DataSourceError", "load_domain_texts", "math_problems", "format_math", "extract_answer",
           "format_record", "train_tokenizer", "default_tokenizer", "MixedDomainStream", "tokenize_domains",
           "eval_batches"]
