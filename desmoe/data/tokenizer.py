"""A small byte-level BPE tokenizer trained on local text (``tokenizers``), wrapped for ``transformers``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ._util import cache_root, seeded_subset

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_SAMPLE_DOCS_PER_DOMAIN = 1500
_SAMPLE_CHARS_PER_DOC = 2000


def train_tokenizer(texts: list[str], vocab_size: int = 2048, save_dir: str | None = None):
    """Train a byte-level BPE tokenizer (deterministic) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk>`` special tokens (ids 0-3);
    encoding adds no special tokens. With ``save_dir`` it is saved with ``save_pretrained`` (loadable by
    ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if not texts:
        raise ValueError("texts must be non-empty to train a tokenizer")
    n_special = len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be an int >= {256 + n_special} (256 bytes + specials), got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30, **SPECIAL_TOKENS)
    if save_dir is not None:
        hf.save_pretrained(save_dir)
    return hf


def _load_saved(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def default_tokenizer(cache_dir: str | None = None, vocab_size: int = 2048):
    """The project's default tokenizer: BPE trained once on a fixed sample of every available built-in domain.

    Cached under ``cache_dir`` (default ``~/.cache/desmoe/tokenizer-<vocab_size>``; ``$DESMOE_CACHE_DIR``
    moves the root); later calls load it from there. Built-in domains whose source is missing here are skipped
    (their names are recorded in ``desmoe_tokenizer.json`` next to the tokenizer).
    """
    from .builtin import DOMAINS, DataSourceError, load_builtin

    path = Path(cache_dir).expanduser() if cache_dir else cache_root() / f"tokenizer-{vocab_size}"
    if (path / "tokenizer.json").exists():
        return _load_saved(path)
    texts, used, missing = [], [], []
    for domain in DOMAINS:
        try:
            docs = load_builtin(domain, "train", None, 0)
        except DataSourceError:
            missing.append(domain)
            continue
        used.append(domain)
        texts += [t[:_SAMPLE_CHARS_PER_DOC] for t in seeded_subset(docs, _SAMPLE_DOCS_PER_DOMAIN, 0, "tok", domain)]
    if not texts:
        raise DataSourceError(f"no built-in domain is available to train the default tokenizer (missing: {missing})")
    tok = train_tokenizer(texts, vocab_size)
    # build in a temp dir and rename: concurrent first calls never see a half-written tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    tok.save_pretrained(str(tmp))
    with open(tmp / "desmoe_tokenizer.json", "w") as f:
        json.dump({"vocab_size": vocab_size, "domains": used, "missing": missing}, f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process won the race (or path exists): use theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_saved(path) if (path / "tokenizer.json").exists() else tok
