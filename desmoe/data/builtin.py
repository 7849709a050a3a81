"""The built-in offline domains, assembled at run time from what is installed on this machine.

Each domain is a list of ``(split_key, text)`` documents built from local files (never copied into the repo);
``split_key`` is machine-independent (a path relative to its source root, or a problem/message id) and
:func:`~desmoe.data._util.split_of` hashes it into train (~80%) / validation (~10%) / test (~10%). Identical texts
are kept once, so the three splits never share a document. Parsed corpora are cached under
``~/.cache/desmoe/corpora`` keyed by a hash of the source file list (paths, sizes, mtimes), so a second load takes
well under a second; an experiment pins them (:mod:`desmoe.data.corpus_cache`).

Sources (disjoint between domains):
- math: generated problems (:mod:`desmoe.data.mathgen`).
- code: Python standard-library ``.py`` files, cut into top-level function/class chunks.
- translation: Django's ``.po`` catalogues (fr, de, es, it, pt, nl): ``English: ...\\n<Language>: ...``.
- law: ``/usr/share/common-licenses/*``, ``/usr/share/doc/*/copyright``, installed packages' licence files.
- summary: man pages of sections 1, 6, 8: DESCRIPTION -> the one-line NAME summary (and, when those are scarce,
  stdlib module docstrings: first paragraph -> first line).
- general: English prose from man pages of sections 2-5, 7, installed packages' long descriptions (METADATA),
  ``/usr/share/doc/*/README*`` and the Python language reference topics shipped in the stdlib
  (``pydoc_data.topics``, so the domain exists even where man pages are stripped).
"""
from __future__ import annotations

import ast
import glob
import gzip
import importlib.metadata
import importlib.util
import os
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import Callable

from ..progress import bar
from ._util import check_split, seeded_subset, split_of, stable_hash
from .corpus_cache import PIN_ENV, cached_docs  # noqa: F401  (PIN_ENV re-exported: desmoe.data.builtin.PIN_ENV)
from .mathgen import format_math, math_problems
from .roff import parse_man, read_man


class DataSourceError(FileNotFoundError):
    """A data source (built-in domain's files, a local file, a hub dataset) is missing or unusable.

    The message names the domain or file, what is missing, and how to fix it.
    """


DOMAINS = ("math", "code", "translation", "law", "summary", "general")

MAN_ROOT = "/usr/share/man"
DOC_ROOT = "/usr/share/doc"
LICENSE_ROOT = "/usr/share/common-licenses"
MATH_DOCS = {"train": 10000, "validation": 1000, "test": 1000}
MIN_DOCS = 50  # fewer than this many documents in a domain is a broken source, not a corpus
MAX_DOC_CHARS = 2000  # longer texts are cut into chunks of about this size
MAX_FILES = 2500  # per source group, taken in a hash order (a stable, spread-out sample)
PER_PREFIX = 8  # at most this many man pages per command family (gcloud ships 16k pages)
_TRANSLATION_LANGS = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
                      "nl": "Dutch"}

Doc = tuple  # (split_key, text)


# ----------------------------------------------------------------------------------------------- helpers
def _chunks(text: str, max_chars: int = MAX_DOC_CHARS, min_chars: int = 200, unwrap: bool = False) -> list[str]:
    """Greedy paragraph packing into chunks of <= max_chars; an over-long paragraph is cut at whitespace.

    ``unwrap`` joins hard-wrapped lines of a paragraph (prose); otherwise line breaks are kept (licences).
    """
    paras = [re.sub(r"[ \t]+", " ", re.sub(r"\s*\n\s*", " " if unwrap else "\n", p)).strip()
             for p in re.split(r"\n\s*\n", text)]
    out, cur = [], ""
    for p in paras:
        if not p:
            continue
        while len(p) > max_chars:
            cut = p.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(p[:cut].strip())
            p = p[cut:].strip()
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= min_chars]


def _is_sentence_para(p: str) -> bool:
    return not p.lstrip().startswith("-") and len(p.split()) >= 6 and p.rstrip().endswith((".", ":", ")"))


_WORD_RE = re.compile(r"[\"'(\[]?[A-Za-z][a-z'-]*[.,;:!?)\]\"']*")


def _wordy(text: str, frac: float) -> bool:
    """True when at least ``frac`` of the whitespace-separated tokens are plain words (not paths, code, tables)."""
    words = text.split()
    return bool(words) and sum(bool(_WORD_RE.fullmatch(w)) for w in words) >= frac * len(words)


