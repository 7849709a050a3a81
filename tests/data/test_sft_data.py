"""SFT data in ``data.sources``: chat rows (ESFT's ``messages`` format) and prompt/completion rows, labels on the
assistant / completion tokens only, through packing and held-out evaluation; malformed rows named."""
import json

import pytest
import torch

from desmoe.data import (DataSourceError, MixedDomainStream, eval_batches, load_domain_texts, tokenize_domains,
                         train_tokenizer)
from desmoe.data._util import SPLITS
from desmoe.data.sft import SFTDoc, SupervisedDoc

# a Llama-2-ish template with no generation markers and a BOS text: exercises the tokenizer's own template
OTHER_TEMPLATE = ("{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                  "' [/INST]' }}{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
                  "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}")


def esft_rows(n, tag="A"):
    """ESFT's released layout: one user turn and one assistant turn (some with a system turn, some multi-turn)."""
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {tag}{i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"answer {tag}{i}: {2 * i}"}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are terse."})
        if i % 4 == 0:
            msgs += [{"role": "user", "content": f"and times two {tag}{i}?"},
                     {"role": "assistant", "content": f"second {tag}{i}: {4 * i}"}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_texts(path, domain="chat"):
    return [t for s in SPLITS for t in load_domain_texts(domain, s, source=str(path))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    p = write_jsonl(tmp_path_factory.mktemp("tok") / "t.jsonl", esft_rows(60))
    texts = all_texts(p)
    return train_tokenizer(texts + ["plain text " * 5, "def f(): return 1"] * 20, vocab_size=320)


def supervised_text(tok, doc: SupervisedDoc) -> str:
    return tok.decode([t for t, m in zip(doc, doc.mask) if m])


def assistant_spans_only(tok, doc, turns, template_end, exact=True):
    """Decoded supervised tokens == the assistant contents, each followed by the template's end-of-turn text
    (``exact`` False: up to whitespace, for a template that puts a space before the content, which a BPE token
    may or may not hold together with the content's first word)."""
    want = "".join(c + template_end for r, c, trained in turns if trained)
    got = supervised_text(tok, doc)
    assert got == want if exact else got.split() == want.split()


@pytest.mark.parametrize("template", [None, OTHER_TEMPLATE], ids=["builtin", "tokenizer"])
def test_chat_rows_render_and_supervise_only_assistant_content(tmp_path, tok, template):
    rows = esft_rows(30)
    texts = all_texts(write_jsonl(tmp_path / "c.jsonl", rows))
    assert len(texts) == 30 and all(isinstance(t, SFTDoc) and t.turns for t in texts)
    tok.chat_template = template
    try:
        docs = tokenize_domains(tok, {"chat": texts})["chat"]
    finally:
        tok.chat_template = None
    for t, d in zip(texts, docs):
        assert isinstance(d, SupervisedDoc) and len(d.mask) == len(d) and not d.eos_target
        assert d.mask[0] == 0  # the first token is predicted from the previous packed document
        if template is None:
            assistant_spans_only(tok, d, t.turns, "<|im_end|>")
        else:  # ' ' + content + ' </s>'
            assistant_spans_only(tok, d, t.turns, " </s>", exact=False)
        full = tok.decode(list(d))
        if template is None:
            assert full == str(t)  # the built-in ChatML rendering is the document's own text
        else:
            assert full.startswith("<s>") and "[INST] " + t.turns[-2][1] in full


def test_prompt_completion_rows(tmp_path, tok):
    rows = [{"prompt": f"Translate {i}: ", "completion": f"traduction {i}"} for i in range(20)]
    rows.append({"prompt": [{"role": "user", "content": "hi there"}],
                 "completion": [{"role": "assistant", "content": "hello back"}]})
    texts = all_texts(write_jsonl(tmp_path / "pc.jsonl", rows))
    docs = tokenize_domains(tok, {"pc": texts})["pc"]
    by_text = {str(t): (t, d) for t, d in zip(texts, docs)}
    t, d = by_text["Translate 3: traduction 3"]
    # the prompt's trailing space and the completion's first word may share a BPE token, which is then a target
    assert d.eos_target and supervised_text(tok, d).strip() == "traduction 3"
    conv = [(t, d) for t, d in by_text.values() if t.turns]
    assert len(conv) == 1 and supervised_text(tok, conv[0][1]) == "hello back<|im_end|>"


def test_raw_text_unchanged(tok):
    """Raw-text documents tokenize in one call and stay plain lists: every token a target, bitwise as before."""
    texts = ["plain text one", "def f(): return 1", "plain text two"]
    docs = tokenize_domains(tok, {"g": texts})["g"]
    assert docs == list(tok(texts, add_special_tokens=False)["input_ids"])
    assert all(type(d) is list for d in docs)
    b = MixedDomainStream({"g": docs}, seq_len=16, batch_size=2, eos_id=tok.eos_token_id,
                          packing="concatenated").next_batch()
    assert torch.equal(b["labels"], b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
    # isolated packing (the default): the same, except that no document after a row's first is a target at its start
    bi = MixedDomainStream({"g": docs}, seq_len=16, batch_size=2, eos_id=tok.eos_token_id).next_batch()
    starts = bi["position_ids"] == 0
    starts[:, 0] = False
    assert torch.equal(bi["labels"], b["labels"].masked_fill(starts, -100))


def test_packing_keeps_domain_ids_and_supervision(tmp_path, tok):
    chat = tokenize_domains(tok, {"chat": all_texts(write_jsonl(tmp_path / "c.jsonl", esft_rows(40)))})["chat"]
    raw = tokenize_domains(tok, {"raw": ["plain text " * 3 + str(i) for i in range(30)]})["raw"]
    assert max(map(len, chat)) < 160  # rows hold whole conversations (a longer one continues in the next row)
    stream = MixedDomainStream({"raw": raw, "chat": chat}, seq_len=160, batch_size=4, eos_id=tok.eos_token_id)
    eos = tok.eos_token_id
    seen_chat = False
    for _ in range(6):
        b = stream.next_batch()
        for r in range(4):
            ids, lab, dom, am = (b[k][r] for k in ("input_ids", "labels", "domain_ids", "attention_mask"))
            real = am.bool()
            d = int(dom[real][0])
            assert (dom[real] == d).all() and (dom[~real] == -1).all() and (lab[~real] == -100).all()
            if d == 0:  # raw text: every real token a target but a document's first (isolated packing)
                start = b["position_ids"][r] == 0
                start[0] = False
                assert torch.equal(lab[real & ~start], ids[real & ~start]) and (lab[start] == -100).all()
                continue
            seen_chat = True
            kept = lab != -100
            assert torch.equal(lab[kept], ids[kept])
            text = tok.decode(ids[kept].tolist())
            assert "answer" in text and "question" not in text and "<|im_start|>" not in text
            # the packer's EOS after a chat document is no target; no target right after an EOS (document start)
            after_eos = torch.cat([torch.tensor([False]), ids[:-1] == eos])
            assert not (kept & (ids == eos)).any() and not (kept & after_eos).any()
    assert seen_chat


def test_packing_a_long_document_across_rows_keeps_its_mask(tok):
    doc = SupervisedDoc(list(range(10, 40)), [0] * 12 + [1] * 18, eos_target=True)
    stream = MixedDomainStream({"d": [doc]}, seq_len=8, batch_size=5, eos_id=2)
    b = stream.next_batch()
    ids, lab = b["input_ids"].reshape(-1), b["labels"].reshape(-1)
    n = len(doc) + 1
    assert ids[:n].tolist() == list(doc) + [2]
    assert (lab[:n] != -100).tolist() == [bool(m) for m in doc.mask] + [True]


def test_eval_ignores_prompt_tokens(tmp_path, tok):
    """Held-out batches and the held-out loss count only the assistant tokens."""
    from desmoe.eval import domain_loss, token_losses

    chat = tokenize_domains(tok, {"chat": all_texts(write_jsonl(tmp_path / "c.jsonl", esft_rows(20)))})["chat"]
    bs = eval_batches(chat, seq_len=48, batch_size=4, eos_id=tok.eos_token_id)
    n_sup = sum(sum(d.mask) for d in chat)
    assert sum(int((b["labels"] != -100).sum()) for b in bs) == n_sup
    for b in bs:
        kept = b["labels"] != -100
        assert "question" not in tok.decode(b["input_ids"][kept].tolist())

    class Probe(torch.nn.Module):  # uniform logits: every counted token costs log(V)
        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})()

    res = domain_loss(Probe(), chat, seq_len=48, batch_size=4, eos_id=tok.eos_token_id,
                      packing="concatenated")  # a probe without attention (isolated packing is refused for it)
    first_shifted = sum(int((b["labels"][:, :1] != -100).sum()) for b in bs)
    assert res["tokens"] == n_sup - first_shifted and res["loss"] == pytest.approx(torch.log(torch.tensor(
        float(len(tok)))).item(), rel=1e-5)
    ce, valid = token_losses(torch.zeros(1, 4, 7), torch.tensor([[5, -100, 3, -100]]))
    assert valid.tolist() == [[False, True, False]]


@pytest.mark.parametrize("row,msg", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, r"messages\[0\] has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     r"messages\[0\]\.role is 'human'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"messages\[1\] is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"'messages' has no assistant turn \(roles: \['user'\]\)"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]},
     r"messages\[0\]\.content is a list, expected a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     r"messages\[1\]\.content is a NoneType"),
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, r"messages\[0\] is a str"),
    ({"prompt": "p", "completion": ""}, r"'completion' is empty"),
    ({"prompt": 3, "completion": "c"}, r"'prompt' is a int"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
     r"'prompt' and 'completion' must both be strings or both be lists"),
])
def test_malformed_rows_named(tmp_path, row, msg):
    good = esft_rows(4)
    p = write_jsonl(tmp_path / "bad.jsonl", good[:2] + [row] + good[2:])
    with pytest.raises(DataSourceError, match=r"bad\.jsonl: line 3 \(record 2\): " + msg):
        load_domain_texts("chat", "train", source=str(p))
    j = tmp_path / "bad.json"
    j.write_text(json.dumps(good[:1] + [row]))
    with pytest.raises(DataSourceError, match=r"bad\.json: record 1: " + msg):
        load_domain_texts("chat", "train", source=str(j))


