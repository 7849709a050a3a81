"""desmoe.data sources: built-in offline domains, local files, hub names, math problems."""
import itertools
import json
import random
import re
import sys
import types

import pytest

from desmoe.data import (DOMAINS, DataSourceError, extract_answer, format_math, load_domain_texts,
                         math_problems)
from desmoe.data import builtin, mathgen
from desmoe.data._util import SPLITS, split_of, stable_hash

_HAS_DJANGO = __import__("importlib.util").util.find_spec("django") is not None


# ----------------------------------------------------------------------------------------------- math
def _solve(q: str) -> int:
    """Independent oracle: recompute a generated problem's answer from its text."""
    n = [int(x) for x in re.findall(r"\d+", q)]
    if q.startswith("What is the remainder"):
        return n[0] % n[1]
    if "% of" in q:
        assert n[0] * n[1] % 100 == 0
        return n[0] * n[1] // 100
    if q.startswith("What is"):
        expr = q[len("What is "):-1]
        if " / " in expr:
            assert n[0] % n[1] == 0, q
            return n[0] // n[1]
        assert re.fullmatch(r"[\d +\-*()]+", expr), q
        return eval(expr)  # only digits and + - * ( ) reach here
    if "more" in q:
        return n[0] + n[1]
    if q.startswith("A box holds"):
        return n[0] * n[1]
    if "gave away" in q:
        return n[0] - n[1]
    if "shared equally" in q:
        assert n[0] % n[1] == 0
        return n[0] // n[1]
    raise AssertionError(f"unknown problem form: {q}")


def test_math_answers_exact_and_splits_disjoint():
    train = math_problems(3000, "train", seed=0)
    test = math_problems(400, "test", seed=0)
    assert len(train) == 3000 and len(test) == 400
    for q, a in train[:1500] + test:
        assert a == str(_solve(q)), q
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert not {q for q, _ in math_problems(500, "train", seed=7)} & {q for q, _ in test}  # any seed
    assert len({q for q, _ in train}) == len(train)
    assert math_problems(50, "train", seed=0) == train[:50]  # deterministic
    assert math_problems(50, "train", seed=1) != train[:50]
    forms = {re.sub(r"\d+", "N", q)[:14] for q, _ in train}
    assert len(forms) >= 8  # a real mix of problem kinds


def test_format_math_prompt_and_answer():
    q, a = "What is 2 + 3?", "5"
    prompt, full = format_math(q), format_math(q, a)
    assert full.startswith(prompt) and not prompt.endswith(" ")
    assert extract_answer(full[len(prompt):] + "Question: next") == a
    with pytest.raises(TypeError, match="question"):
        format_math(3)
    with pytest.raises(ValueError, match="n must"):
        math_problems(-1)


# ----------------------------------------------------------------------------------------------- builtin
def _old_test_rule(key) -> bool:
    """The test split as it was with two splits: hash bucket 0 of 10 (it must not move)."""
    return stable_hash("desmoe-split", key) % 10 == 0


@pytest.mark.parametrize("domain", DOMAINS)
def test_builtin_domain_three_splits_disjoint_deterministic(domain):
    if domain == "translation" and not _HAS_DJANGO:
        pytest.skip("django not installed (the translation domain's source)")
    train = load_domain_texts(domain, "train", max_docs=400)
    val = load_domain_texts(domain, "validation", max_docs=200)
    test = load_domain_texts(domain, "test", max_docs=200)
    assert len(train) == 400 and len(val) >= 20 and len(test) >= 20
    assert all(isinstance(t, str) and t.strip() for t in train + val + test)
    full = {s: load_domain_texts(domain, s, max_docs=1500 if domain == "math" else None) for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(full[a]) & set(full[b]), (a, b)
    n = sum(map(len, full.values()))
    if domain != "math":  # math draws a fixed number per split
        assert 0.04 < len(full["test"]) / n < 0.2 and 0.04 < len(full["validation"]) / n < 0.2  # ~10% each
        # test is exactly the old rule's (bucket 0), validation bucket 1
        docs = builtin.builtin_docs(domain)
        assert full["test"] == [t for k, t in docs if _old_test_rule(k)]
        assert full["validation"] == [t for k, t in docs if stable_hash("desmoe-split", k) % 10 == 1]
    else:
        assert all(_old_test_rule(q) for q, _ in math_problems(200, "test"))
    for s, got in (("train", train), ("validation", val), ("test", test)):
        assert load_domain_texts(domain, s, max_docs=len(got)) == got  # deterministic
        assert set(got) <= set(full[s]) or domain == "math"
    assert load_domain_texts(domain, "train", max_docs=400, seed=1) != train  # the seed picks the subset
    assert max(len(t) for t in full["train"]) <= 2100  # long files are chunked


def test_math_test_split_unchanged_by_validation():
    """The generator's test problems are those of the two-split rule (test = bucket 0), draw for draw."""
    def old(n, seed):
        out, i, seen = [], 0, set()
        while len(out) < n:
            q, a = mathgen._problem(random.Random(stable_hash("math", seed, i)))
            i += 1
            if q not in seen and _old_test_rule(q):
                seen.add(q)
                out.append((q, a))
        return out

    assert math_problems(300, "test", seed=3) == old(300, 3)
    val = math_problems(300, "validation", seed=3)
    assert all(stable_hash("desmoe-split", q) % 10 == 1 for q, _ in val)
    assert len(load_domain_texts("math", "validation")) == builtin.MATH_DOCS["validation"]


def test_split_of_buckets():
    keys = [f"k{i}" for i in range(3000)]
    got = {k: split_of(k) for k in keys}
    assert all((got[k] == "test") == _old_test_rule(k) for k in keys)
    assert all((got[k] == "validation") == (stable_hash("desmoe-split", k) % 10 == 1) for k in keys)
    share = {s: sum(v == s for v in got.values()) / len(keys) for s in SPLITS}
    assert 0.07 < share["test"] < 0.13 and 0.07 < share["validation"] < 0.13


def test_builtin_domain_formats():
    assert load_domain_texts("math", max_docs=1)[0].startswith("Question: ")
    assert all(t.startswith("Description: ") and "\nSummary: " in t
               for t in load_domain_texts("summary", max_docs=50))
    code = load_domain_texts("code", max_docs=200)
    assert sum(t.startswith(("def ", "class ", "async def ", "@")) for t in code) > 150
    law = " ".join(load_domain_texts("law", max_docs=300)).lower()
    assert "licen" in law and "copyright" in law


def test_builtin_domains_disjoint_texts():
    texts = {d: set(load_domain_texts(d, max_docs=2000)) for d in ("code", "law", "summary", "general")}
    for a in texts:
        for b in texts:
            if a < b:
                assert not texts[a] & texts[b], (a, b)


def test_translation_without_django_says_pip_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataSourceError, match="pip install django"):
        load_domain_texts("translation")


