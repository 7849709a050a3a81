"""Triton kernels of desmoe, installed as ``desmoe.kernels`` (never as a top-level ``kernels`` package).

- :mod:`desmoe.kernels.routing`: fused top-k routing forward/backward.
- :mod:`desmoe.kernels.permute`: O(S) routing metadata (histogram -> scan -> stable scatter, tile schedule).
- :mod:`desmoe.kernels.moe`: grouped-GEMM SwiGLU expert MLP forward/backward with DES-MoE gradient masks.
- :mod:`desmoe.kernels.moe_gpt_oss`: gpt-oss's experts (interleaved, biased, clamped SwiGLU) on the same tiles.
- :mod:`desmoe.kernels.glue`: the ``grouped_mm`` engine's one-pass SwiGLU forward/backward and dW zeroing.

Launchers, validation of what the kernels assume, and the ``torch.library`` custom ops live in
one module per family in :mod:`desmoe.ops`: ``triton_routing``, ``triton_permute``, ``triton_experts``,
``triton_gpt_oss``, ``triton_glue`` (their shared helpers: ``triton_common``).

The top-level name ``kernels`` belongs to Hugging Face's kernel-hub package, which transformers >= 5.25 imports.
Whenever the repository root is first on ``sys.path`` (``python -m pytest``, ``python -m desmoe``, ``python -c``
from the root) ``import kernels`` finds this folder first. Imported under that name, this file does not define
desmoe's kernels: it loads Hugging Face's package from the rest of ``sys.path`` into ``sys.modules["kernels"]``
(the import system then returns that module), or raises ``ModuleNotFoundError`` as if this folder were absent.
"""

if __name__ == "kernels":

    def _hand_over_to_hugging_face_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        def _is_checkout(entry) -> bool:  # this root, or another desmoe checkout (its kernels/ would hand over too)
            base = entry or os.curdir
            return (os.path.isfile(os.path.join(base, "kernels", "__init__.py"))
                    and os.path.isfile(os.path.join(base, "desmoe", "__init__.py")))

        search = [p for p in sys.path if isinstance(p, str) and not _is_checkout(p)]
        spec = importlib.machinery.PathFinder.find_spec("kernels", search)
        if spec is None:  # installed through another meta-path finder (an editable install, say)
            for finder in sys.meta_path:
                if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
                    continue
                found = finder.find_spec("kernels", None)
                if found is not None and found.origin != __file__:
                    spec = found
                    break
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                "No module named 'kernels' (Hugging Face's kernel-hub package, `pip install kernels`; the "
                f"folder {os.path.dirname(os.path.abspath(__file__))} holds desmoe's Triton kernels, imported as "
                "desmoe.kernels)",
                name="kernels",
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # its own `from kernels.x import ...` must find it, not this file
        spec.loader.exec_module(module)

    _hand_over_to_hugging_face_kernels()
    del _hand_over_to_hugging_face_kernels
