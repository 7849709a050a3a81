"""Packed documents kept apart (data.packing: isolated): per-document position_ids from the stream and eval batches,
and a packed document's logits equal to the same document alone (fp32, tiny local model); concatenated packing
lets it see the document before it."""
import pytest
import torch

from desmoe.data import (MixedDomainStream, check_isolated_packing, eval_batches, model_inputs, packed_forward)
from desmoe.data.stream import _positions

EOS = 1


def _tiny(attn="sdpa", seed=0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float()


def _docs(n, lo=3, hi=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 97, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_positions_restart_at_each_document_and_at_padding():
    assert _positions([0, 3, 5], 8, 10).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1]
    assert _positions([0], 4, 4).tolist() == [0, 1, 2, 3]


def test_stream_position_ids_follow_the_documents():
    docs = {"a": _docs(20), "b": _docs(20, 30, 50, seed=1)}  # b's documents are longer than a row
    s = MixedDomainStream(docs, 24, 4, seed=0, eos_id=EOS)
    c = MixedDomainStream(docs, 24, 4, seed=0, eos_id=EOS, packing="concatenated")
    for _ in range(8):
        b, bc = s.next_batch(), c.next_batch()
        assert "position_ids" not in bc and set(b) == set(bc) | {"position_ids"}
        for k in bc:  # the rows themselves do not depend on the packing; the labels only at document starts
            starts = b["position_ids"] == 0
            starts[:, 0] = False  # a row's first label is never a target of the shifted loss: left as it is
            assert torch.equal(b[k], bc[k] if k != "labels" else bc[k].masked_fill(starts, -100)), k
        for ids, pos, am, dom in zip(b["input_ids"], b["position_ids"], b["attention_mask"], b["domain_ids"]):
            n = int(am.sum())
            if int(dom[0]) == 0:  # short docs: every document starts at 0 right after the previous EOS
                starts = [0] + [i + 1 for i in range(n - 1) if int(ids[i]) == EOS]
                assert [i for i in range(n) if pos[i] == 0] == starts
            else:  # long docs: a row is one document (or its continuation) from 0, then the next one
                assert pos[0] == 0
            assert (pos[n:] == torch.arange(24 - n)).all()  # padding restarts too
            segs = torch.nonzero(pos[:n] == 0).flatten().tolist() + [n]
            for a, z in zip(segs[:-1], segs[1:]):
                assert pos[a:z].tolist() == list(range(z - a))


def test_eval_batches_position_ids_and_bad_packing():
    docs = _docs(9)
    bs = eval_batches(docs, 16, 2, EOS)
    bc = eval_batches(docs, 16, 2, EOS, packing="concatenated")
    assert len(bs) == len(bc) and all("position_ids" in b and "position_ids" not in c for b, c in zip(bs, bc))
    flat = [t for b in bs for row, am in zip(b["input_ids"], b["attention_mask"]) for t in row[am == 1].tolist()]
    assert flat == [t for d in docs for t in d + [EOS]]
    with pytest.raises(ValueError, match=r"packing must be one of 'isolated', 'concatenated', got 'flat'"):
        eval_batches(docs, 16, 2, EOS, packing="flat")
    with pytest.raises(ValueError, match="packing must be one of"):
        MixedDomainStream({"a": docs}, 16, 2, eos_id=EOS, packing=None)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_second_document_gets_the_logits_it_gets_alone(attn, train_mode):
    """Two documents packed in one row: under isolated packing the second one's logits are those of that document
    alone (fp32); under concatenated packing it sees the first and they differ."""
    model = _tiny(attn)
    model.train(train_mode)  # in train mode a default forward would make a KV cache (that turns packing off)
    d1, d2 = _docs(2, 5, 9, seed=3)
    (b,) = eval_batches([d1, d2], 24, 1, EOS)
    (bc,) = eval_batches([d1, d2], 24, 1, EOS, packing="concatenated")
    n1, n2 = len(d1) + 1, len(d2) + 1
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([d2 + [EOS]])).logits[0]
        iso = packed_forward(model, b).logits[0, n1:n1 + n2]
        cat = packed_forward(model, bc).logits[0, n1:n1 + n2]
        first_alone = model(input_ids=torch.tensor([d1 + [EOS]])).logits[0]
    torch.testing.assert_close(iso, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_forward(model, b).logits[0, :n1], first_alone, rtol=1e-5, atol=1e-5)
    assert (cat - alone).abs().max() > 1e-2  # concatenated: the second document attends to the first


