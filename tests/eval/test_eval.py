"""Evaluation: per-domain loss on held-out batches, math exact match by greedy decoding (scored with an oracle
and an always-wrong model), the table."""
import math
import types

import pytest
import torch

import desmoe
from desmoe.data import format_math, math_problems, train_tokenizer
from desmoe.eval import domain_loss, format_table, math_exact_match, token_losses
from desmoe.integrations.tiny import tiny_model


@pytest.fixture(scope="module")
def tok():
    texts = [format_math(q, a) for q, a in math_problems(200, "train", 0)]
    return train_tokenizer(texts, vocab_size=300)


def test_token_losses_shift_and_padding():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    ce, valid = token_losses(logits, labels)
    assert ce.shape == (2, 4) and valid.sum() == 4 + 2
    want = torch.nn.functional.cross_entropy(logits[0, 2], labels[0, 3])
    torch.testing.assert_close(ce[0, 2], want)
    assert (ce[~valid] == 0).all()


def test_domain_loss_random_model_near_log_vocab(tok):
    m = tiny_model("qwen3_moe", vocab_size=len(tok))
    desmoe.patch(m)
    docs = [tok.encode(format_math(q, a), add_special_tokens=False) for q, a in math_problems(20, "test", 0)]
    r = domain_loss(m, docs, seq_len=32, batch_size=4, eos_id=tok.eos_token_id, max_batches=2)
    assert r["tokens"] > 0 and abs(r["loss"] - math.log(len(tok))) < 1.0
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_domain_loss_standard_error_over_rows(tok):
    """``loss_se`` against a direct computation: per packed row its mean loss and valid tokens, ratio-estimator SE."""
    from desmoe.data import eval_batches, packed_forward

    m = tiny_model("qwen3_moe", vocab_size=len(tok))
    desmoe.patch(m)
    docs = [tok.encode(format_math(q, a), add_special_tokens=False) for q, a in math_problems(40, "test", 0)]
    r = domain_loss(m, docs, seq_len=24, batch_size=3, eos_id=tok.eos_token_id, max_batches=3)
    x, w = [], []
    with torch.no_grad():
        m.eval()
        for b in eval_batches(docs, 24, 3, tok.eos_token_id, max_batches=3):
            for i in range(b["input_ids"].shape[0]):  # one row at a time
                logits = packed_forward(m, {k: v[i:i + 1] for k, v in b.items()}).logits
                ce, valid = token_losses(logits, b["labels"][i:i + 1])
                if valid.any():  # a row holding only a document's last token predicts nothing
                    w.append(float(valid.sum()))
                    x.append(float(ce.sum()) / w[-1])
    x, w = torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
    mean = float((w * x).sum() / w.sum())
    se = float(torch.sqrt((w ** 2 * (x - mean) ** 2).sum()) / w.sum())
    assert r["rows"] == len(x) >= 6 and r["tokens"] == int(w.sum())
    assert r["loss"] == pytest.approx(mean, rel=1e-5)
    assert r["loss_se"] == pytest.approx(se, rel=1e-4) and 0 < r["loss_se"] < 0.5
    one = domain_loss(m, docs[:1], seq_len=64, batch_size=1, eos_id=tok.eos_token_id)
    assert one["rows"] == 1 and one["loss_se"] == 0.0  # a single row: no spread to estimate


class _Scripted(torch.nn.Module):
    """Greedy 'model' that emits a scripted continuation per prompt (to check the exact-match scoring)."""

    def __init__(self, tok, answers, vocab):
        super().__init__()
        self.tok, self.answers, self.V = tok, answers, vocab
        self.queue = []
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        text = self.tok.decode(input_ids[0].tolist())
        prompt = next(p for p in self.answers if text.startswith(p))
        n_prompt = len(self.tok.encode(prompt, add_special_tokens=False))
        script = self.tok.encode(" " + self.answers[prompt] + "\n", add_special_tokens=False)
        done = input_ids.shape[1] - n_prompt
        nxt = script[done] if done < len(script) else self.tok.eos_token_id
        logits = torch.zeros(1, input_ids.shape[1], self.V)
        logits[0, -1, nxt] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_math_exact_match_scoring(tok):
    probs = math_problems(6, "test", 0)
    right = {format_math(q): a for q, a in probs}
    got = math_exact_match(_Scripted(tok, right, len(tok)), tok, n=6, max_new_tokens=16)
    assert got["exact_match"] == 1.0 and got["n"] == 6 and got["samples"][0]["prediction"] == probs[0][1]
    wrong = {format_math(q): str(int(a) + 1) if a.lstrip("-").isdigit() else a + "x" for q, a in probs}
    assert math_exact_match(_Scripted(tok, wrong, len(tok)), tok, n=6, max_new_tokens=16)["exact_match"] == 0.0


def test_math_exact_match_runs_on_a_real_model(tok):
    m = tiny_model("qwen3_moe", vocab_size=len(tok))
    desmoe.patch(m)
    r = math_exact_match(m, tok, n=2, max_new_tokens=4)
    assert 0.0 <= r["exact_match"] <= 1.0 and len(r["samples"]) == 2


def test_format_table():
    res = {"domains": {"math": {"loss": 1.0, "ppl": 2.718, "tokens": 10},
                       "general": {"loss": 2.0, "ppl": 7.39, "tokens": 5}},
           "math": {"exact_match": 0.5, "n": 4}}
    res["general"] = res["domains"]["general"]
    t = format_table(res)
    assert "forgetting probe" in t and "0.500" in t and "math" in t
