"""torch.compile(fullgraph=True) through a patched model, forward and backward, on every CPU backend.

The experts run behind custom ops with fake implementations (the reference's host-syncing loop never reaches
the compiler), so dynamo traces the whole model in one graph and AOTAutograd traces its backward. The compiled
model's logits and every gradient match the eager patched model's.
"""
import copy

import pytest
import torch

import desmoe
from desmoe.integrations.tiny import tiny_model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# one model per CPU backend (compiling is the slow part of the suite): a softmax and a group-limited router
@pytest.mark.parametrize("model_type,backend", [("qwen3_moe", "grouped"), ("deepseek_v3", "reference")])
def test_patched_model_compiles_fullgraph_forward_and_backward(model_type, backend):
    torch._dynamo.reset()
    model = desmoe.patch(tiny_model(model_type).train(), backend=backend)
    eager = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, ids):
        out = m(ids, labels=ids)
        return out.loss, out.logits

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c, logits_c = compiled(model, ids)
    loss_c.backward()
    loss_e, logits_e = loss_fn(eager, ids)
    loss_e.backward()
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    gc, ge = _grads(model), _grads(eager)
    assert gc.keys() == ge.keys() and any("experts" in n for n in gc)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_grouped_op_compiles_with_inductor_and_masks():
    from desmoe import ops

    torch._dynamo.reset()
    T, E, K, D, I = 16, 8, 2, 16, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w1 = torch.randn(E, 2 * I, D, generator=g, requires_grad=True)
    w2 = torch.randn(E, D, I, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    trainable = torch.arange(E) % 2 == 0

    def layer(x, logits):
        w, ids = ops.topk_route(logits, K, backend="reference")
        return ops.moe_experts(x, w1, w2, ids, w, expert_trainable_E=trainable, backend="grouped", validate_ids=False)

    # no on-disk caches: a graph cached for an older schema of the op would be replayed against the new one
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out_c = torch.compile(layer, fullgraph=True)(x, logits)
        gc = torch.autograd.grad(out_c.square().sum(), (x, w1, w2, logits))
    out_e = layer(x, logits)
    ge = torch.autograd.grad(out_e.square().sum(), (x, w1, w2, logits))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):  # inductor fuses the routing math: compare on the gradient's own scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert gc[1][~trainable].abs().max() == 0 and gc[1][trainable].abs().max() > 0
