"""DES-MoE in TRL: ``DesMoESFTTrainer`` on chat / prompt-completion JSONL in ESFT's format, at ``SFTConfig``'s
defaults (activation checkpointing on, bf16 autocast), the loss on the assistant tokens only."""
import json
import random

import pytest
import torch

pytest.importorskip("trl", reason="TRL not installed (the `trl` extra)")
datasets = pytest.importorskip("datasets")

import desmoe  # noqa: E402
from desmoe.data.tokenizer import train_tokenizer  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = {"math": ["add", "two", "sum", "seven", "times", "equals", "plus", "minus"],
         "code": ["def", "return", "loop", "list", "print", "value", "class", "import"]}


def _rows(n=24, seed=0, form="messages"):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        d = ["math", "code"][i % 2]
        q = " ".join(rng.choice(WORDS[d]) for _ in range(rng.randint(4, 8)))
        a = " ".join(rng.choice(WORDS[d]) for _ in range(rng.randint(5, 10)))
        if form == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "domain": d})
        else:
            rows.append({"prompt": q + " ?", "completion": " " + a, "domain": d})
    return rows


def _write(tmp_path, rows, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return datasets.load_dataset("json", data_files=str(p), split="train")


@pytest.fixture(scope="module")
def tok():
    texts = [w for ws in WORDS.values() for w in ws] * 5 + ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"]
    return train_tokenizer(texts, vocab_size=300)


def _trainer(tmp_path, tok, ds, *, eval_ds=None, method=None, **cfg):
    from trl import SFTConfig

    from desmoe.train import DesMoESFTTrainer

    torch.manual_seed(0)
    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id))
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True,
                     save_strategy="no", logging_steps=1,
                     **{"max_steps": 10, "per_device_train_batch_size": 4, "max_length": 64, **cfg})
    tr = DesMoESFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tok,
                          method=method or {"name": "des_moe", "update_every": 2, "phi": 0.9},
                          domain_names=["math", "code"])
    return tr, model


