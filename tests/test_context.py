"""desmoe.context: masks, added losses and router records keyed by module — lifetimes, nesting, compile guards."""
import gc

import torch

from desmoe.context import AddedLossScope, MaskScope, added_loss, expert_masks, recorder, recording


def test_mask_scope_holds_until_cleared_and_removes_only_its_own():
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    m = torch.tensor([True, False])
    one, two = MaskScope(), MaskScope()
    one.set(a, expert_trainable_E=m)
    one.set(b, expert_trainable_E=m)
    two.set(b, expert_trainable_E=~m)  # replaced by another scope: clearing `one` leaves it
    one.clear()
    assert expert_masks(a) is None and expert_masks(b).expert_trainable_E.equal(~m)
    two.set(b)  # all None: dropped
    assert expert_masks(b) is None
    with MaskScope() as s:
        s.set(a, expert_trainable_E=m)
        assert expert_masks(a) is not None
    assert expert_masks(a) is None
    lost = MaskScope()
    lost.set(a, expert_trainable_E=m)
    del lost
    gc.collect()
    assert expert_masks(a) is None  # an abandoned scope leaves nothing behind


def test_recording_nests_and_leaves_nothing():
    r1, r2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with recording([r1, r2]) as outer:
        outer.put(r1, {"x": 1})
        assert outer.layers() == []  # r2 has none yet
        with recording([r2]) as inner:
            assert recorder(r2) is inner and recorder(r1) is outer
        assert recorder(r2) is outer
        outer.put(r2, {"x": 2})
    assert recorder(r1) is None and recorder(r2) is None
    assert [x["x"] for x in outer.layers()] == [1, 2]


def test_compiled_forward_sees_masks_set_after_compiling():
    class Experts(torch.nn.Module):
        def forward(self, x):
            masks = expert_masks(self)
            return x + 1 if masks is None else x * masks.expert_trainable_E.float()

    mod = Experts()
    f = torch.compile(mod, fullgraph=True, backend="eager")
    x = torch.ones(2)
    assert f(x).tolist() == [2.0, 2.0]
    with MaskScope() as s:
        s.set(mod, expert_trainable_E=torch.tensor([True, False]))
        assert f(x).tolist() == [1.0, 0.0]
    assert f(x).tolist() == [2.0, 2.0]


def test_added_loss_scope_holds_until_cleared_and_removes_only_its_own():
    r1, r2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    kd, other = object(), object()
    one, two = AddedLossScope(), AddedLossScope()
    one.set([r1, r2], kd)
    two.set([r2], other)  # replaced by another scope: clearing `one` leaves it
    one.clear()
    assert added_loss(r1) is None and added_loss(r2) is other
    two.set([r2], None)  # None: dropped
    assert added_loss(r2) is None
    lost = AddedLossScope()
    lost.set([r1], kd)
    del lost
    gc.collect()
    assert added_loss(r1) is None  # an abandoned scope leaves nothing behind
