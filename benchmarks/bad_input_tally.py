"""Tally of the bad-input suites (tests/test_bad_inputs.py, tests/test_fuzz_inputs.py): tried / clear / correct /
unclear / traceback / silent / lost.

Runs the suites with ``DESMOE_BAD_INPUT_TALLY`` set, so every CLI/library attempt records how it was classified
(see ``classify`` in the test file), and reads pytest's JUnit XML for the checks that are plain asserts.
``--code DIR`` runs the same suite against another checkout of the package (e.g. the code before
the clear-error work: ``git archive c163abc | tar -x -C /tmp/old``), to measure what the suite finds there.

    python benchmarks/bad_input_tally.py                              # this checkout
    python benchmarks/bad_input_tally.py --code /tmp/old --label c163abc
    python benchmarks/bad_input_tally.py --readme     # the table between README.md's tally markers, from results/

Writes ``benchmarks/results/bad_inputs_tally-<label>.json`` and prints the table last.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTCOMES = ("clear", "correct", "unclear", "traceback", "silent", "lost")
SUITES = ("tests/test_bad_inputs.py", "tests/test_fuzz_inputs.py")


# this machine's paths in tracebacks, as portable placeholders (the results are committed)
_MACHINE_PATHS = ((re.compile(r"/[^\s\"']*?/site-packages/"), "<site-packages>/"),
                  (re.compile(r"/[^\s\"']*?/lib/python3\.\d+/"), "<python>/"),
                  (re.compile(r"/tmp/pytest-of-[^/\s\"']+/pytest-\d+/"), "<tmp>/"),
                  (re.compile(r"/tmp/tmp[\w-]+/"), "<tmp>/"))


def portable(obj, roots: list[str]):
    """``obj`` (a result, recursively) with absolute paths made machine-free: under a directory of ``roots`` (the
    checkout, the tested package's parent) relative to it; site-packages, the Python install and temporary
    directories as placeholders."""
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, roots) for v in obj]
    if not isinstance(obj, str):
        return obj
    for r in sorted(roots, key=len, reverse=True):
        obj = obj.replace(r.rstrip("/") + "/", "")
    for pat, sub in _MACHINE_PATHS:
        obj = pat.sub(sub, obj)
    return obj


HEADER = ("| code | attempts tried | clear | correct | unclear | traceback | silent | lost | other checks passed | "
          "suite time |\n|---|---|---|---|---|---|---|---|---|---|")


def row(res: dict) -> str:
    return (f"| {res['label']} | {res['attempts_tried']} | " + " | ".join(str(res.get(k, "–")) for k in OUTCOMES)
            + f" | {res['plain_checks'] - res['plain_checks_failed']} of {res['plain_checks']}"
            + f" | {res['seconds']:.0f} s |")


def write_readme() -> int:
    import glob

    rows = []
    for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "bad_inputs_tally-*.json")),
                    key=lambda p: ("current" in p, p)):
        with open(p) as f:
            rows.append(row(json.load(f)))
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    a, b = "<!-- tally:start -->", "<!-- tally:end -->"
    if a not in text or b not in text:
        raise SystemExit("README.md has no tally markers")
    text = text[:text.index(a) + len(a)] + "\n" + HEADER + "\n" + "\n".join(rows) + "\n" + text[text.index(b):]
    with open(readme, "w") as f:
        f.write(text)
    print(HEADER + "\n" + "\n".join(rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=None, help="directory holding another checkout's desmoe/ package")
    ap.add_argument("--label", default="current")
    ap.add_argument("--skip", action="append", default=[], metavar="TEST_ID",
                    help="deselect a test (e.g. one that would exhaust this machine's memory on old code)")
    ap.add_argument("--timeout", type=int, default=3600, help="for the whole suite (s)")
    ap.add_argument("--case-timeout", type=int, default=150,
                    help="per test (s): a bad input that is accepted and runs on (e.g. 10^10 steps) is 'silent'")
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md's table from the results")
    a = ap.parse_args()
    if a.readme:
        return write_readme()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as td:
        tally, junit = os.path.join(td, "tally.jsonl"), os.path.join(td, "junit.xml")
        env["DESMOE_BAD_INPUT_TALLY"] = tally
        if a.code:
            env["PYTHONPATH"] = os.path.abspath(a.code) + os.pathsep + env.get("PYTHONPATH", "")
        # run outside the checkout: python puts the working directory first on sys.path
        code = subprocess.run([sys.executable, "-c", "import desmoe, os; print(os.path.dirname(desmoe.__file__))"],
                              env=env, cwd=td, capture_output=True, text=True).stdout.strip()
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", *[os.path.join(ROOT, s) for s in SUITES], "-q",
                            "-p", "no:cacheprovider", f"--junitxml={junit}", f"--rootdir={ROOT}",
                            "-n", "1", f"--timeout={a.case_timeout}", "--timeout-method=thread",
                            # one xdist worker: a case that aborts the process is reported, not fatal
                            *[f"--deselect={t}" if "::" in t else f"--deselect=tests/test_bad_inputs.py::{t}"
                              for t in a.skip]],
                           env=env, cwd=td,
                           capture_output=True, text=True, timeout=a.timeout)
        seconds = time.time() - t0
        if not os.path.exists(junit):
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"pytest wrote no report (exit code {r.returncode})")
        lines = [json.loads(x) for x in open(tally)] if os.path.exists(tally) else []
        records = [x for x in lines if "outcome" in x]
        # how long each unfinished attempt ran: until the next attempt started (or the suite ended)
        starts = [(x["case"].split("::")[-1], x["started"]) for x in lines if "started" in x]
        ran = {n: (starts[i + 1][1] if i + 1 < len(starts) else t0 + seconds) - t for i, (n, t) in enumerate(starts)}
        started = set(ran)
        cases = []
        for tc in ET.parse(junit).getroot().iter("testcase"):
            bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
            skipped = tc.find("skipped") is not None
            text = "" if bad is None else (bad.get("message") or "") + (bad.text or "")
            cases.append({"case": f"{tc.get('classname')}::{tc.get('name')}", "failed": bad is not None,
                          "skipped": skipped, "crashed": "crashed" in text or "Timeout" in text,
                          "seconds": float(tc.get("time") or 0)})
    recorded = {r["case"].split("::")[-1] for r in records}
    for c in cases:  # an attempt began but never classified itself: it ran past the timeout, or the process died
        name = c["case"].split("::")[-1]
        if c["failed"] and name in started and name not in recorded:
            hung = ran[name] >= 0.9 * a.case_timeout
            records.append({"case": c["case"], "outcome": "silent" if hung else "traceback",
                            "detail": "accepted and still running at the timeout" if hung else "the process aborted"})
    counts = collections.Counter(r["outcome"] for r in records)
    recorded = {r["case"].split("::")[-1] for r in records}
    plain = [c for c in cases if c["case"].split("::")[-1] not in recorded and not c["skipped"]]
    res = {"label": a.label, "package": code, "skipped_tests": a.skip, "python": sys.version.split()[0],
           "seconds": round(seconds, 1),
           "attempts_tried": len(records), **{k: counts.get(k, 0) for k in OUTCOMES},
           "plain_checks": len(plain), "plain_checks_failed": sum(c["failed"] for c in plain),
           "tests": len(cases), "tests_failed": sum(c["failed"] for c in cases),
           "not_clear": [r for r in records if r["outcome"] != "clear"],
           "plain_failed": [c["case"] for c in plain if c["failed"]],
           "date": time.strftime("%Y-%m-%d"), "pytest_tail": r.stdout[-1500:]}
    import importlib.metadata as md

    for dist in ("torch", "transformers"):
        try:
            res[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    res = portable(res, [ROOT, os.path.dirname(code)] + ([os.path.abspath(a.code)] if a.code else []))
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"bad_inputs_tally-{a.label}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    print(HEADER)
    print(row(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
