"""The README's model-type table is the one the registry generates (``python -m desmoe.integrations.hf
--update-readme`` rewrites it)."""
import os

from desmoe.integrations import hf

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                      "families.md")


def test_readme_model_type_table_is_generated_from_the_registry():
    text = open(README).read()
    assert hf.README_BEGIN in text and hf.README_END in text
    table = text.split(hf.README_BEGIN, 1)[1].split(hf.README_END, 1)[0].strip()
    assert table == hf.model_type_table(), \
        "README model-type table is stale: python -m desmoe.integrations.hf --update-readme"
    for mt in hf.supported_model_types():
        assert f"| `{mt}` |" in table
    for mt in hf.REFUSED:
        assert f"| `{mt}` |" in table


def test_refused_and_unknown_types_raise_with_a_reason():
    import pytest

    for mt, why in hf.REFUSED.items():
        with pytest.raises(hf.UnsupportedModelError, match=mt):
            hf.family(mt)
    with pytest.raises(hf.UnsupportedModelError, match="jamba.*has not been checked against desmoe's routing"):
        hf.family("jamba")
    with pytest.raises(hf.UnsupportedModelError, match="nemotron_h.*no gate projection"):
        hf.family("nemotron_h")
    with pytest.raises(hf.UnsupportedModelError, match="not supported by desmoe.patch"):
        hf.family(None)


def _fused_experts_model_types():
    import pathlib
    import re

    import transformers

    root = pathlib.Path(transformers.__file__).parent / "models"
    for f in sorted(root.glob("*/modeling_*.py")):
        if f.stem == f"modeling_{f.parent.name}" and re.search(r"@use_experts_implementation", f.read_text()):
            yield f.parent.name


def test_every_fused_experts_model_type_is_supported_or_refused_with_a_reason():
    types = list(_fused_experts_model_types())
    assert {"mixtral", "deepseek_v3", "gpt_oss"} <= set(types)
    for mt in types:
        if mt in hf.MODEL_TYPES:
            continue
        why = hf.refusal_reason(mt)
        assert "experts use" in why or "has not been checked" in why or mt in hf.REFUSED, (mt, why)
    assert {"gpt_oss", "phimoe"} <= set(hf.MODEL_TYPES)  # once refused (biased / interleaved experts, SparseMixer)