def _is_prose(text: str) -> bool:
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return letters >= 0.8 * len(text) and len(text.split()) >= 30 and _wordy(text, 0.6)


def _hash_order(items: list[tuple[str, str]], limit: int = MAX_FILES) -> list[tuple[str, str]]:
    """``(key, path)`` pairs sorted by a stable hash of the key, the first ``limit`` of them."""
    return sorted(items, key=lambda kp: stable_hash("order", kp[0]))[:limit]


def _man_files(sections: tuple[str, ...]) -> list[tuple[str, str]]:
    files = []
    for sec in sections:
        d = os.path.join(MAN_ROOT, f"man{sec}")
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        per_prefix: dict[str, int] = {}
        for e in entries:
            if e.is_symlink() or not e.is_file():
                continue  # symlinks are aliases of another page
            prefix = re.split(r"[-_.]", e.name, maxsplit=1)[0]
            if per_prefix.get(prefix, 0) >= PER_PREFIX:
                continue
            per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
            files.append((f"man/man{sec}/{e.name}", e.path))
    return _hash_order(files)


def _dist_files(pattern: str) -> list[tuple[str, str]]:
    """Files matching ``pattern`` inside installed distributions' ``*.dist-info`` dirs, keyed by dist name."""
    files = []
    seen = set()
    for dist in importlib.metadata.distributions():
        path = getattr(dist, "_path", None)
        if path is None or not str(path).endswith(".dist-info"):
            continue
        name = (dist.metadata.get("Name") or Path(path).name).lower()
        if name in seen:
            continue
        seen.add(name)
        for f in sorted(glob.glob(os.path.join(str(path), pattern), recursive=True)):
            if os.path.isfile(f):
                files.append((f"dist/{name}/{os.path.relpath(f, path)}", f))
    return files


def _read_text(path: str, limit: int = 300_000) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _dedupe(docs: list[Doc]) -> list[Doc]:
    seen, out = set(), []
    for key, text in docs:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append((key, text))
    return out


def _need(domain: str, docs: list[Doc], where: str, fix: str) -> list[Doc]:
    if len(docs) < MIN_DOCS:
        raise DataSourceError(
            f"built-in domain {domain!r}: found only {len(docs)} documents (need >= {MIN_DOCS}) in {where}. {fix}")
    return docs


# ----------------------------------------------------------------------------------------------- domains
def _pydoc_topics() -> tuple[str, dict[str, str]]:
    """Python's language-reference topics (``pydoc_data.topics``, shipped with the stdlib): path and texts."""
    try:
        from pydoc_data import topics
    except ImportError:
        return "", {}
    return topics.__file__, dict(topics.topics)


def _general_docs() -> list[Doc]:
    man = _man_files(("2", "3", "4", "5", "7"))
    topics_path, topics = _pydoc_topics()
    meta = _hash_order(_dist_files("METADATA"))
    readmes = _hash_order([(f"doc/{os.path.relpath(p, DOC_ROOT)}", p)
                           for p in glob.glob(os.path.join(DOC_ROOT, "*", "README*")) if os.path.isfile(p)])
    files = man + meta + readmes + [("pydoc_data/topics", topics_path)]

    def build() -> list[Doc]:
        docs: list[Doc] = []
        for name in sorted(topics):
            docs += [(f"pydoc/{name}", c) for c in _chunks(topics[name], unwrap=True) if _is_prose(c)]
        for key, path in bar(man, "general: man pages", unit="file"):
            try:
                sections = parse_man(read_man(path))
            except (OSError, EOFError, ValueError):
                continue
            body = "\n\n".join(v for k, v in sections.items() if k not in ("NAME", "SYNOPSIS", "SEE ALSO"))
            docs += [(key, c) for c in _chunks(body, unwrap=True) if _is_prose(c)]
        for key, path in bar(meta + readmes, "general: package docs", unit="file"):
            try:
                text = _read_text(path)
            except (OSError, EOFError):
                continue
            if key.endswith("/METADATA"):  # e-mail style headers, a blank line, then the long description
                text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
            docs += [(key, c) for c in _chunks(text, unwrap=True) if _is_prose(c)]
        return _dedupe(docs)

    return _need("general", cached_docs("general", files, build),
                 f"{MAN_ROOT}/man{{2,3,4,5,7}}, installed *.dist-info/METADATA, {DOC_ROOT}/*/README* and "
                 "the stdlib's pydoc_data.topics",
                 "Install man pages (apt-get install man-db manpages) or pass source= a local text dataset.")


