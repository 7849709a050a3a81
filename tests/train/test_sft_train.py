"""``desmoe train`` on SFT data: chat JSONL in ESFT's format (and prompt/completion) through the training loop,
the loss and KD over the assistant tokens, held-out losses over them too; ESFT scores the samples' tokens."""
import json

import pytest
import torch
import yaml

from desmoe.train.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def chat_file(path, tag, n=48):
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"{tag} question {i}: name {i % 7} things"},
            {"role": "assistant", "content": f"{tag} answer {i}: " + " ".join([tag] * (3 + i % 5))}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_cfg(tmp_path, method="des_moe"):
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"say {i}: ", "completion": f"said {i} " * 3}) + "\n"
                          for i in range(48)))
    return {
        "model": {"tiny": "qwen3_moe"},
        "tokenizer": {"vocab_size": 300},
        "data": {"domains": ["cats", "dogs", "says"], "general": None,
                 "sources": {"cats": chat_file(tmp_path / "cats.jsonl", "cat"),
                             "dogs": chat_file(tmp_path / "dogs.jsonl", "dog"), "says": str(pc)},
                 "max_docs": 40, "eval_max_docs": 8, "seq_len": 64, "batch_size": 3},
        "method": {"name": method, "update_every": 1} if method == "des_moe" else {"name": method},
        "train": {"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 1, "plots": False,
                  "progress": False, "pretrain_steps": 0},
    }


def test_cli_train_on_chat_data(tmp_path, capsys):
    """A few steps of ``desmoe train`` on chat + prompt/completion sources; every batch's targets are assistant
    / completion tokens, and the held-out losses are over those tokens only."""
    from desmoe.cli import main

    d = sft_cfg(tmp_path)
    d["train"]["eval_batches"] = 8  # every held-out document
    p = tmp_path / "sft.yaml"
    p.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(p), "--output-dir", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_run"] == 3 and summary["final_step"] == 3
    assert all(torch.isfinite(torch.tensor(summary[k])) for k in ("train_loss_first", "train_loss_last"))
    # held-out losses count exactly the held-out documents' assistant / completion tokens
    from transformers import AutoTokenizer

    from desmoe.data import tokenize_domains
    from desmoe.train.builders import load_texts

    tok = AutoTokenizer.from_pretrained(str(out / "checkpoints" / "step-000003" / "model"))
    cfg = config_from_dict(yaml.safe_load(p.read_text()))
    docs = tokenize_domains(tok, load_texts(cfg, cfg.data.domains, "test", cfg.data.eval_max_docs))
    for when in ("eval_before", "eval_after"):
        res = summary[when]["domains"]
        assert set(res) == {"cats", "dogs", "says"}
        for d, r in res.items():
            n_tok, n_sup = sum(map(len, docs[d])), sum(sum(x.mask) for x in docs[d])
            if d == "says":
                n_sup += len(docs[d])  # prompt/completion: the EOS after the completion is a target too
            assert 0 < r["tokens"] == n_sup < n_tok and torch.isfinite(torch.tensor(r["loss"]))


def test_trainer_batches_target_only_assistant_tokens(tmp_path):
    """The loop's own stream and held-out docs: targets decode to assistant content; the KD sees those tokens."""
    from desmoe.train.trainer import Trainer  # noqa: F401  (the loop the CLI runs)
    from desmoe.train.builders import load_texts
    from desmoe.data import tokenize_domains, MixedDomainStream, train_tokenizer
    from desmoe.train.loss import supervised_tokens

    cfg = config_from_dict(sft_cfg(tmp_path))
    texts = load_texts(cfg, cfg.data.domains, "train", cfg.data.max_docs)
    tok = train_tokenizer([t for ts in texts.values() for t in ts], vocab_size=300)
    docs = tokenize_domains(tok, texts)
    b = MixedDomainStream(docs, 64, 6, eos_id=tok.eos_token_id).next_batch()
    for r in range(6):
        lab = b["labels"][r]
        text = tok.decode(lab[lab != -100].tolist())
        assert "question" not in text and "say " not in text and ("answer" in text or "said" in text)
    sup = supervised_tokens(b["labels"]).view(6, 64)
    assert torch.equal(sup[:, :-1], b["labels"][:, 1:] != -100)


def test_esft_scores_on_chat_data(tmp_path, capsys):
    """ESFT's preparation pass runs on chat batches (it scores the samples' tokens, as ESFT's scripts do)."""
    from desmoe.cli import main

    d = sft_cfg(tmp_path, "esft_token")
    p = tmp_path / "esft.yaml"
    p.write_text(yaml.safe_dump(d))
    rc = main(["train", "--config", str(p), "--output-dir", str(tmp_path / "run"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(summary["esft_selection"]) and set(summary["esft_scored_tokens"]) == {"cats", "dogs", "says"}


def test_readme_sft_config_runs(tmp_path, monkeypatch, capsys):
    """The README's chat-data config, as written (paths relative to the working directory), trains: a few steps on
    small files in ESFT's format written here (an intent file, a law directory with train/test files)."""
    import pathlib
    import re

    from desmoe.cli import main

    readme = (pathlib.Path(__file__).parents[2] / "docs" / "data.md").read_text()
    block = re.search(r"```yaml\n(# sft\.yaml.*?)```", readme, re.S).group(1)
    cfg = yaml.safe_load(block)
    assert cfg["data"]["sources"] == {"intent": "data/intent.jsonl", "law": "data/law"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "law").mkdir(parents=True)
    chat_file(tmp_path / "data" / "intent.jsonl", "intent")
    chat_file(tmp_path / "data" / "law" / "train.jsonl", "law")
    chat_file(tmp_path / "data" / "law" / "test.jsonl", "statute", n=6)
    (tmp_path / "sft.yaml").write_text(block)
    rc = main(["train", "--config", "sft.yaml", "--output-dir", "runs/sft", "--quiet", "--set", "train.max_steps=2",
               "--set", "data.seq_len=64", "--set", "data.batch_size=2", "--set", "tokenizer.vocab_size=300",
               "--set", "train.eval_batches=1"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "runs" / "sft" / "summary.json").read_text())
    assert summary["steps_run"] == 2 and set(summary["eval_after"]["domains"]) == {"intent", "law"}