def test_parquet_and_directory_sources(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", esft_rows(12, "T"))
    write_jsonl(d / "test.jsonl", esft_rows(3, "E"))
    test = load_domain_texts("chat", "test", source=str(d))
    assert len(test) == 3 and all(isinstance(t, SFTDoc) for t in test)
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet")
    pc = all_texts(tmp_path / "pc.parquet")
    assert sorted(pc) == sorted(f"p{i} c{i}" for i in range(10)) and all(t.completion for t in pc)


def test_template_that_refuses_a_conversation_is_named(tmp_path, tok):
    texts = all_texts(write_jsonl(tmp_path / "c.jsonl", esft_rows(3)))
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        with pytest.raises(DataSourceError, match=r"c\.jsonl: line \d \(record \d\): the tokenizer's chat template "
                                                  r"cannot render.*roles must alternate"):
            tokenize_domains(tok, {"chat": texts})
    finally:
        tok.chat_template = None


def test_hub_name_takes_the_same_path(tmp_path, monkeypatch):
    """A hub dataset name: ``datasets.load_dataset`` (here answered from a local JSONL, no network) gives rows
    that become SFT documents through the same code as local files; a bad row is named by source and index."""
    datasets = pytest.importorskip("datasets")
    from desmoe.data import sources

    p = write_jsonl(tmp_path / "hub.jsonl", esft_rows(30))
    monkeypatch.setattr(sources, "check_hub_name", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, config=None: _json_dsd(datasets, p))
    texts = [t for s in SPLITS for t in load_domain_texts("chat", s, source="someorg/chat-sft")]
    assert len(texts) == 30 and all(isinstance(t, SFTDoc) and t.turns for t in texts)
    write_jsonl(p, esft_rows(2) + [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataSourceError, match=r"someorg/chat-sft: record 2: 'messages' has no assistant turn"):
        load_domain_texts("chat", "train", source="someorg/chat-sft")


def _json_dsd(datasets, path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