@pytest.mark.skipif(not _HAS_DJANGO, reason="django not installed")
def test_translation_pairs():
    docs = load_domain_texts("translation", max_docs=300)
    assert all(re.match(r"English: .+\n(French|German|Spanish|Italian|Portuguese|Dutch): .+", d, re.S) for d in docs)


def test_po_parser(tmp_path):
    po = tmp_path / "x.po"
    po.write_text('msgid ""\nmsgstr "Content-Type: text/plain\\n"\n\n#, fuzzy\nmsgid "skip"\nmsgstr "no"\n\n'
                  'msgctxt "c"\nmsgid "Hello "\n"world"\nmsgstr "Bonjour "\n"le monde"\n\nmsgid "untranslated"\n'
                  'msgstr ""\n\nmsgid "one"\nmsgid_plural "many"\nmsgstr[0] "un"\nmsgstr[1] "plusieurs"\n')
    assert builtin._po_entries(po.read_text()) == [("c", "Hello world", "Bonjour le monde"), ("", "one", "un")]


def test_missing_builtin_sources_raise_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("DESMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "MAN_ROOT", str(tmp_path / "no-man"))
    monkeypatch.setattr(builtin, "DOC_ROOT", str(tmp_path / "no-doc"))
    monkeypatch.setattr(builtin, "LICENSE_ROOT", str(tmp_path / "no-lic"))
    monkeypatch.setattr(builtin, "_dist_files", lambda pattern: [])
    general = load_domain_texts("general")  # the stdlib's pydoc topics alone still make a corpus
    assert len(general) >= 50 and any("statement" in t for t in general)
    monkeypatch.setattr(builtin, "_pydoc_topics", lambda: ("", {}))
    with pytest.raises(DataSourceError, match=r"'general'.*no-man"):
        load_domain_texts("general")
    with pytest.raises(DataSourceError, match=r"'law'.*no-lic"):
        load_domain_texts("law")
    # summary falls back to stdlib module docstrings when man pages are missing
    docs = load_domain_texts("summary")
    assert len(docs) >= 50 and all("\nSummary: " in d for d in docs)


def test_bad_domain_and_split():
    with pytest.raises(ValueError, match="'poetry'"):
        load_domain_texts("poetry")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation', 'test'\), got 'dev'"):
        load_domain_texts("math", "dev")
    with pytest.raises(ValueError, match="max_docs"):
        load_domain_texts("math", max_docs=-2)


# ----------------------------------------------------------------------------------------------- local files
def _all_splits(domain, path, **kw):
    """All texts of a source over its three splits, checking they are disjoint."""
    got = [load_domain_texts(domain, s, source=str(path), **kw) for s in SPLITS]
    for a, b in itertools.combinations(got, 2):
        assert not set(a) & set(b)
    return [t for g in got for t in g]


def test_local_jsonl_text_field_and_formatters(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"passage": f"doc {i}", "id": i}) for i in range(100)) + "\n")
    assert sorted(_all_splits("general", p, text_field="passage")) == sorted(f"doc {i}" for i in range(100))
    with pytest.raises(DataSourceError, match=r"d\.jsonl.*'text'.*text_field"):
        load_domain_texts("general", source=str(p))

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(50)))
    assert format_math("What is 3 + 1?", "4") in _all_splits("math", qa)
    po = tmp_path / "po.jsonl"
    po.write_text(json.dumps({"msgid": "Save", "msgstr": "Enregistrer", "lang": "fr"}))
    assert _all_splits("translation", po) == ["English: Save\nFrench: Enregistrer"]
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "def f():\n", "completion": "    return 1\n"}) + "\n"
                  + json.dumps({"translation": {"en": "Hi", "de": "Hallo"}}))
    assert sorted(_all_splits("code", pc)) == ["English: Hi\nGerman: Hallo", "def f():\n    return 1\n"]


