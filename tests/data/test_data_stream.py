"""desmoe.data tokenizer and packing: MixedDomainStream, eval_batches, tokenize_domains."""
import json
from collections import Counter

import pytest
import torch

from desmoe.data import (MixedDomainStream, default_tokenizer, eval_batches, load_domain_texts, tokenize_domains,
                         train_tokenizer)

EOS = 1


def _docs(prefix: int, n: int, lo: int = 1, hi: int = 9) -> list[list[int]]:
    """n documents whose tokens encode (domain, doc index) so rows can be traced back: token = prefix*10^4+i*10+j."""
    return [[prefix * 10_000 + i * 10 + j for j in range(lo + (i * 7) % (hi - lo + 1))] for i in range(n)]


def _token_docs():
    long_docs = [[3 * 10_000 + i * 100 + j for j in range(40 + 11 * i)] for i in range(5)]  # longer than a row
    return {"a": _docs(1, 30), "b": _docs(2, 17, 3, 12), "c": long_docs}


def _stream(**kw):
    args = dict(seq_len=24, batch_size=4, seed=3, eos_id=EOS, packing="concatenated")  # isolated: test_packing.py
    args.update(kw)
    return MixedDomainStream(_token_docs(), **args)


def _rows(batch):
    """Real (unpadded) tokens of each row, with its domain."""
    out = []
    for ids, mask, dom in zip(batch["input_ids"], batch["attention_mask"], batch["domain_ids"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # padding only at the end
        out.append((ids[:n].tolist(), int(dom[0]) if n else -1))
    return out


@pytest.mark.parametrize("packing", ["concatenated", "isolated"])
def test_batch_fields_and_padding(packing):
    s = _stream(packing=packing)
    assert s.domain_names == ["a", "b", "c"]
    for _ in range(10):
        b = s.next_batch()
        extra = {"position_ids"} if packing == "isolated" else set()
        assert set(b) == {"input_ids", "labels", "domain_ids", "attention_mask"} | extra
        for v in b.values():
            assert v.dtype == torch.long and v.shape == (4, 24)
        pad = b["attention_mask"] == 0
        target = ~pad
        if packing == "isolated":
            target[:, 1:] &= b["position_ids"][:, 1:] != 0
        assert (b["labels"][~target] == -100).all() and (b["labels"][target] == b["input_ids"][target]).all()
        assert (b["domain_ids"][pad] == -1).all()
        for row_dom, row_mask in zip(b["domain_ids"], b["attention_mask"]):  # one domain per row
            assert row_dom[row_mask == 1].unique().numel() == 1


def test_packing_reconstructs_every_document_once_per_epoch():
    token_docs = _token_docs()
    s = _stream()
    per_domain = {0: [], 1: [], 2: []}
    for _ in range(60):
        for toks, d in _rows(s.next_batch()):
            per_domain[d].append(toks)
    for d, name in enumerate(s.domain_names):
        stream_toks = [t for row in per_domain[d] for t in row]
        docs, cur = [], []
        for t in stream_toks:  # eos between documents
            if t == EOS:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
        n = len(token_docs[name])
        assert len(docs) >= 2 * n
        epochs = [docs[e * n:(e + 1) * n] for e in range(2)]
        for got in epochs:
            assert sorted(got) == sorted(token_docs[name])  # each doc exactly once per epoch, intact
        assert epochs[0] != token_docs[name] and epochs[0] != epochs[1]  # a fresh seeded shuffle per epoch
        if name != "c":  # short docs are never cut across rows
            for row in per_domain[d]:
                assert row[-1] == EOS


def test_long_documents_fill_rows_without_padding():
    s = MixedDomainStream({"c": _token_docs()["c"]}, seq_len=24, batch_size=3, eos_id=EOS)
    for _ in range(5):
        b = s.next_batch()
        assert b["attention_mask"].all()  # long docs are cut at row boundaries: no padding at all


def test_deterministic_and_seeded():
    a, b, c = _stream(), _stream(), _stream(seed=4)
    ba = [a.next_batch() for _ in range(6)]
    bb = [b.next_batch() for _ in range(6)]
    bc = [c.next_batch() for _ in range(6)]
    for x, y in zip(ba, bb):
        for k in x:
            assert torch.equal(x[k], y[k])
    assert any(not torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(ba, bc))


def test_balanced_and_weighted_domain_counts():
    s = _stream(batch_size=6)
    counts = Counter(d for _ in range(20) for _, d in _rows(s.next_batch()))
    assert counts == {0: 40, 1: 40, 2: 40}  # balanced: exact every len(domains) rows
    w = _stream(batch_size=8, weights={"a": 0.5, "b": 0.3, "c": 0.2})
    n = 8 * 100
    counts = Counter(d for _ in range(100) for _, d in _rows(w.next_batch()))
    for d, p in enumerate((0.5, 0.3, 0.2)):
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(counts[d] - n * p) < 4 * sd, (counts, d)
    zero = _stream(weights={"a": 1.0, "b": 0.0, "c": 0.0})
    assert all(d == 0 for _ in range(5) for _, d in _rows(zero.next_batch()))


def test_ranks_get_disjoint_shares_of_the_global_rows():
    world = 3
    single = _stream(batch_size=4 * world)
    ranks = [_stream(batch_size=4, rank=r, world_size=world) for r in range(world)]
    for _ in range(5):
        g = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for k in g:
            assert torch.equal(torch.cat([p[k] for p in parts]), g[k])
    rows = [tuple(row) for p in parts for row in p["input_ids"].tolist()]
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("stop", [0, 1, 3, 7, 13])
@pytest.mark.parametrize("world_size,weights", [(1, None), (2, {"a": 2.0, "b": 1.0, "c": 1.0})])
def test_exact_resume_from_state_dict(stop, world_size, weights):
    ref = _stream(world_size=world_size, rank=world_size - 1, weights=weights)
    run = _stream(world_size=world_size, rank=world_size - 1, weights=weights)
    expected = [ref.next_batch() for _ in range(stop + 6)]
    for _ in range(stop):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # JSON-able
    assert len(json.dumps(state)) < 1000
    resumed = _stream(world_size=world_size, rank=world_size - 1, weights=weights)
    resumed.load_state_dict(state)
    for i in range(6):
        got = resumed.next_batch()
        for k in got:
            assert torch.equal(got[k], expected[stop + i][k]), (stop, i, k)


def test_state_mismatch_and_bad_arguments():
    s = _stream()
    s.next_batch()
    state = s.state_dict()
    other = MixedDomainStream({"a": [[5, 6]], "x": [[7]]}, seq_len=24, batch_size=4, seed=3, eos_id=EOS)
    with pytest.raises(ValueError, match="domain_names"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        _stream(seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        _stream(seq_len=0)
    with pytest.raises(ValueError, match="rank"):
        _stream(rank=2, world_size=2)
    with pytest.raises(ValueError, match="weights"):
        _stream(weights={"a": 1.0})
    with pytest.raises(ValueError, match="'b'"):
        MixedDomainStream({"a": [[1]], "b": [[]]}, seq_len=8, batch_size=1, eos_id=EOS)


def test_eval_batches_fixed_in_order():
    docs = _docs(1, 25) + [list(range(100, 160))]  # one doc longer than a row
    batches = eval_batches(docs, seq_len=16, batch_size=3, eos_id=EOS)
    again = eval_batches(docs, seq_len=16, batch_size=3, eos_id=EOS)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    flat = []
    for b in batches:
        assert set(b) == {"input_ids", "labels", "attention_mask", "position_ids"} and b["input_ids"].shape[1] == 16
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == -100).all()
        for row, m in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
            flat += [t for t, k in zip(row, m) if k]
    assert flat == [t for d in docs for t in d + [EOS]]  # every token once, in order, no shuffle
    assert len(eval_batches(docs, 16, 3, EOS, max_batches=2)) == 2
    assert torch.equal(eval_batches(docs, 16, 3, EOS, max_batches=2)[1]["input_ids"], batches[1]["input_ids"])


# ----------------------------------------------------------------------------------------------- tokenizer
_TEXTS = ["Question: What is 12 + 30?\nAnswer: 42\n", "def f(x):\n    return x * 2\n",
          "English: Save\nFrench: Enregistrer", "Permission is hereby granted, free of charge, to any person."] * 20


def test_train_tokenizer_round_trip_deterministic_and_saved(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = train_tokenizer(_TEXTS, vocab_size=300, save_dir=str(tmp_path / "tok"))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    for text in _TEXTS[:4] + ["unseen bytes: héllo ✓ 日本 \t\n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    again = train_tokenizer(_TEXTS, vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded(_TEXTS[0])["input_ids"] == tok(_TEXTS[0])["input_ids"]
    assert loaded.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(_TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([])


def test_default_tokenizer_cached_and_end_to_end(tmp_path):
    tok = default_tokenizer(cache_dir=str(tmp_path / "t"), vocab_size=512)
    assert (tmp_path / "t" / "tokenizer.json").exists()
    again = default_tokenizer(cache_dir=str(tmp_path / "t"), vocab_size=512)
    assert again.get_vocab() == tok.get_vocab() and len(tok) == 512
    texts = {d: load_domain_texts(d, max_docs=40) for d in ("math", "general")}
    token_docs = tokenize_domains(tok, texts)
    assert list(token_docs) == ["math", "general"] and all(len(v) == 40 for v in token_docs.values())
    assert tok.decode(token_docs["math"][0]) == texts["math"][0]
    s = MixedDomainStream(token_docs, seq_len=64, batch_size=2, eos_id=tok.eos_token_id)
    b = s.next_batch()
    assert b["input_ids"].max() < len(tok)
