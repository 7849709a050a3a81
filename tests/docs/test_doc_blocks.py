"""Every fenced code block in README.md and docs/*.md is executed or checked here.

A block carries a marker comment on the line before it, ``<!-- doc-test: MODE [options] -->``:

- ``run``: executed as written (python in a fresh process, in a temporary directory), after the marker's
  ``replace="A"->"B"`` substitutions (smaller sizes on CPU; ``{tiny_model_dir}`` is a saved tiny Qwen3-MoE with
  its tokenizer);
- ``recipe``: the README's fine-tuning recipe, every line run on CPU with a tiny model (see :func:`test_recipe`);
- ``cli``: long-running or GPU commands: every ``desmoe ...`` line (and ``-m desmoe.train`` under ``torchrun``) is
  parsed by desmoe's own argument parser, so each subcommand and flag exists; other lines get ``bash -n``;
- ``install``: pip lines: ``bash -n``, the extras named exist in ``pyproject.toml``, and the README's test line is
  the one ``.ci/run`` runs;
- ``paths``: a file tree: every path it lists exists;
- ``output``: a sample of program output or a diagram (not code);
- ``tests/...::test_name``: the block is executed by that test (which reads it from the page).

An unmarked block fails the suite, so a new snippet must say how it is tested.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<marker>.*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)


def blocks():
    out = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for i, m in enumerate(_BLOCK.finditer(text)):
            line = text[:m.start()].count("\n") + 1
            out.append(pytest.param(page, m.group("marker"), m.group("lang"), m.group("body"),
                                    id=f"{page}:{line}"))
    return out


BLOCKS = blocks()


def test_every_page_has_its_blocks_found():
    assert len(BLOCKS) >= 15
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.count("\n```") // 2 <= sum(1 for b in BLOCKS if b.values[0] == "README.md") + 1


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE (safetensors) with a byte-level BPE tokenizer: what a user's model folder holds."""
    from desmoe.data import train_tokenizer
    from desmoe.integrations.tiny import tiny_model

    d = tmp_path_factory.mktemp("model") / "tiny-moe"
    texts = [f"Question: what is {i} plus {i}? Answer: {2 * i}. def f{i}(x): return x + {i}" for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_model("qwen3_moe", vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=128)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _options(marker: str) -> tuple[str, list[tuple[str, str]]]:
    mode = marker.split()[0]
    reps = re.findall(r'replace="(.*?)"->"(.*?)"', marker)
    return mode, reps


def _cli_lines(body: str) -> list[str]:
    """Logical command lines of a shell block, without comments and ``[...]`` usage brackets."""
    out = []
    for raw in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        line = re.sub(r"\[[^\]]*\]", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _parse_desmoe(argv: list[str]):
    from desmoe.cli import _parser

    try:
        return _parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"desmoe {' '.join(argv)}: not a valid command line (argparse exit {e.code})") from None


@pytest.mark.parametrize("page,marker,lang,body", BLOCKS)
def test_doc_block(page, marker, lang, body, tmp_path, request):
    assert marker, f"{page}: a ```{lang} block without a <!-- doc-test: ... --> marker saying how it is tested"
    mode, reps = _options(marker)
    if mode == "output":
        assert lang in ("", "text"), "output blocks are plain text"
        return
    if mode == "paths":
        for line in body.splitlines():
            for tok in re.findall(r"(?<![\w/.])((?:desmoe|kernels|csrc|tests|benchmarks)/[\w./]*)", line):
                tok = tok.rstrip(".")
                assert os.path.exists(os.path.join(ROOT, tok)) or os.path.exists(os.path.join(ROOT, tok + ".py")), \
                    f"{page}: {tok} does not exist"
        return
    if mode.startswith("tests/"):
        path, _, name = mode.partition("::")
        src = open(os.path.join(ROOT, path)).read()
        assert f"def {name}(" in src, f"{mode} does not exist"
        assert os.path.basename(page) in src, f"{mode} does not read {page}"
        return
    if mode in ("cli", "install"):
        r = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr
        for line in _cli_lines(body):
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if not words:
                    continue
                if words[0] == "desmoe":
                    _parse_desmoe(words[1:])
                elif words[0] == "torchrun":
                    i = words.index("desmoe.train")
                    _parse_desmoe(["train", *words[i + 1:]])
                elif words[:2] == ["python", "-m"] and words[2].startswith(("desmoe", "benchmarks")):
                    mod = words[2]
                    assert os.path.isfile(os.path.join(ROOT, *mod.split("."))+ ".py") or \
                        os.path.isdir(os.path.join(ROOT, *mod.split("."))), f"{mod} is not a module of the checkout"
                elif words[0] == "pip":
                    extras = re.findall(r"\.\[([\w,]+)\]", part)
                    py = open(os.path.join(ROOT, "pyproject.toml")).read()
                    for e in (x for ex in extras for x in ex.split(",")):
                        assert re.search(rf"^{e}\s*=", py, re.M), f"extra {e!r} not in pyproject.toml"
        if mode == "install" and "pytest" in body:
            ci = open(os.path.join(ROOT, ".ci", "run")).read()
            assert body.strip() in ci or re.search(r'TEST_CMD=.*' + re.escape("pytest -m"), ci)
        return
    if mode == "run":
        code = body
        for a, b in reps:
            b = b.replace("{tiny_model_dir}", request.getfixturevalue("tiny_model_dir") if "{tiny_model_dir}" in b
                          else "")
            assert a in code, f"{page}: the marker replaces {a!r}, which the block does not contain"
            code = code.replace(a, b)
        assert lang == "python", f"run blocks are python, got {lang!r}"
        if "my_contracts.jsonl" in code:
            import json

            with open(tmp_path / "my_contracts.jsonl", "w") as f:
                for i in range(40):
                    f.write(json.dumps({"body": f"Clause {i}: the licensee shall not sublicense the work. " * 3})
                            + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{page} block failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
        return
    if mode == "recipe":
        return  # test_recipe below
    raise AssertionError(f"{page}: unknown doc-test mode {mode!r}")


def _recipe_block() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- doc-test: recipe -->\n```bash\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no recipe block"
    return m.group(1)


def test_recipe_is_short():
    assert len(_recipe_block().splitlines()) <= 20


def test_recipe(tmp_path, tiny_model_dir):
    """The README's "fine-tune your own MoE on a GPU" recipe, line by line, on CPU with a tiny model: the same
    commands, with the model folder, sizes, steps and device shrunk (the substitutions below); the pip line is
    checked (the package is already installed here)."""
    import json

    body = _recipe_block()
    lines = body.splitlines()
    assert lines[0].startswith("pip install") and "-e ." in lines[0]
    subs = [(re.search(r"^MODEL=(\S+)", body, re.M).group(1), tiny_model_dir), ("seq_len: 2048", "seq_len: 32"),
            ("batch_size: 8", "batch_size: 2"), ("max_steps: 1000", "max_steps: 2"),
            ("save_every: 100", "save_every: 1"),
            ("device: cuda", "device: cpu")]
    script = "\n".join(lines[1:])
    for a, b in subs:
        assert a in script, f"the recipe no longer contains {a!r}: update this test"
        script = script.replace(a, b)
    for d in ("math", "code"):
        (tmp_path / "data").mkdir(exist_ok=True)
        with open(tmp_path / "data" / f"{d}.jsonl", "w") as f:
            for i in range(40):
                q, a = ((f"What is {i} + {i}?", str(2 * i)) if d == "math"
                        else (f"Write f{i}.", f"def f{i}(): return {i}"))
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = os.path.dirname(sys.executable)
    env["PATH"] = exe + os.pathsep + env.get("PATH", "")
    script = textwrap.dedent(f"""
        set -euo pipefail
        desmoe() {{ {shlex.quote(sys.executable)} -m desmoe "$@"; }}
        {script}
    """)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (f"recipe failed:\n{script}\n--- stdout ---\n{r.stdout[-3000:]}\n"
                               f"--- stderr ---\n{r.stderr[-4000:]}")
    assert json.load(open(tmp_path / "runs" / "my" / "eval.json"))["domains"]
    assert os.path.isfile(tmp_path / "my-moe" / "config.json")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "my-moe")  # stock transformers loads the export
