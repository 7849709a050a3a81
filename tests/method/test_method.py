"""DES-MoE method pieces: KD loss, λ schedules, affinity A + EMA, masks, per-token gradient masking, phases,
baselines. Tiny qwen3_moe / deepseek_v2 models on CPU (reference ops)."""
import math

import pytest
import torch

import desmoe
from desmoe.integrations.tiny import tiny_model
from desmoe.method import (AffinityTracker, MethodConfig, MethodController, kd_loss, lambda_at, masks_from_affinity,
                           select_top_p)
from desmoe import ops
from desmoe.ops import reference as ref


# --- KD loss ------------------------------------------------------------------------------------------------
def test_kd_loss_value_matches_formula():
    t, s = torch.randn(7, 5), torch.randn(7, 5)
    tau = 0.7
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(t, s, tau), want)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    want_v = (p * (p.log() - q.log())).sum(-1)[valid].mean()
    torch.testing.assert_close(kd_loss(t, s, tau, valid), want_v)
    assert kd_loss(t, t.clone(), tau).abs() < 1e-6


def test_kd_loss_gradient():
    t = torch.randn(4, 6, dtype=torch.float64)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    # float32 inside; compare against the analytic gradient (q - p) / (tau * T)
    tau = 0.7
    kd_loss(t, s, tau).backward()
    p, q = torch.softmax(t / tau, -1), torch.softmax(s.detach() / tau, -1)
    torch.testing.assert_close(s.grad, (q - p) / (tau * 4), atol=1e-6, rtol=1e-5)
    t2 = torch.randn(3, 4, requires_grad=True)
    kd_loss(t2, torch.randn(3, 4), 0.7)  # teacher is detached: no grad flows to it
    assert t2.grad is None
    with pytest.raises(ValueError, match="tau"):
        kd_loss(t, s, 0.0)


# --- λ schedules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_lambda_schedules(schedule):
    vals = [lambda_at(a / 100, schedule=schedule, lambda_max=0.5, end=0.7) for a in range(101)]
    assert vals[0] == pytest.approx(0.5)
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:])), "λ must not increase"
    assert vals[70] == pytest.approx(0.0, abs=1e-12) and max(vals[70:]) == pytest.approx(0.0, abs=1e-12)
    mid = lambda_at(0.35, schedule=schedule, lambda_max=0.5, end=0.7)
    want = {"linear": 0.25, "cosine": 0.25, "exponential": 0.5 * (math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5))}
    assert mid == pytest.approx(want[schedule])


def test_lambda_bad_schedule():
    with pytest.raises(ValueError, match="schedule"):
        lambda_at(0.1, schedule="step")
    assert lambda_at(0.9, schedule="constant", lambda_max=0.3) == 0.3


# --- A, EMA, masks ------------------------------------------------------------------------------------------
def test_affinity_accumulation_and_ema():
    L, M, E, K, T = 2, 3, 5, 2, 40
    tr = AffinityTracker(L, M, E, phi=0.6, momentum=0.9)
    total = torch.zeros(L, M, E)
    for _ in range(3):
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(L * T)]).view(L, T, K)
        dom = torch.randint(-1, M - 1, (T,))  # domain M-1 never appears, -1 = padding
        tr.observe(ids, dom)
        for l in range(L):
            for t in range(T):
                if dom[t] >= 0:
                    for k in range(K):
                        total[l, dom[t], ids[l, t, k]] += 1
    tr.finish_warmup()
    want = total / total.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(tr.A_LME, want)
    assert torch.all(tr.A_LME[:, M - 1] == 0)
    torch.testing.assert_close(tr.A_LME[:, : M - 1].sum(-1), torch.ones(L, M - 1))
    # EMA refresh with new routing: only domain 0, always experts {0, 1}
    ids = torch.tensor([0, 1]).expand(L, 10, 2)
    tr.observe(ids, torch.zeros(10, dtype=torch.long))
    old = tr.A_LME.clone()
    tr.refresh()
    new0 = torch.tensor([0.5, 0.5, 0, 0, 0])
    torch.testing.assert_close(tr.A_LME[:, 0], 0.9 * old[:, 0] + 0.1 * new0)
    torch.testing.assert_close(tr.A_LME[:, 1:], old[:, 1:])  # no new tokens: rows kept
    assert tr.counts_LME.sum() == 0


