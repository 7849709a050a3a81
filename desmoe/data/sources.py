"""``load_domain_texts``: one domain's documents from the built-in sources, local files, or a hub dataset.

Records (json/jsonl/parquet rows, hub rows) become text through ``text_field`` when present, else through a
formatter for well-known field layouts (question/answer, msgid/msgstr, translation dicts, document/summary, ...).
Chat rows (``messages``) and prompt/completion rows are SFT data (:mod:`desmoe.data.sft`): they become
:class:`~desmoe.data.sft.SFTDoc` strings whose tokens are supervised only on the assistant / completion part.

Splits ('train', 'validation', 'test'). A dataset's own named splits are used where they exist (a hub or
``save_to_disk`` DatasetDict's splits; a directory's files named ``train*``, ``test*``, ``valid*``/``val*``/
``dev*``); what a dataset lacks is carved out of its train part by hashing each text
(:func:`~desmoe.data._util.split_of`: bucket 0 test, bucket 1 validation), and train keeps only the rest, so the
three splits never overlap:

- train + validation (or dev) + test: each used as is.
- train + test: test as is; validation = the train texts of hash bucket 1; train = the other train texts.
- train + validation (or dev), no test: the validation split is the *test* split (as before validation
  existed: what the dataset holds out is what is reported); validation = train texts of bucket 1; train = the rest.
- no held-out split at all (one file, one split): all three by hashing (bucket 0 test, 1 validation, else train).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ._util import check_split, seeded_subset, split_of
from .builtin import DOMAINS, DataSourceError, load_builtin
from .hub import LOCAL_EXTS, check_hub_name, is_hub_name
from .mathgen import format_math
from .sft import is_sft_record, parse_sft_record
_LANG_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
               "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ro": "Romanian",
               "cs": "Czech", "fi": "Finnish", "tr": "Turkish"}


def _str(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def format_record(record: dict, domain: str = "general", text_field: str = "text") -> str | None:
    """Text of one record: ``record[text_field]`` if present, else a known layout; None if nothing matches."""
    if text_field in record and record[text_field] is not None:
        return _str(record[text_field])
    r = {k.lower(): v for k, v in record.items() if v is not None}
    if "question" in r and "answer" in r:
        return format_math(_str(r["question"]), _str(r["answer"])) if domain == "math" else \
            f"Question: {_str(r['question'])}\nAnswer: {_str(r['answer'])}\n"
    if "problem" in r and "solution" in r:
        return f"Question: {_str(r['problem'])}\nAnswer: {_str(r['solution'])}\n"
    if "prompt" in r and ("completion" in r or "canonical_solution" in r):
        return _str(r["prompt"]) + _str(r.get("completion", r.get("canonical_solution")))
    if "instruction" in r and ("output" in r or "response" in r):
        inp = f"\n{_str(r['input'])}" if r.get("input") else ""
        return f"{_str(r['instruction'])}{inp}\n{_str(r.get('output', r.get('response')))}"
    if "msgid" in r and "msgstr" in r:
        lang = _LANG_NAMES.get(str(r.get("lang", "")), "Translation")
        return f"English: {_str(r['msgid'])}\n{lang}: {_str(r['msgstr'])}"
    if isinstance(r.get("translation"), dict) and len(r["translation"]) >= 2:
        return "\n".join(f"{_LANG_NAMES.get(k, k)}: {_str(v)}" for k, v in r["translation"].items())
    for src, tgt in (("document", "summary"), ("article", "highlights"), ("dialogue", "summary"),
                     ("text", "summary"), ("article", "abstract")):
        if src in r and tgt in r:
            return f"Description: {_str(r[src])}\nSummary: {_str(r[tgt])}"
    for field in ("text", "content", "code", "body", "document", "sentence"):
        if field in r:
            return _str(r[field])
    return None


def _records_to_texts(records, source: str, domain: str, text_field: str, rows=None) -> list[str]:
    """Texts of ``records``; chat and prompt/completion rows become :class:`~desmoe.data.sft.SFTDoc` (a str).
    ``rows``: each record's name in errors (a JSONL file's line numbers), default "record i"."""
    texts = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            texts.append(rec)
            continue
        where = f"{source}: {rows[i] if rows is not None else f'record {i}'}"
        if not isinstance(rec, dict):
            raise DataSourceError(f"{source}: record {i} is a {type(rec).__name__}, expected an object or a string"
                                  + (f" ({rows[i]})" if rows is not None else ""))
        if is_sft_record(rec, text_field):
            texts.append(parse_sft_record(rec, where))
            continue
        if text_field != "text" and rec.get(text_field) is None:  # an explicit field: never another column instead
            raise DataSourceError(f"{where} has no field {text_field!r} (data.text_field; the record's fields: "
                                  f"{sorted(map(str, rec))}); expected every raw-text record to hold it")
        text = format_record(rec, domain, text_field)
        if text is None:
            raise DataSourceError(
                f"{where} has no field {text_field!r} and no known layout (fields: {sorted(rec)}); "
                f"pass text_field= the name of the text column")
        texts.append(text)
    return texts


def _read_local_file(path: Path, domain: str, text_field: str) -> list[str]:
    """One data file's texts; an unreadable or malformed file is a :class:`DataSourceError` naming it."""
    try:
        return _parse_local_file(path, domain, text_field)
    except DataSourceError:
        raise
    except UnicodeDecodeError as e:
        raise DataSourceError(f"data.sources.{domain}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                              f"is it a binary file?") from None
    except OSError as e:
        raise DataSourceError(f"data.sources.{domain}: cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # pyarrow's ArrowInvalid on a damaged parquet, ...
        raise DataSourceError(f"data.sources.{domain}: {path} is malformed ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def _parse_local_file(path: Path, domain: str, text_field: str) -> list[str]:
    ext = path.suffix.lower()
    if ext == ".txt":
        import re
        return [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
                if p.strip()]
    if ext == ".jsonl":
        records, rows = [], []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as e:
                        raise DataSourceError(f"{path}: line {ln} is not valid JSON ({e})") from None
                    rows.append(f"line {ln} (record {len(rows)})")
        return _records_to_texts(records, str(path), domain, text_field, rows)
    if ext == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataSourceError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, dict):  # {"data": [...]} or a column layout {"text": [...]}
            lists = [v for v in obj.values() if isinstance(v, list)]
            if text_field in obj and isinstance(obj[text_field], list):
                obj = obj[text_field]
            elif "data" in obj and isinstance(obj["data"], list):
                obj = obj["data"]
            elif len(lists) == 1:
                obj = lists[0]
            else:
                raise DataSourceError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        if not isinstance(obj, list):
            raise DataSourceError(f"{path}: holds a JSON {type(obj).__name__}, expected a list of records (or "
                                  f"{{'data': [...]}})")
        return _records_to_texts(obj, str(path), domain, text_field)
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
            records = pq.read_table(path).to_pylist()
        except ImportError:
            try:
                import pandas as pd
                records = pd.read_parquet(path).to_dict("records")
            except ImportError:
                raise DataSourceError(f"{path}: reading parquet needs pyarrow: `pip install pyarrow`") from None
        return _records_to_texts(records, str(path), domain, text_field)
    raise DataSourceError(f"{path}: unsupported file type {ext!r}; expected one of {LOCAL_EXTS}")


def _file_split(path: Path) -> str | None:
    """The split a file's name gives it (train.jsonl, test-00000.parquet, validation.json, dev.txt), else None."""
    stem = path.name.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith("test"):
        return "test"
    if stem.startswith(("valid", "val.", "val-", "val_", "dev")):
        return "validation"
    return None


def resolve_split(names, split: str) -> tuple[str, tuple[str, ...] | None]:
    """Which of a dataset's named splits ``names`` holds ``split``, and which hash splits of it to keep (None: all
    its texts). See the module docstring for the rules."""
    names = list(names)
    val = next((n for n in ("validation", "dev") if n in names), None)
    test = "test" if "test" in names else val  # a dataset without test reports on its validation split
    own_val = val if "test" in names else None
    if split == "test" and test:
        return test, None
    if split == "validation" and own_val:
        return own_val, None
    base = "train" if "train" in names else next((n for n in names if n not in (test, own_val)), None)
    if base is None:  # only held-out splits: carving train/validation out of them would leak into the reported set
        return names[0], ()
    if split != "train":
        return base, (split,)
    carved = tuple(s for s, own in (("test", test), ("validation", own_val)) if own is None)
    return base, tuple(s for s in ("train", "validation", "test") if s not in carved) if carved else None


def _pick(groups: dict, split: str, texts_of) -> list[str]:
    """The texts of ``split`` from a dataset's named split ``groups`` (``texts_of(group)`` reads one)."""
    name, keep = resolve_split(groups, split)
    texts = texts_of(groups[name])
    return texts if keep is None else [t for t in texts if split_of(t) in keep]


def _load_saved_dataset(path: Path, domain: str, split: str, text_field: str) -> list[str]:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise DataSourceError(f"{path} (domain {domain!r}) was saved by `datasets.save_to_disk`; reading it needs "
                              f"`pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    groups = {k: ds[k] for k in ds.keys()} if hasattr(ds, "keys") else {"train": ds}  # DatasetDict or a Dataset
    return _pick(groups, split, lambda d: _records_to_texts(d, str(path), domain, text_field))


def _load_local(path: Path, domain: str, split: str, text_field: str) -> list[str]:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _load_saved_dataset(path, domain, split, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_EXTS)
        if not files:
            raise DataSourceError(f"source directory {path} (domain {domain!r}) holds no {'/'.join(LOCAL_EXTS)} files")
    else:
        files = [path]
    named = {p: _file_split(p) for p in files}
    if len(files) > 1 and any(named.values()):  # the files themselves define the splits (unnamed files: ignored)
        groups: dict[str, list[Path]] = {}
        for p in files:
            if named[p]:
                groups.setdefault(named[p], []).append(p)
        return _pick(groups, split, lambda ps: [t for p in ps for t in _read_local_file(p, domain, text_field)])
    texts = [t for p in files for t in _read_local_file(p, domain, text_field)]
    return [t for t in texts if split_of(t) == split]


def _load_hub(name: str, domain: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets  # imported lazily: not installed on every machine
    except ImportError:
        raise DataSourceError(f"source {name!r} (domain {domain!r}) is neither a local file nor loadable: hub "
                              f"datasets need the `datasets` package (`pip install datasets`)") from None
    repo, _, config = name.partition(":")
    check_hub_name(name, f"data.sources.{domain}", "dataset")  # cached, or one short request: fail fast
    try:
        dsd = datasets.load_dataset(repo, config or None)
    except Exception as e:  # offline / unknown name: the library's own exceptions vary by version
        raise DataSourceError(f"data.sources.{domain}: source {name!r}: not a local path, and loading it from the "
                              f"Hugging Face hub failed ({type(e).__name__}: {e}). Without network, pass a local "
                              f"json/jsonl/parquet/txt file or directory instead") from None
    return _pick({k: dsd[k] for k in dsd.keys()}, split, lambda d: _records_to_texts(d, name, domain, text_field))


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~")) or os.sep in source and source.count("/") > 1
            or source.lower().endswith(LOCAL_EXTS))


def load_domain_texts(domain: str, split: str = "train", *, source: str | None = None, max_docs: int | None = None,
                      seed: int = 0, text_field: str = "text") -> list[str]:
    """Documents (plain strings) of one domain's ``split`` ('train', 'validation' or 'test').

    source None: the built-in offline domain ``domain`` (one of :data:`DOMAINS`); otherwise a local file/dir
    (json, jsonl, parquet, txt; txt documents are separated by blank lines; or a ``save_to_disk`` directory;
    a directory's files named train*/validation*/test* define the splits; see the module docstring) or a hub
    dataset name
    (``"repo/name"`` or ``"repo/name:config"``, needs ``datasets`` and network). ``max_docs`` keeps a seeded
    subset. Raises ValueError for a bad domain/split and DataSourceError for a missing/unusable source.
    """
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty str, got {domain!r}")
    check_split(split)
    if max_docs is not None and (not isinstance(max_docs, int) or isinstance(max_docs, bool) or max_docs < 0):
        raise ValueError(f"max_docs must be a non-negative int or None, got {max_docs!r}")
    if source is None:
        if domain not in DOMAINS:
            raise ValueError(f"unknown built-in domain {domain!r}: expected one of {DOMAINS}, "
                             f"or give source= a local file/dir or hub dataset for it")
        return load_builtin(domain, split, max_docs, seed)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a str path or dataset name, got {type(source).__name__}")
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would block forever, a device never end
        raise DataSourceError(f"data.sources.{domain}: {source!r} is not a regular file or directory (a named pipe, "
                              f"socket or device); expected a json/jsonl/parquet/txt file or a directory of them")
    if path.exists():
        texts = _load_local(path, domain, split, text_field)
    elif _looks_like_path(source) and not is_hub_name(source):
        raise DataSourceError(f"data.sources.{domain}: source file {source!r} does not exist")
    else:
        texts = _load_hub(source, domain, split, text_field)
    texts = [t for t in texts if t.strip()]
    return seeded_subset(texts, max_docs, seed, "source", source, split)
