"""CPU subnormals flushed for a run's span: set by the entry points, restored where desmoe is a library."""
import torch

from desmoe.train.numerics import denormals_flushed, flushed_denormals


def test_flushed_denormals_sets_and_restores_the_mode():
    torch.set_flush_denormal(False)
    assert not denormals_flushed()
    with flushed_denormals():
        if torch.set_flush_denormal(True):  # the CPU supports it
            assert denormals_flushed()
            assert (torch.tensor([1e-40]) * 1.0).item() == 0.0
    assert not denormals_flushed()  # a user's process gets its own mode back
    torch.set_flush_denormal(True)
    with flushed_denormals():
        pass
    assert denormals_flushed() or not torch.set_flush_denormal(True)  # an already-flushing process stays so
    torch.set_flush_denormal(False)