def test_mask_threshold_and_at_least_one_expert():
    A = torch.tensor([[[0.5, 0.3, 0.29, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.01, 0.0]]])
    m = masks_from_affinity(A, 0.6)
    assert m[0, 0].tolist() == [True, True, False, False]  # 0.3 >= 0.6*0.5, 0.29 < 0.3
    assert m[0, 1].all()
    assert m[0, 3].tolist() == [False, False, True, False]
    assert (m.sum(-1) >= 1).all()
    m1 = masks_from_affinity(A, 1.0)
    assert (m1.sum(-1) >= 1).all()
    with pytest.raises(ValueError, match="phi"):
        masks_from_affinity(A, 0.0)


def test_method_ops_match_the_reference():
    """The method calls ``desmoe.ops`` (extension where built); every op equals its plain-PyTorch reference."""
    L, M, E, T, K = 2, 3, 6, 17, 2
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(L * T)]).view(L, T, K)
    dom = torch.randint(-1, M, (T,))
    w = torch.rand(L, T, K)
    masks = torch.rand(L, M, E) > 0.5
    pm = ops.pair_mask(dom, ids, masks)
    for l in range(L):
        assert torch.equal(pm[l], ref.pair_mask_reference(dom, ids[l], masks[l]))
    c, mass, load = ops.routing_stats(ids, dom, M, E, topk_weights_LTK=w)
    assert c.sum() == (dom >= 0).sum() * K * L and load.sum() == T * K * L
    c2, mass2, load2 = ref.routing_stats_reference(ids, dom, M, E, w)
    assert torch.equal(c, c2) and torch.equal(load, load2)
    torch.testing.assert_close(mass, mass2)
    A = torch.rand(L, M, E)
    torch.testing.assert_close(ops.affinity_ema_(A.clone(), c, 0.9), ref.affinity_ema_reference(A.clone(), c, 0.9))


def test_select_top_p():
    s = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    assert select_top_p(s, 0.2)[0, 0].tolist() == [True, False, False, False]
    assert select_top_p(s, 0.6)[0, 0].tolist() == [True, True, False, False]
    assert select_top_p(s, 1.0)[0, 0].tolist() == [True, True, True, True]


# --- on a model ------------------------------------------------------------------------------------------------
def _model(mt="qwen3_moe"):
    m = tiny_model(mt, vocab_size=64)
    desmoe.patch(m, backend="reference")
    return m.train()