def _summary_docs() -> list[Doc]:
    man = _man_files(("1", "6", "8"))

    def build() -> list[Doc]:
        docs: list[Doc] = []
        for key, path in bar(man, "summary: man pages", unit="file"):
            try:
                sections = parse_man(read_man(path))
            except (OSError, EOFError, ValueError):
                continue
            name, desc = sections.get("NAME", ""), sections.get("DESCRIPTION", "")
            m = re.search(r"\s[-\u2013\u2014]+\s+(.+)", name)
            if not m or len(desc) < 80:
                continue
            summary = m.group(1).strip().rstrip(".")
            paras = [p for p in desc.split("\n\n") if _is_sentence_para(p)][:3]  # prose, not option lists
            desc = _chunks("\n\n".join(paras), 800, min_chars=0)[0] if paras else ""
            if len(desc) < 80:
                continue
            docs.append((key, f"Description: {desc}\nSummary: {summary}"))
        if len(docs) < 300:  # man pages scarce (containers strip them): add stdlib module docstrings
            docs += _docstring_summaries()
        return _dedupe(docs)

    return _need("summary", cached_docs("summary", man, build),
                 f"{MAN_ROOT}/man{{1,6,8}} and the Python standard library's module docstrings",
                 "Install man pages (apt-get install man-db manpages) or pass source= a local summarisation dataset.")


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages|lib2to3|__pycache__|turtledemo|"
                      r"ensurepip|pydoc_data)(/|$)")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if skip.search(rel_dir.replace(os.sep, "/")):
            dirnames[:] = []
            continue
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_dir, fn)).replace(os.sep, "/")
                files.append((f"stdlib/{rel}", os.path.join(dirpath, fn)))
    return files


def _docstring_summaries() -> list[Doc]:
    docs = []
    for key, path in _hash_order(_stdlib_files(), 1500):
        try:
            doc = ast.get_docstring(ast.parse(_read_text(path)))
        except (SyntaxError, ValueError, OSError):
            continue
        if not doc:
            continue
        paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
        if len(paras) < 2:
            continue
        first = paras[0].splitlines()[0].strip().rstrip(".")
        body = " ".join(" ".join(paras[1:4]).split())[: MAX_DOC_CHARS - 200]
        if len(first) > 10 and len(body) > 80:
            docs.append((f"docstring/{key}", f"Description: {body}\nSummary: {first}"))
    return docs