def test_chat_sft_at_sftconfig_defaults_trains_with_desmoe(tmp_path, tok):
    from transformers import TrainerCallback

    ds = _write(tmp_path, _rows())
    tr, model = _trainer(tmp_path, tok, ds, assistant_only_loss=True)
    assert tr.args.gradient_checkpointing and tr.args.bf16  # TRL's defaults, kept
    ctl = tr.desmoe
    # the collated batch: labels only on the assistant's tokens, each row's domain on its tokens, -1 on padding
    rows = [tr.train_dataset[i] for i in range(4)]
    b = tr.data_collator(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert (b["domain_ids"][i, :n] == row["domain_ids"][0]).all() and (b["domain_ids"][i, n:] == -1).all()
        sup = b["labels"][i][b["labels"][i] != -100]
        text = tok.decode(sup)
        assert "user" not in text and 0 < sup.numel() < n
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.phase = ctl.current_phase
            m = ctl.tracker.masks_LME
            self.masks = None if m is None else m.clone()

        def on_step_end(self, args, state, control, **kw):
            for l, (bname, _, _) in enumerate(ctl.blocks):
                name = f"{bname}.experts.gate_up_proj"
                p = dict(model.named_parameters())[name].detach()
                changed = {e for e in range(p.shape[0]) if not torch.equal(self.before[name][e], p[e])}
                seen.append((self.phase, l, changed, self.masks))

    tr.add_callback(Watch())
    tr.train()
    assert model.is_gradient_checkpointing
    phases = {p for p, *_ in seen}
    assert phases == {"warmup", "stabilization", "consolidation"}
    for phase, l, changed, masks in seen:
        if phase != "warmup":
            assert changed <= set(masks[l].any(0).nonzero().flatten().tolist()), (phase, l, changed)
    logs = [h for h in tr.state.log_history if "desmoe_phase" in h]
    assert logs[0]["kd_loss"] >= 0 and "mask_size/math" in logs[-1]


def test_prompt_completion_rows_supervise_the_completion_only(tmp_path, tok):
    ds = _write(tmp_path, _rows(form="prompt_completion"))
    tr, _ = _trainer(tmp_path, tok, ds, max_steps=2)
    row = tr.train_dataset[0]
    b = tr.data_collator([row])
    sup = tok.decode(b["labels"][0][b["labels"][0] != -100])
    assert "?" not in sup  # the prompt (which ends in "?") is not supervised
    tr.train()


def test_packing_keeps_each_documents_domain(tmp_path, tok):
    ds = _write(tmp_path, _rows(n=16))
    tr, _ = _trainer(tmp_path, tok, ds, packing=True, max_steps=2, max_length=256)
    row = tr.train_dataset[0]
    assert len(row["seq_lengths"]) > 1  # several documents in one packed row
    doms, start = [], 0
    for n in row["seq_lengths"]:
        seg = row["domain_ids"][start:start + n]
        assert len(set(seg)) == 1  # one document, one domain
        doms.append(seg[0])
        start += n
    assert set(doms) <= {0, 1} and start == len(row["input_ids"]) == len(row["domain_ids"])
    tr.train()


def test_kd_is_over_the_supervised_tokens(tmp_path, tok):
    ds = _write(tmp_path, _rows(n=8))
    tr, model = _trainer(tmp_path, tok, ds, max_steps=10, assistant_only_loss=True)
    b = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    ctl = tr.desmoe
    ctl.begin_step(0)
    seen = {}
    orig = ctl.method.router_loss

    def spy(c, valid_T, phase):
        seen["valid"] = valid_T.clone()
        return orig(c, valid_T, phase)

    ctl.method.router_loss = spy
    model.train()
    tr.compute_loss(model, dict(b))
    ctl.release()
    want = torch.zeros_like(b["labels"], dtype=torch.bool)
    want[:, :-1] = b["labels"][:, 1:] != -100
    assert torch.equal(seen["valid"], want.reshape(-1) & (b["domain_ids"].reshape(-1) >= 0))


def test_bad_rows_are_named(tmp_path, tok):
    rows = _rows(n=6)
    rows[3]["domain"] = "law"
    with pytest.raises(ValueError, match=r"train dataset row 3: domain='law' is not one of the domain_names"):
        _trainer(tmp_path, tok, _write(tmp_path, rows))
    rows = [{k: v for k, v in r.items() if k != "domain"} for r in _rows(n=6)]
    with pytest.raises(ValueError, match=r"the train dataset has no 'domain' column"):
        _trainer(tmp_path, tok, _write(tmp_path, rows))


def test_evaluation_set_without_domains(tmp_path, tok):
    general = [{k: v for k, v in r.items() if k != "domain"} for r in _rows(n=6, seed=3)]
    tr, _ = _trainer(tmp_path, tok, _write(tmp_path, _rows(n=8)), eval_ds=_write(tmp_path, general, "eval.jsonl"),
                     max_steps=1, per_device_eval_batch_size=2)
    m = tr.evaluate()
    assert m["eval_loss"] > 0


def test_peft_is_refused_naming_why(tmp_path, tok):
    peft = pytest.importorskip("peft")
    from trl import SFTConfig

    from desmoe.train import DesMoESFTTrainer

    model = desmoe.patch(tiny_model("qwen3_moe", vocab_size=len(tok)))
    args = SFTConfig(output_dir=str(tmp_path / "p"), use_cpu=True, report_to=[], max_steps=1)
    why = "PEFT model or peft_config is not supported: DES-MoE sets which parameters train in each phase"
    with pytest.raises(ValueError, match=why):
        DesMoESFTTrainer(model=model, args=args, train_dataset=_write(tmp_path, _rows(n=4)), processing_class=tok,
                         peft_config=peft.LoraConfig(target_modules=["q_proj"]), domain_names=["math", "code"])
    with pytest.raises(ValueError, match=why):
        DesMoESFTTrainer(model=peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"])), args=args,
                         train_dataset=_write(tmp_path, _rows(n=4)), processing_class=tok,
                         domain_names=["math", "code"])
