"""The ALR's files beside a model folder (desmoe.method.alr_files): written, read back, refused when they do not fit."""
import pytest
import torch

import desmoe
from desmoe.integrations.hf import routers as get_routers
from desmoe.integrations.tiny import tiny_model
from desmoe.method.alr import attach_alr
from desmoe.method.alr_files import ALRFileError, load_alr_, write_alr


def test_alr_of_a_fractional_width_round_trips(tmp_path):
    # method.alr_expansion may be a fraction (round(x·D) wide): the stored width, not an integer ratio, rebuilds it
    m = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64))
    for a in attach_alr(get_routers(m), 0.3):
        torch.nn.init.normal_(a.down.weight)
    write_alr(str(tmp_path), m)
    m2 = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64))
    assert load_alr_(m2, str(tmp_path))
    for r1, r2 in zip(get_routers(m), get_routers(m2)):
        assert r2.residual.up.out_features == r1.residual.up.out_features
        for (n, p), q in zip(r1.residual.named_parameters(), r2.residual.parameters()):
            assert torch.equal(p, q), n


def test_alr_files_of_another_model_are_refused(tmp_path):
    m = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64))
    attach_alr(get_routers(m), 1)
    write_alr(str(tmp_path), m)
    other = desmoe.patch(tiny_model("qwen3_moe", vocab_size=64, num_hidden_layers=1))
    with pytest.raises(ALRFileError, match="ALR layers but the model has 1 routers"):
        load_alr_(other, str(tmp_path))
