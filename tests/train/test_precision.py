"""Mixed precision: ``model.dtype: bfloat16`` trains float32 master weights (and float32 AdamW
state) under bf16 autocast, so lr 1e-5 updates survive; pure bf16 parameters (``model.pure_dtype``) lose them.
Runs the training path's own builders (build_model, build_optimizer, use_bf16, task_loss) on CPU."""
import pytest
import torch

from benchmarks.precision_updates import compare, lr_updates
from desmoe.train.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bf16_autocast_over_fp32_master_weights_keeps_small_updates():
    r = lr_updates("float32", False)
    assert not r["bf16"]
    ref = r["delta"]
    mixed = lr_updates("bfloat16", False)
    assert mixed["bf16"] and mixed["param_dtype"] == torch.float32 and mixed["state_dtypes"] == {torch.float32}
    assert not mixed["warnings"]
    # the experts ran in bf16 (the op's own autocast rule), not fp32 under an autocast that never reached them
    assert mixed["experts_operand_dtypes"] == ["bfloat16"] and r["experts_operand_dtypes"] == ["float32"]
    c, c_ref = compare(mixed["delta"], ref), compare(ref, ref)
    assert c["cosine"] > 0.97 and c["rel_err"] < 0.3, c
    assert c["changed"] == pytest.approx(c_ref["changed"], abs=0.01)
    pure = lr_updates("bfloat16", True)
    assert pure["param_dtype"] == torch.bfloat16 and pure["state_dtypes"] == {torch.bfloat16}
    assert any("pure bfloat16 parameters" in w for w in pure["warnings"])
    c_pure = compare(pure["delta"], ref)
    assert c_pure["changed"] < 0.5 * c_ref["changed"] and c_pure["cosine"] < 0.8, c_pure  # updates below ½ ulp


def test_pure_dtype_is_validated():
    with pytest.raises(ValueError, match="model.pure_dtype"):
        ModelConfig(tiny="qwen3_moe", pure_dtype="yes")
    assert ModelConfig(tiny="qwen3_moe", dtype="bfloat16").param_dtype == "float32"
    assert ModelConfig(tiny="qwen3_moe", dtype="bfloat16", pure_dtype=True).param_dtype == "bfloat16"


def test_fsdp2_policy_bf16_compute_fp32_reduce_over_fp32_shards():
    from desmoe.train.distributed import fsdp_mp_policy

    lin = torch.nn.Linear(4, 4)
    mp = fsdp_mp_policy(lin, bf16=True)
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    assert fsdp_mp_policy(lin, bf16=False) is None  # fp32 compute
    assert fsdp_mp_policy(lin.to(torch.bfloat16), bf16=True) is None  # pure bf16 shards: nothing to cast