def _batch(B=2, S=12, M=2, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    dom = torch.arange(B).remainder(M).view(B, 1).expand(B, S).clone()
    return {"input_ids": ids, "labels": ids.clone(), "domain_ids": dom}


def _step(ctl, model, opt, step, batch):
    ctl.begin_step(step)
    dom_T = batch["domain_ids"].reshape(-1)
    with ctl.applied(dom_T) as fwd:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    loss = ctl.combine(out.loss, fwd.added_loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    ctl.before_optimizer_step(opt)
    opt.step()
    ctl.end_step(step)
    return loss


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _changed_experts(before, model, name):
    p = dict(model.named_parameters())[name].detach()
    return {e for e in range(p.shape[0]) if not torch.equal(before[name][e], p[e])}


def test_alr_step0_equals_base_model():
    m = _model()
    x = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        want = m(input_ids=x).logits
        MethodController(m, MethodConfig(), 10, ["a", "b"])
        got = m(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_per_token_masking_gradients():
    """A batch of domain 0 only: each expert's weight gradient is nonzero only if domain 0 owns it."""
    m = _model()
    ctl = MethodController(m, MethodConfig(name="des_moe"), 10, ["a", "b"])
    ctl.apply_phase("stabilization")
    L, E = len(ctl.blocks), ctl.num_experts
    masks = torch.zeros(L, 2, E, dtype=torch.bool)
    masks[:, 0, :4] = True
    masks[:, 1, 4:] = True
    masks[:, 1, 0] = True  # expert 0 is shared by both domains
    ctl.tracker.masks_LME = masks
    ctl.tracker.initialised = True
    b = _batch()
    b["domain_ids"][:] = 0
    dom_T = b["domain_ids"].reshape(-1)
    ctl.begin_step(5)
    with ctl.applied(dom_T):
        loss = m(input_ids=b["input_ids"], labels=b["labels"]).loss
    loss.backward()
    for _, _, ex in ctl.blocks:
        for p in (ex.gate_up_proj, ex.down_proj):
            nz = p.grad.flatten(1).abs().sum(1) > 0
            assert not nz[4:].any(), "domain-1 experts got gradient from domain-0 tokens"
            assert nz[:4].any()
    # and the optimizer step changes only domain 0's experts that these tokens reached
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(ctl.param_groups(0.0), lr=1e-2)
    ctl.before_optimizer_step(opt)
    opt.step()
    for bname, _, ex in ctl.blocks:
        got = _changed_experts(before, m, f"{bname}.experts.gate_up_proj")
        reached = set((ex.gate_up_proj.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist())
        assert got == reached and got <= {0, 1, 2, 3}
    m.zero_grad()
    # mixed batch: row of domain 1 reaches experts 4.. and 0
    m.zero_grad()
    b = _batch()
    dom_T = b["domain_ids"].reshape(-1)
    b2 = dict(b, domain_ids=torch.ones_like(b["domain_ids"]))
    with ctl.applied(b2["domain_ids"].reshape(-1)):
        loss = m(input_ids=b["input_ids"], labels=b["labels"]).loss
    loss.backward()
    for _, _, ex in ctl.blocks:
        nz = ex.gate_up_proj.grad.flatten(1).abs().sum(1) > 0
        assert not nz[1:4].any()


def test_phases_change_exactly_the_right_parameters():
    torch.manual_seed(0)
    m = _model()
    T = 10
    ctl = MethodController(m, MethodConfig(name="des_moe", update_every=2, phi=0.9), T, ["a", "b"])
    opt = torch.optim.AdamW(ctl.param_groups(weight_decay=0.1), lr=1e-2)
    names = dict(m.named_parameters())
    kinds = ctl.kinds
    for step in range(T):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        b = _batch(seed=step)
        phase = ctl.phase(step)
        masks = None if ctl.tracker.masks_LME is None else ctl.tracker.masks_LME.clone()
        _step(ctl, m, opt, step, b)
        changed = _changed(before, m)
        changed_kinds = {kinds[n] for n in changed}
        want = {"warmup": {"experts", "alr"}, "stabilization": {"experts", "alr"}, "consolidation": {"experts"}}[phase]
        assert changed_kinds == want, (step, phase, changed_kinds)
        assert not any(kinds[n] in ("router", "attention", "embeddings", "other") for n in changed)
        if phase != "warmup":
            for l, (bname, _, _) in enumerate(ctl.blocks):
                allowed = set(masks[l].any(0).nonzero().flatten().tolist())
                got = _changed_experts(before, m, f"{bname}.experts.gate_up_proj")
                assert got <= allowed and got, (step, l, got, allowed)
        # frozen parameters own no optimizer state
        for n, p in names.items():
            if kinds[n] in ("router", "attention", "embeddings", "other"):
                assert p not in opt.state
    assert ctl.tracker.initialised and ctl.tracker.masks_LME is not None


@pytest.mark.parametrize("method", ["fft", "frozen_router", "des_moe_no_alr", "des_moe_no_dges", "esft_gate",
                                    "esft_token", "experts_only", "fft_attention_frozen"])
def test_baselines_select_the_right_parameters(method):
    m = _model("deepseek_v2")
    T = 5
    ctl = MethodController(m, MethodConfig(name=method, shared_experts="frozen", esft_p=0.3), T, ["a", "b"])
    if method.startswith("esft"):
        sel = ctl.prepare([_batch(seed=s) for s in range(2)])
        assert sel.any(1).all() and not sel.all()
    opt = torch.optim.AdamW(ctl.param_groups(0.1), lr=1e-2)
    kinds = ctl.kinds
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _step(ctl, m, opt, 0, _batch())  # step 0: warm-up for the DES variants
    changed_kinds = {kinds[n] for n in _changed(before, m)}
    want = {
        "fft": {"experts", "router", "shared_experts", "attention", "embeddings", "other"},
        "frozen_router": {"experts", "shared_experts", "attention", "embeddings", "other"},
        "des_moe_no_alr": {"experts", "router"},
        "des_moe_no_dges": {"experts", "alr"},
        "esft_gate": {"experts"},
        "esft_token": {"experts"},
        "experts_only": {"experts"},
        "fft_attention_frozen": {"experts", "router", "shared_experts", "embeddings", "other"},
    }[method]
    assert changed_kinds == want
    if method == "experts_only":  # every routed expert moves, not a selection
        for l, (bname, _, _) in enumerate(ctl.blocks):
            assert len(_changed_experts(before, m, f"{bname}.experts.down_proj")) > 1
    if method.startswith("esft"):
        for l, (bname, _, _) in enumerate(ctl.blocks):
            got = _changed_experts(before, m, f"{bname}.experts.down_proj")
            assert got == set(sel[l].nonzero().flatten().tolist())
    if method == "des_moe_no_dges":  # no masks in stabilisation: every routed expert may train
        for s in range(1, 3):
            _step(ctl, m, opt, s, _batch(seed=s))
        assert ctl.expert_trainable_LE() is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="method.name"):
        MethodConfig(name="lora")
    with pytest.raises(ValueError, match="method.phi"):
        MethodConfig(phi=1.5)
    with pytest.raises(ValueError, match="method.stabilize_frac"):
        MethodConfig(warmup_frac=0.5, stabilize_frac=0.3)
    with pytest.raises(ValueError, match="method.shared_experts"):
        MethodConfig(shared_experts="sometimes")


@pytest.mark.parametrize("mode,mt", [("until_consolidation", "deepseek_v2"), ("always", "qwen2_moe"),
                                     ("never", "deepseek_v2"), ("until_consolidation", "qwen2_moe"),
                                     ("until_consolidation", "granitemoeshared"),
                                     ("until_consolidation", "hunyuan_v1_moe")])
def test_shared_experts_mode(mode, mt):
    """Shared experts (and Qwen2-MoE's shared-expert gate; Granite-shared's and HunYuan's ``shared_mlp``) train
    in warm-up and stabilisation unless ``never``, and in consolidation only with ``always`` (the paper:
    consolidation updates masked routed experts only)."""
    m = _model(mt)
    ctl = MethodController(m, MethodConfig(name="des_moe", shared_experts=mode), 10, ["a", "b"])
    opt = torch.optim.AdamW(ctl.param_groups(), lr=1e-2)
    shared = {n for n, k in ctl.kinds.items() if k == "shared_experts"}
    assert shared and (mt != "qwen2_moe" or any("shared_expert_gate" in n for n in shared))
    assert all(".shared_mlp." in n for n in shared) == (mt in ("granitemoeshared", "hunyuan_v1_moe"))
    for step, phase in ((0, "warmup"), (3, "stabilization"), (7, "consolidation")):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        _step(ctl, m, opt, step, _batch(seed=step))
        moved = _changed(before, m) & shared
        assert ctl.current_phase == phase
        want = mode == "always" or (mode == "until_consolidation" and ctl.current_phase != "consolidation")
        assert (moved == shared) if want else not moved, (step, ctl.current_phase, moved)
    assert MethodConfig(shared_experts="train").shared_experts == "always"  # old names still accepted
    assert MethodConfig(shared_experts="frozen").shared_experts == "never"


def test_readme_phase_table_is_generated_from_the_code():
    from pathlib import Path

    from desmoe.method.phase_table import phase_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    assert phase_table_markdown() in readme, "README's per-phase table is stale: paste phase_table_markdown()"


def test_masks_are_held_through_the_backward_and_released_before_the_optimizer_step():
    """``applied`` holds this micro-batch's masks and router loss (KD) for the modules (desmoe.context) through
    the backward (activation checkpointing replays layers inside it); the next ``applied``, the optimizer step
    or ``release`` removes them. The routers hold no record after the scope, and the added loss is a value."""
    from desmoe.context import added_loss, expert_masks, recorder

    m = _model()
    ctl = MethodController(m, MethodConfig(name="des_moe"), 10, ["a", "b"])
    b = _batch()
    ctl.begin_step(0)
    with ctl.applied(b["domain_ids"].reshape(-1)):
        m(input_ids=b["input_ids"])
    ctl.tracker.finish_warmup()
    ctl.begin_step(5)  # stabilisation: DGES masks, KD still on
    assert ctl.current_phase == "stabilization" and ctl.last_lambda > 0
    assert all(expert_masks(ex) is None for ex in ctl.experts) and all(added_loss(r) is None for r in ctl.routers)
    with ctl.applied(b["domain_ids"].reshape(-1)) as fwd:
        assert all(expert_masks(ex) is not None for ex in ctl.experts)
        out = m(input_ids=b["input_ids"], labels=b["labels"])
    assert all(expert_masks(ex) is not None for ex in ctl.experts)  # held for the backward
    assert all(added_loss(r) is not None for r in ctl.routers)
    assert all(recorder(r) is None for r in ctl.routers)
    assert fwd.added_loss is not None and not fwd.added_loss.requires_grad and fwd.added_loss >= 0  # ALR starts at 0
    assert int(ctl.tracker.counts_LME.sum()) > 0
    ctl.combine(out.loss, fwd.added_loss).backward()
    ctl.before_optimizer_step(None)
    assert all(expert_masks(ex) is None for ex in ctl.experts) and all(added_loss(r) is None for r in ctl.routers)
    with pytest.raises(RuntimeError, match="boom"):  # a failing forward leaves nothing
        with ctl.applied(b["domain_ids"].reshape(-1)):
            raise RuntimeError("boom")
    assert all(expert_masks(ex) is None for ex in ctl.experts) and all(added_loss(r) is None for r in ctl.routers)


def test_registry_names_every_method_and_refuses_clashes():
    from desmoe.method import Method, method_class, method_names, register_method
    from desmoe.method.des_moe import DesMoE

    assert set(method_names()) >= {"des_moe", "des_moe_no_alr", "des_moe_no_dges", "fft", "frozen_router",
                                   "esft_gate", "esft_token"}
    assert method_class("des_moe") is DesMoE

    class Clash(Method):
        name = "des_moe"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(object)
    with pytest.raises(ValueError, match="method.name must be one of"):
        method_class("lora")
    with pytest.raises(NotImplementedError, match="trainable_kinds"):
        Method(MethodConfig(), 10).trainable_kinds("any")


@pytest.mark.parametrize("mt", ["qwen3_moe", "deepseek_v2"])
def test_kd_gradient_reaches_only_the_alr(mt):
    """λ·KD trains the router only: with *every* parameter requiring grad, the KD term's gradient on every
    expert, shared-expert, attention, embedding and router-weight parameter is exactly zero (the ALR gets one)."""
    torch.manual_seed(0)
    m = _model(mt)
    ctl = MethodController(m, MethodConfig(name="des_moe"), 10, ["a", "b"])
    ctl.begin_step(0)
    assert ctl.last_lambda > 0
    for a in ctl.alr:  # a non-zero residual, so the student differs from the teacher
        torch.nn.init.normal_(a.down.weight, std=0.5)
    for p in m.parameters():
        p.requires_grad_(True)
    b = _batch()
    with ctl.applied(b["domain_ids"].reshape(-1)) as fwd:
        out = m(input_ids=b["input_ids"], labels=b["labels"])
    ctl.combine(out.loss * 0.0, fwd.added_loss).backward()  # the KD term's gradient alone
    kinds = ctl.kinds
    assert {"experts", "attention", "embeddings"} <= set(kinds.values())
    for n, p in m.named_parameters():
        if kinds[n] == "alr":
            continue
        assert p.grad is None or not p.grad.any(), f"KD reached {n} ({kinds[n]})"
    assert all(a.down.weight.grad is not None and a.down.weight.grad.abs().sum() > 0 for a in ctl.alr)


def test_phase_bounds_floor_and_affinity_locked_in_consolidation():
    from desmoe.method import phase_bounds

    assert phase_bounds(18, 0.2, 0.7) == (3, 12)  # floor(3.6), floor(12.6); round() gave (4, 13)
    assert phase_bounds(10, 0.25, 0.7) == (2, 7) and phase_bounds(100, 0.29, 0.7) == (29, 70)
    T = 18
    for lock in (True, False):
        m = _model()
        ctl = MethodController(m, MethodConfig(name="des_moe", update_every=2, lock_affinity=lock), T, ["a", "b"])
        L, E = len(ctl.blocks), ctl.num_experts
        g = torch.Generator().manual_seed(0)
        A_at = {}
        for step in range(T):
            ids = torch.randint(0, E, (L, 16, 2), generator=g)
            ctl.tracker.observe(ids, torch.arange(16).remainder(2))
            ctl.end_step(step)
            A_at[step + 1] = ctl.tracker.A_LME.clone()
        assert ctl.phase(12) == "consolidation" and ctl.phase(11) == "stabilization"
        moved = any(not torch.equal(A_at[12], A_at[s]) for s in range(13, T + 1))
        assert moved != lock, f"lock_affinity={lock}: A changed in consolidation: {moved}"
        assert not torch.equal(A_at[4], A_at[12])  # A does refresh during stabilisation
    with pytest.raises(ValueError, match="method.lock_affinity"):
        MethodConfig(lock_affinity="yes")


def test_esft_scores_a_token_budget_per_domain_capped_by_the_data():
    assert MethodConfig(name="esft_gate").esft_tokens == 131072  # the authors' scripts
    m = _model()
    ctl = MethodController(m, MethodConfig(name="esft_gate", esft_tokens=40), 5, ["a", "b"])
    consumed = []

    def batches():  # an endless stream: 12 tokens per domain per batch
        for s in range(1000):
            consumed.append(s)
            yield _batch(seed=s)

    ctl.prepare(batches())
    assert ctl.method.summary()["esft_scored_tokens"] == {"a": 40, "b": 40}
    assert len(consumed) == 4  # ceil(40 / 12): stops once every domain has its tokens
    ctl2 = MethodController(m, MethodConfig(name="esft_gate", esft_tokens=40), 5, ["a", "b"])
    ctl2.prepare((_batch(seed=s) for s in range(1000)), data_tokens_M=[15, 10_000])  # domain a: 15 tokens
    assert ctl2.method.summary()["esft_scored_tokens"] == {"a": 15, "b": 40}
    with pytest.raises(ValueError, match="method.esft_tokens"):
        MethodConfig(esft_tokens=0)


@pytest.mark.parametrize("mode", ["none", "union"])
def test_unknown_domain_tokens_in_masked_phases(mode):
    """Tokens with domain -1 update no routed expert (``none``) or the experts some domain owns (``union``)."""
    torch.manual_seed(0)
    m = _model()
    ctl = MethodController(m, MethodConfig(name="des_moe", unknown_domain=mode), 10, ["a", "b"])
    L, E = len(ctl.blocks), ctl.num_experts
    masks = torch.zeros(L, 2, E, dtype=torch.bool)
    masks[:, 0, :2] = True
    masks[:, 1, 2:4] = True
    ctl.tracker.masks_LME, ctl.tracker.initialised = masks, True
    ctl.begin_step(3)  # stabilisation: masks in force
    b = _batch()
    b["domain_ids"][:] = -1  # every token of unknown domain
    m.zero_grad(set_to_none=True)
    with ctl.applied(b["domain_ids"].reshape(-1)):
        out = m(input_ids=b["input_ids"], labels=b["labels"])
    out.loss.backward()
    for bname, _, ex in ctl.blocks:
        g = ex.gate_up_proj.grad
        moved = {e for e in range(E) if g is not None and g[e].any()}
        want_max = set() if mode == "none" else {0, 1, 2, 3}
        assert moved <= want_max and (mode == "none" or moved), (bname, moved)
    with pytest.raises(ValueError, match="method.unknown_domain"):
        MethodConfig(unknown_domain="all")


def test_expert_biases_get_no_weight_decay():
    """gpt-oss's expert biases ([E, n]) are biases: no weight decay (HF Trainer's rule), while the expert weights
    get the controller's row-wise decay: with zero gradients a step leaves the biases where they were."""
    m = tiny_model("gpt_oss", vocab_size=64)
    desmoe.patch(m, backend="reference")
    ctl = MethodController(m, MethodConfig(name="fft"), 4, ["a", "b"])
    _, _, ex = ctl.blocks[0]
    groups = ctl.param_groups(weight_decay=0.1)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p is ex.gate_up_proj_bias for p in g["params"]))
    opt = ctl.optimizer(lr=1e-1, weight_decay=0.5)
    before_b, before_w = ex.down_proj_bias.detach().clone(), ex.down_proj.detach().clone()
    before_gb = ex.gate_up_proj_bias.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    ctl.before_optimizer_step(opt)
    opt.step()
    assert torch.equal(ex.down_proj_bias, before_b) and torch.equal(ex.gate_up_proj_bias, before_gb)
    assert not torch.equal(ex.down_proj, before_w)  # the weights decay
