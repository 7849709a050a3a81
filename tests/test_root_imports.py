"""From the repository root, `import kernels` is Hugging Face's kernel hub, whatever puts the root on sys.path.

transformers >= 5.25 imports Hugging Face's `kernels`; the repository's own `kernels/` folder (desmoe's Triton
kernels, installed as `desmoe.kernels`) sits first on `sys.path` whenever a command runs from the root. Each way
a user runs something from the root is tried in a fresh process.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_KERNELS = os.path.join(ROOT, "kernels")


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)


def _hf_kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels not installed")


@needs_hf_kernels
def test_python_c_from_the_root_imports_hugging_face_kernels_and_the_trainer():
    code = ("import kernels, transformers.trainer, transformers.activations, desmoe.kernels.moe as m; "
            "print(kernels.__file__); print(m.__file__); print(hasattr(kernels, 'get_kernel'))")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_file, own_file, has_api = proc.stdout.split()
    assert not hf_file.startswith(OWN_KERNELS + os.sep), hf_file
    assert "site-packages" in hf_file or "dist-packages" in hf_file, hf_file
    assert (own_file == os.path.join(OWN_KERNELS, "moe.py")
            or own_file.endswith(os.path.join("desmoe", "kernels", "moe.py")))
    assert has_api == "True"


@needs_hf_kernels
def test_python_m_desmoe_info_from_the_root_names_the_hub_kernels_version():
    import importlib.metadata

    proc = _run([sys.executable, "-m", "desmoe", "info", "--format", "json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout)
    for name in ("torch", "triton", "transformers", "kernels"):
        assert name in facts, name
    assert facts["kernels"] == importlib.metadata.version("kernels")
    assert facts["transformers"] == importlib.metadata.version("transformers")


@needs_hf_kernels
def test_python_m_pytest_from_the_root_collects_a_trainer_test_module():
    # `python -m pytest` puts the root first; collecting a module that imports transformers' Trainer failed there
    proc = _run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                 "tests/train/test_hf_trainer.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().split("\n")[-2], proc.stdout[-2000:]


@needs_hf_kernels
def test_a_benchmark_script_that_inserts_the_root_sees_hugging_face_kernels():
    # benchmarks/gpu_run.py inserts the root into sys.path; its transformers baseline imported the Trainer stack
    code = ("import runpy, sys; sys.path.insert(0, '.'); import kernels, transformers.trainer; "
            "print(kernels.__file__)")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stdout.strip().startswith(OWN_KERNELS + os.sep)
    proc = _run([sys.executable, "benchmarks/gpu_run.py", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_hugging_face_kernels_the_root_folder_is_not_a_stand_in():
    # `python -S`: no site-packages, so Hugging Face's package is absent; the root folder must not pose as it
    proc = _run([sys.executable, "-S", "-c", "import kernels"])
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr, proc.stderr[-2000:]
    assert "desmoe.kernels" in proc.stderr


@needs_hf_kernels
def test_a_second_checkout_on_the_path_does_not_loop(tmp_path):
    """Two checkouts on sys.path (the root first, another through PYTHONPATH): each one's kernels/ hands over past
    both, to Hugging Face's package (it used to hand over to the other checkout's, back and forth, until a
    RecursionError)."""
    import shutil

    other = tmp_path / "clone"
    (other / "kernels").mkdir(parents=True)
    (other / "desmoe").mkdir()
    shutil.copy(os.path.join(OWN_KERNELS, "__init__.py"), other / "kernels" / "__init__.py")
    (other / "desmoe" / "__init__.py").write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(other)}
    proc = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "site-packages" in proc.stdout or "dist-packages" in proc.stdout, proc.stdout
