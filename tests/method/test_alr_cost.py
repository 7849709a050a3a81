"""The ALR evaluated once for routing and KD (exact against two evaluations), its width, its cost report."""
import io
import json

import pytest
import torch

from desmoe.method import MethodConfig
from desmoe.method.alr import ALRResidual, _TwoCopies, alr_cost, alr_summary, alr_width


def _two_ways(a, x0, gr, gk, shared, autocast=False):
    x = x0.clone().requires_grad_()
    a.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        r, k = a(x, pair=True) if shared else (a(x), a(x.detach()))
    ((r.to(gr.dtype) * gr).sum() + (k.to(gk.dtype) * gk).sum()).backward()
    return [r.detach(), k.detach(), x.grad] + [p.grad.clone() for p in a.parameters()]


@pytest.mark.parametrize("expansion", [0.25, 1, 4])
def test_one_evaluation_equals_two(expansion):
    torch.manual_seed(0)
    a = ALRResidual(16, 5, expansion).double()
    torch.nn.init.normal_(a.down.weight, std=0.3)
    x0, gr, gk = torch.randn(23, 16, dtype=torch.float64), torch.randn(23, 5, dtype=torch.float64), \
        torch.randn(23, 5, dtype=torch.float64)
    for got, want in zip(_two_ways(a, x0, gr, gk, True), _two_ways(a, x0, gr, gk, False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the KD copy alone sends nothing into x; the routing copy alone is the plain module
    x = x0.clone().requires_grad_()
    r, k = a(x, pair=True)
    k.sum().backward()
    assert x.grad is None or x.grad.abs().max() == 0
    w = [p.detach() for p in (a.up.weight, a.up.bias, a.down.weight, a.down.bias)]
    assert torch.autograd.gradcheck(lambda x_, *p: _TwoCopies.apply(x_, *p)[0],
                                    (x0[:4].clone().requires_grad_(), *[t.clone().requires_grad_() for t in w]))


def test_one_evaluation_bf16_autocast_within_bf16_error():
    torch.manual_seed(1)
    a = ALRResidual(32, 8, 4)
    torch.nn.init.normal_(a.down.weight, std=0.1)
    x0, gr, gk = torch.randn(40, 32), torch.randn(40, 8), torch.randn(40, 8)
    ref = _two_ways(a.double(), x0.double(), gr.double(), gk.double(), False)
    a = a.float()
    two = _two_ways(a, x0, gr, gk, False, autocast=True)
    one = _two_ways(a, x0, gr, gk, True, autocast=True)
    assert one[0].dtype == torch.bfloat16  # computes in the autocast dtype, as nn.Linear does
    for o, t, r in zip(one[2:], two[2:], ref[2:]):
        err_one, err_two = float((o.double() - r).norm()), float((t.double() - r).norm())
        assert err_one <= 2 * err_two + 1e-6 * float(r.norm())


def test_width_and_config():
    assert alr_width(256, 0.25) == 64 and alr_width(3, 0.1) == 1
    assert ALRResidual(256, 16, 0.25).up.out_features == 64
    assert MethodConfig(alr_expansion=0.25).alr_expansion == 0.25
    for bad in (0, -1, 65, True, "4"):
        with pytest.raises(ValueError, match="alr_expansion"):
            MethodConfig(alr_expansion=bad)


def test_alr_summary_counts(tmp_path):
    from desmoe.integrations.tiny import tiny_config

    cfg = tiny_config("qwen3_moe", hidden_size=64, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=24, vocab_size=300)
    s = alr_summary(cfg, 1)
    p, f = alr_cost(64, 8, 1)
    assert (s["params"], s["fwd_flops_per_token"], s["moe_layers"]) == (3 * p, 3 * f, 3)
    assert p == 64 * 64 + 64 + 64 * 8 + 8 and f == 2 * (64 * 64 + 64 * 8)
    cfg.save_pretrained(tmp_path)
    from desmoe.info import main

    buf = io.StringIO()
    main("json", out=buf, model=str(tmp_path), alr_expansion=1)
    assert json.loads(buf.getvalue())["alr"]["params"] == 3 * p