def _code_chunks(source: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Top-level functions/classes of a module; big classes are cut into header + methods."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()

    def seg(node: ast.AST) -> str:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(lines[start - 1: node.end_lineno])

    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        text = seg(node)
        if len(text) <= max_chars or not isinstance(node, ast.ClassDef):
            out.append(text[:max_chars])
            continue
        methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        head_end = min([methods[0].lineno] + [d.lineno for d in methods[0].decorator_list]) - 1 if methods \
            else node.end_lineno
        out.append("\n".join(lines[node.lineno - 1: head_end]).rstrip()[:max_chars])
        out += [textwrap.dedent(seg(m))[:max_chars] for m in methods]
    return [c for c in out if len(c) >= 80]


def _code_docs() -> list[Doc]:
    files = _hash_order(_stdlib_files(), 500)

    def build() -> list[Doc]:
        docs = []
        for key, path in bar(files, "code: stdlib modules", unit="file"):
            try:
                docs += [(key, c) for c in _code_chunks(_read_text(path, 2_000_000))]
            except OSError:
                continue
        return _dedupe(docs)

    return _need("code", cached_docs("code", files, build),
                 f"the Python standard library ({sysconfig.get_paths()['stdlib']})",
                 "The stdlib sources (.py files) must be installed alongside Python.")


def _po_entries(text: str) -> list[tuple[str, str, str]]:
    """``(msgctxt, msgid, msgstr)`` of a .po file; skips the header, fuzzy and untranslated entries."""
    entries = []
    cur: dict[str, str] = {}
    field = None
    fuzzy = False

    def finish() -> None:
        nonlocal fuzzy
        mid, mstr = cur.get("msgid", ""), cur.get("msgstr", cur.get("msgstr[0]", ""))
        if mid and mstr and not fuzzy:
            entries.append((cur.get("msgctxt", ""), mid, mstr))
        cur.clear()
        fuzzy = False

    def unq(s: str) -> str:
        s = s.strip()
        if len(s) >= 2 and s[0] == s[-1] == '"':
            s = s[1:-1]
        return s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")

    for line in text.splitlines():
        line = line.strip()
        if not line:
            if cur:
                finish()
            field = None
            continue
        if line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        if line.startswith("#"):
            continue
        if line.startswith('"') and field:
            cur[field] = cur.get(field, "") + unq(line)
            continue
        name, _, rest = line.partition(" ")
        if name in ("msgctxt", "msgid") and "msgstr" in cur:
            fz = fuzzy
            finish()
            fuzzy = fz
        field = name
        cur[field] = unq(rest)
    if cur:
        finish()
    return entries


def _translation_docs() -> list[Doc]:
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("built-in domain 'translation' needs Django's .po catalogues, but Django is not "
                              "installed: run `pip install django` (or pass source= a local/hub translation dataset)")
    root = list(spec.submodule_search_locations)[0]
    files = []
    for p in sorted(glob.glob(os.path.join(root, "**", "locale", "*", "LC_MESSAGES", "*.po"), recursive=True)):
        if Path(p).parent.parent.name in _TRANSLATION_LANGS:
            files.append((f"django/{os.path.relpath(p, root)}".replace(os.sep, "/"), p))

    def build() -> list[Doc]:
        docs = []
        for key, path in files:
            lang = _TRANSLATION_LANGS[key.split("/locale/")[1].split("/")[0]]
            try:
                entries = _po_entries(_read_text(path, 5_000_000))
            except OSError:
                continue
            for ctx, mid, mstr in entries:
                if "%(" in mid and len(mid) < 4:
                    continue
                # split key = the English message: all its translations land in the same split (no leakage)
                docs.append((f"msgid/{ctx}/{mid}", f"English: {mid}\n{lang}: {mstr}"))
        return _dedupe(docs)

    return _need("translation", cached_docs("translation", files, build), f"Django's locale dirs under {root}",
                 "Reinstall Django with its locale files (`pip install --force-reinstall django`).")


def _law_docs() -> list[Doc]:
    common = [(f"common-licenses/{os.path.basename(p)}", p) for p in sorted(glob.glob(os.path.join(LICENSE_ROOT, "*")))
              if os.path.isfile(p)]
    copyright_files = _hash_order([(f"doc/{os.path.relpath(p, DOC_ROOT)}", p)
                                   for p in glob.glob(os.path.join(DOC_ROOT, "*", "copyright")) if os.path.isfile(p)])
    dist = _dist_files("LICEN[CS]E*") + _dist_files("licenses/**/*") + _dist_files("COPYING*")
    files = common + copyright_files + _hash_order(dist)

    def build() -> list[Doc]:
        docs = []
        for key, path in files:
            try:
                text = _read_text(path)
            except (OSError, EOFError):
                continue
            if key.endswith("/copyright"):  # Debian copyright format: " ." lines are paragraph breaks
                text = re.sub(r"(?m)^ \.$", "", text)
                text = re.sub(r"(?m)^ ", "", text)
                text = re.sub(r"(?m)^(Files|License|Copyright|Upstream-\w+|Source|Format|Comment):", r"\n\1:", text)
            docs += [(key, c) for c in _chunks(text) if _wordy(c, 0.5)]
        return _dedupe(docs)

    return _need("law", cached_docs("law", files, build),
                 f"{LICENSE_ROOT}, {DOC_ROOT}/*/copyright and installed *.dist-info licence files",
                 "Install the base-files/licence packages or pass source= a local legal-text dataset.")


_BUILDERS: dict[str, Callable[[], list[Doc]]] = {
    "code": _code_docs, "translation": _translation_docs, "law": _law_docs, "summary": _summary_docs,
    "general": _general_docs,
}


def builtin_docs(domain: str) -> list[Doc]:
    """All ``(split_key, text)`` documents of a built-in domain other than math (every split)."""
    if domain not in _BUILDERS:
        raise ValueError(f"domain must be one of {DOMAINS} for the built-in sources, got {domain!r}")
    return _BUILDERS[domain]()


def load_builtin(domain: str, split: str, max_docs: int | None, seed: int) -> list[str]:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS} (or pass source=...), got {domain!r}")
    check_split(split)
    if domain == "math":
        n = MATH_DOCS[split] if max_docs is None else max_docs
        return [format_math(q, a) for q, a in math_problems(n, split, seed)]
    texts = [text for key, text in builtin_docs(domain) if split_of(key) == split]
    return seeded_subset(texts, max_docs, seed, domain, split)