def test_local_json_parquet_txt_and_dir_splits(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": f"json {i}"} for i in range(30)]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"text": "wrapped"}]}))
    assert len(_all_splits("general", tmp_path / "a.json")) == 30
    assert _all_splits("general", tmp_path / "b.json") == ["wrapped"]

    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\n\nsecond paragraph\n")
    assert sorted(_all_splits("general", tmp_path / "c.txt")) == ["first paragraph\nstill first", "second paragraph"]

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"content": [f"pq {i}" for i in range(20)]}), tmp_path / "d.parquet")
    assert len(_all_splits("code", tmp_path / "d.parquet", text_field="content")) == 20

    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"text": f"tr {i}"}) for i in range(20)))
    (d / "test.jsonl").write_text(json.dumps({"text": "te 0"}))
    train = [f"tr {i}" for i in range(20)]
    assert any(split_of(t) == "validation" for t in train)
    assert load_domain_texts("general", "test", source=str(d)) == ["te 0"]
    # no validation file: validation = the train texts of hash bucket 1, train = the rest
    assert load_domain_texts("general", "validation", source=str(d)) == [t for t in train
                                                                        if split_of(t) == "validation"]
    assert load_domain_texts("general", "train", source=str(d)) == [t for t in train if split_of(t) != "validation"]
    (d / "dev.jsonl").write_text(json.dumps({"text": "dev 0"}))  # its own validation split: used as is
    assert load_domain_texts("general", "validation", source=str(d)) == ["dev 0"]
    assert load_domain_texts("general", "train", source=str(d)) == train
    (d / "test.jsonl").unlink()  # train + dev only: dev is what is reported (test), validation comes from train
    assert load_domain_texts("general", "test", source=str(d)) == ["dev 0"]
    assert load_domain_texts("general", "validation", source=str(d)) == [t for t in train
                                                                        if split_of(t) == "validation"]
    assert load_domain_texts("general", "train", source=str(d), max_docs=2) == \
        load_domain_texts("general", "train", source=str(d), max_docs=2)


def test_missing_or_bad_local_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataSourceError, match="nope.jsonl"):
        load_domain_texts("math", source=str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n{oops\n')
    with pytest.raises(DataSourceError, match="line 2"):
        load_domain_texts("general", source=str(bad))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataSourceError, match="unsupported"):
        load_domain_texts("general", source=str(tmp_path / "x.csv"))
    assert issubclass(DataSourceError, FileNotFoundError)


def test_hub_dataset_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config=None):
        calls.append((name, config))
        if name == "offline/none":
            raise ConnectionError("no network")
        return {"train": [{"question": f"q{i}", "answer": str(i)} for i in range(40)],
                "validation": [{"question": "qv", "answer": "1"}]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("desmoe.data.sources.check_hub_name", lambda *a, **k: None)  # the hub is "reachable"
    # train + validation, no test: validation is reported (test); validation is hashed out of train
    assert load_domain_texts("math", "test", source="org/gsm:main") == [format_math("qv", "1")]
    train = _all_splits("math", "org/gsm")
    assert len(train) == 41 and format_math("qv", "1") in train
    val = load_domain_texts("math", "validation", source="org/gsm")
    assert val == [format_math(f"q{i}", str(i)) for i in range(40) if split_of(format_math(f"q{i}", str(i)))
                   == "validation"] and val
    assert calls[0] == ("org/gsm", "main")
    with pytest.raises(DataSourceError, match=r"offline/none.*no network"):
        load_domain_texts("math", source="offline/none")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataSourceError, match="pip install datasets"):
        load_domain_texts("math", source="org/gsm")


def test_saved_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(6)]}),
                                "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    dsd.save_to_disk(str(tmp_path / "saved"))
    train = [f"t{i}" for i in range(6)]
    assert load_domain_texts("general", "train", source=str(tmp_path / "saved")) == \
        [t for t in train if split_of(t) != "validation"]
    assert load_domain_texts("general", "validation", source=str(tmp_path / "saved")) == \
        [t for t in train if split_of(t) == "validation"]
    assert load_domain_texts("general", "test", source=str(tmp_path / "saved")) == ["held out"]
    dsd["validation"] = datasets.Dataset.from_dict({"text": ["val"]})  # its own validation split: used as is
    dsd.save_to_disk(str(tmp_path / "saved3"))
    assert load_domain_texts("general", "validation", source=str(tmp_path / "saved3")) == ["val"]
    assert load_domain_texts("general", "train", source=str(tmp_path / "saved3")) == train
