"""ExpertRowAdamW: compact moments for the expert rows that train, every update bitwise the plain AdamW's (with the
controller's zeroed rows), checkpoints round-trip, a plain AdamW checkpoint resumes, and a whole DES-MoE run ends
with the same weights as one on plain AdamW while holding less optimizer state."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from desmoe.method.optim import ROWS_KEY, ExpertRowAdamW
from desmoe.train import config_from_dict
from desmoe.train.trainer import run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from test_train import tiny_cfg  # noqa: E402

E = 6


def _masks(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [None]  # a first step with every row trainable (warm-up)
    for _ in range(steps - 1):
        m = torch.rand(E, generator=g) > 0.5
        m[int(torch.randint(E, (1,), generator=g))] = True
        out.append(m)
    out[3] = torch.zeros(E, dtype=torch.bool)  # a step where no row trains
    return out


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 5, 8, generator=g), torch.randn(E, 8, 4, generator=g), torch.randn(7, 3, generator=g)


def _groups(ws):
    return [{"params": list(ws[:2]), "weight_decay": 0.0, "desmoe_expert_decay": 0.0},
            {"params": [ws[2]], "weight_decay": 0.01}]


def _plain_step(opt, ws, mask):
    """What the controller does around a plain AdamW: masked rows' grads and moments zeroed."""
    for p in ws[:2]:
        if mask is not None:
            p.grad[~mask] = 0
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k][~mask] = 0
    opt.step()


def _drive(make, steps=9, resume_at=None):
    ws = [t.clone().requires_grad_(True) for t in _params()]
    opt, mask_now = make(ws)
    g = torch.Generator().manual_seed(1)
    masks = _masks(steps)
    for i, m in enumerate(masks):
        mask_now[0] = m
        for p in ws:
            p.grad = torch.randn(p.shape, generator=g)
        if isinstance(opt, ExpertRowAdamW):
            for p in ws[:2]:
                if m is not None:
                    p.grad[~m] = 0
            opt.step()
        else:
            _plain_step(opt, ws, m)
        if resume_at == i:  # a checkpoint: a new optimizer loads the state dict
            sd = opt.state_dict()
            opt, mask_now2 = make(ws)
            mask_now2[0] = mask_now[0]
            mask_now = mask_now2
            opt.load_state_dict(sd)
    return ws, opt


def _compact(ws):
    mask_now = [None]
    def rows_of():
        return None if mask_now[0] is None else {id(p): mask_now[0] for p in ws[:2]}

    return ExpertRowAdamW(_groups(ws), rows_of=rows_of, lr=1e-2), mask_now


def _plain(ws):
    return torch.optim.AdamW(_groups(ws), lr=1e-2), [None]


def test_updates_bitwise_equal_to_plain_adamw_with_zeroed_rows():
    want, plain = _drive(_plain)
    got, opt = _drive(_compact)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    last = _masks(9)[-1]
    for p in got[:2]:
        st = opt.state[p]
        assert st[ROWS_KEY] == last.nonzero().flatten().tolist()
        assert st["exp_avg"].shape[0] == int(last.sum()) < E  # moments only for the rows that train
    assert opt.state[got[2]]["exp_avg"].shape == got[2].shape  # other parameters: the plain path
    assert sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)) < \
        sum(t.numel() for st in plain.state.values() for t in st.values() if torch.is_tensor(t))


@pytest.mark.parametrize("at", [0, 3, 5])
def test_state_dict_round_trip_continues_exactly(at):
    want, _ = _drive(_compact)
    got, _ = _drive(_compact, resume_at=at)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_plain_adamw_checkpoint_resumes_exactly():
    """State written by a plain AdamW (full-size moments, no row list: earlier desmoe checkpoints) is taken up."""
    want, _ = _drive(_plain)
    ws = [t.clone().requires_grad_(True) for t in _params()]
    plain, _ = _plain(ws)
    g = torch.Generator().manual_seed(1)
    masks = _masks(9)
    for i, m in enumerate(masks):
        for p in ws:
            p.grad = torch.randn(p.shape, generator=g)
        if i < 4:
            _plain_step(plain, ws, m)
            continue
        if i == 4:
            opt, mask_now = _compact(ws)
            opt.load_state_dict(plain.state_dict())
        mask_now[0] = m
        if m is not None:
            for p in ws[:2]:
                p.grad[~m] = 0
        opt.step()
    for a, b in zip(ws, want):
        assert torch.equal(a, b)


def test_optimizer_hooks_run_once_per_step():
    ws = [t.clone().requires_grad_(True) for t in _params()]
    opt, _ = _compact(ws)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    for p in ws:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]


def test_des_moe_run_same_weights_as_plain_adamw_and_less_state(tmp_path, monkeypatch, one_thread):
    from desmoe.method import controller

    d = tiny_cfg(str(tmp_path))
    compact = run(config_from_dict(d), str(tmp_path / "compact"), progress=False, log=lambda *_: None)

    def plain(self, *, lr, weight_decay=0.0, **kw):
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=lr, **kw)

    monkeypatch.setattr(controller.MethodController, "optimizer", plain)
    ref = run(config_from_dict(d), str(tmp_path / "plain"), progress=False, log=lambda *_: None)
    a = load_file(os.path.join(compact["checkpoint"], "model", "model.safetensors"))
    b = load_file(os.path.join(ref["checkpoint"], "model", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(os.path.join(compact["checkpoint"], "trainer.pt"), weights_only=True)["optimizer"]["state"]
    sb = torch.load(os.path.join(ref["checkpoint"], "trainer.pt"), weights_only=True)["optimizer"]["state"]
    size = lambda s: sum(t.numel() for st in s.values() for t in st.values() if torch.is_tensor(t))  # noqa: E731
    assert any(ROWS_KEY in st for st in sa.values())
    assert size(sa) < size(sb)