def test_flattened_batch_for_flash_attention_gives_the_same_logits(monkeypatch):
    """Under flash attention packed_forward sends a [B, S] batch as one row (transformers takes cu_seqlens from
    position_ids only for batch size 1): checked here on sdpa, whose packed mask handles one row the same way."""
    import desmoe.data.packing as pk

    model = _tiny().eval()
    (b,) = eval_batches(_docs(6, seed=5), 16, 4, EOS)
    with torch.no_grad():
        ref = packed_forward(model, b).logits
        monkeypatch.setattr(pk, "check_isolated_packing", lambda m: "flash_attention_2")
        seen = {}
        orig = model.forward

        def spy(**kw):
            seen["shape"] = tuple(kw["input_ids"].shape)
            return orig(**kw)

        flat = pk.packed_forward(spy, b, model=model).logits
    assert seen["shape"] == (1, b["input_ids"].numel()) and flat.shape == ref.shape
    torch.testing.assert_close(flat, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only for a batch of one row, got 4 rows"):
        model_inputs(b, model)  # the HF Trainer path cannot flatten: a clear refusal


def test_task_loss_and_held_out_loss_use_isolated_packing():
    """The training loss and the held-out loss of an isolated batch are those of each document scored alone."""
    from desmoe.eval import domain_loss, token_losses
    from desmoe.train.loss import task_loss

    model = _tiny().eval()
    docs = _docs(5, seed=7)
    (b,) = eval_batches(docs, 40, 4, EOS)
    loss, _, _, valid = task_loss(model, b, "cpu", False)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d + [EOS]])
            ce, v = token_losses(model(input_ids=ids).logits, ids)
            tot, cnt = tot + float(ce.sum()), cnt + int(v.sum())
    # each row ends in padding and the rows cut no document, so the supervised tokens are exactly the documents'
    assert int(valid.sum()) == cnt
    assert abs(float(loss.detach()) - tot / cnt) < 1e-5
    held = domain_loss(model, docs, seq_len=40, batch_size=4, eos_id=EOS)
    assert abs(held["loss"] - tot / cnt) < 1e-5
    held_cat = domain_loss(model, docs, seq_len=40, batch_size=4, eos_id=EOS, packing="concatenated")
    assert abs(held_cat["loss"] - tot / cnt) > 1e-4


def test_models_that_cannot_separate_documents_are_refused():
    model = _tiny()
    assert check_isolated_packing(model) == "sdpa"
    model.config._attn_implementation = "my_kernel"
    with pytest.raises(ValueError, match=r"attention implementation 'my_kernel'.*data.packing: concatenated"):
        check_isolated_packing(model)

    class Plain(torch.nn.Module):  # not a transformers model: no masks from position_ids
        config = _tiny().config

        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match="forward takes no position_ids.*data.packing: concatenated"):
        check_isolated_packing(Plain())
    b = eval_batches(_docs(3), 16, 1, EOS)[0]
    with pytest.raises(ValueError, match="forward takes no position_ids"):
        packed_forward(Plain(), b)


def test_data_packing_config_field():
    from desmoe.train.config import DataConfig

    assert DataConfig().packing == "isolated"
    assert DataConfig(packing="concatenated").packing == "concatenated"
    with pytest.raises(ValueError, match=r"data.packing must be isolated or concatenated, got 'yes'"):
        DataConfig(packing="yes")
