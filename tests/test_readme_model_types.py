"""The README's model-type table is the one the registry generates (``python -m desmoe.integrations.hf
--update-readme`` rewrites it)."""
import os

from desmoe.integrations import hf

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_model_type_table_is_generated_from_the_registry():
    text = open(README).read()
    assert hf.README_BEGIN in text and hf.README_END in text
    table = text.split(hf.README_BEGIN, 1)[1].split(hf.README_END, 1)[0].strip()
    assert table == hf.model_type_table(), "README model-type table is stale: python -m desmoe.integrations.hf --update-readme"
    for mt in hf.supported_model_types():
        assert f"| `{mt}` |" in table
    for mt in hf.REFUSED:
        assert f"| `{mt}` |" in table


def test_refused_and_unknown_types_raise_with_a_reason():
    import pytest

    for mt, why in hf.REFUSED.items():
        with pytest.raises(hf.UnsupportedModelError, match=mt):
            hf.family(mt)
    with pytest.raises(hf.UnsupportedModelError, match="has not been checked"):
        hf.family("llama4")
