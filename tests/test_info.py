"""`desmoe info`: what the install will run on, readable without Triton; Triton is not a hard dependency."""
import json
import os
import subprocess
import sys

import pytest
import torch

from desmoe.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_table_names_versions_backends_and_model_types(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "backends.patch_cpu.experts" in out and "backends.patch_cpu.routing" in out
    assert "mixtral" in out and "extension.available" in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--format", "json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch"] == torch.__version__
    assert facts["device"]["cuda_available"] == torch.cuda.is_available()
    # on a CPU tensor, auto resolves to the grouped experts and the reference router (Triton needs CUDA tensors
    # outside the interpreter); the same rule desmoe.ops applies
    from desmoe import ops

    assert facts["backends"]["patch_cpu"] == {"routing": "reference",
                                              "experts": ops.resolve_backend(None, torch.device("cpu"))}
    assert facts["backends"]["patch_cpu"]["experts"] == "grouped"
    assert "qwen3_moe" in facts["supported_model_types"]


def test_info_honours_a_backend_override_it_cannot_use(capsys, monkeypatch):
    monkeypatch.setenv("DESMOE_BACKEND", "nonsense")
    assert main(["info", "--format", "json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backends"]["patch_cpu"]["experts"].startswith("error: backend must be one of")
    assert facts["env"]["DESMOE_BACKEND"] == "nonsense"


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError, as on a machine without the wheel
from desmoe.cli import main
rc = main(["info", "--format", "json"])
import torch, desmoe
from desmoe import ops
try:
    ops.resolve_backend("triton", torch.device("cpu"))
except RuntimeError as e:
    print("TRITON-ERROR:", e)
# the reference path still works end to end
x = torch.randn(5, 8)
w_gate_up = torch.randn(4, 2 * 6, 8)
w_down = torch.randn(4, 8, 6)
logits = torch.randn(5, 4)
w, ids = ops.topk_route(logits, 2, backend="auto")
y = ops.moe_experts(x, w_gate_up, w_down, ids, w, backend="auto")
print("Y-SHAPE:", tuple(y.shape))
sys.exit(rc)
"""


def test_info_and_reference_path_run_without_triton():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("DESMOE_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    json_part = r.stdout[: r.stdout.index("TRITON-ERROR:")]
    facts = json.loads(json_part)
    assert facts["triton"] == "not installed"
    assert facts["backends"]["triton_kernels_importable"] is False
    assert facts["backends"]["patch_cpu"] == {"routing": "reference", "experts": "grouped"}
    assert "pip install" in r.stdout and "backend='reference'" in r.stdout
    assert "Y-SHAPE: (5, 8)" in r.stdout
    assert "Traceback" not in r.stderr


def test_triton_is_not_a_hard_dependency():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)["project"]
    assert not any(d.lower().startswith("triton") for d in proj["dependencies"])
    extras = proj["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    assert any(d.startswith("triton") for d in extras["dev"])  # the interpreter tests need it
