"""A small roff (man page) reader: enough to pull readable text out of man(7) and mdoc(7) pages.

It is not a typesetter: it drops requests it does not know, keeps the words of font/formatting macros, and
resolves the common escapes. Good enough for prose; tables and equations come out as plain words.
"""
from __future__ import annotations

import gzip
import re

_ESCAPES = {
    "-": "-", "e": "\\", "&": "", "c": "", "~": " ", " ": " ", "0": " ", "|": "", "^": "", "/": "", ",": "",
    ".": ".", "'": "'", "`": "`", "%": "",
}
_NAMED = {"em": "-", "en": "-", "aq": "'", "lq": '"', "rq": '"', "oq": "'", "cq": "'", "dq": '"', "bu": "*",
          "hy": "-", "mi": "-", "co": "(c)", "rg": "(R)", "tm": "(TM)", "<=": "<=", ">=": ">=", "ti": "~",
          "ha": "^", "ga": "`", "dg": "+", "->": "->", "<-": "<-", "pl": "+", "mu": "x", "Fo": '"', "Fc": '"',
          "rs": "\\", "sl": "/", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "at": "@", "sh": "#", "Do": "$"}
_ESC_RE = re.compile(r"""\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?(?:\d|\(\d\d|\[[^\]]*\])|\*(?:\[[^\]]*\]|\(..|.)|
                         \((..)|\[([^\]]*)\]|[hvwlLNxXbDoRkzZ]'[^']*'|n(?:\[[^\]]*\]|\(..|.)|"(.*)$|(.))""",
                     re.VERBOSE)
_PARA_REQS = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "Pp", "Lp", "Bl", "El", "It", "Bd", "Ed", "RS", "RE",
              "TQ", "nf", "fi", "in", "ne"}
_TEXT_MACROS = {"B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI", "UR", "MT", "Nm", "Ar", "Fl", "Cm", "Em",
                "Sy", "Va", "Fn", "Fa", "Ev", "Pa", "Dv", "Er", "Li", "Ql", "Dq", "Sq", "Pq", "Xr", "Nd", "Ic",
                "Ft", "Ad", "An", "Lk", "Mt", "Tn", "Ux"}
_ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}  # words are concatenated without spaces


def unescape(line: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) is not None:
            return _NAMED.get(m.group(1), "")
        if m.group(2) is not None:
            return _NAMED.get(m.group(2), "")
        if m.group(3) is not None:  # \" comment
            return ""
        if m.group(4) is not None:
            return _ESCAPES.get(m.group(4), m.group(4) if m.group(4).isalnum() is False else "")
        return ""

    return _ESC_RE.sub(sub, line)


def _macro_args(rest: str) -> list[str]:
    args, cur, quoted = [], [], False
    for ch in rest:
        if ch == '"':
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        args.append("".join(cur))
    return args


def read_man(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(400_000)
    return raw.decode("utf-8", errors="replace")


def parse_man(source: str) -> dict[str, str]:
    """Sections of a man page, ``{"NAME": text, "DESCRIPTION": text, ...}``; paragraphs separated by ``\\n\\n``.

    Returns {} for ``.so`` redirections (aliases of another page).
    """
    sections: dict[str, list[str]] = {}
    current = None
    para: list[str] = []

    def flush() -> None:
        if current is not None and para:
            text = " ".join(para).strip()
            text = re.sub(r"\s+", " ", text)
            if text:
                sections.setdefault(current, []).append(text)
        para.clear()

    for line in source.splitlines():
        if line.startswith((".so ", "'so ")) and not sections and current is None:
            return {}
        if line.startswith((".", "'")):
            body = line[1:].lstrip()
            if body.startswith('\\"') or not body:
                continue
            parts = body.split(None, 1)
            req, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if req in ("SH", "Sh", "SS", "Ss"):
                flush()
                title = unescape(" ".join(_macro_args(rest))).strip().upper()
                if req in ("SH", "Sh"):
                    current = title
                elif title:  # a subsection title is a paragraph of its own
                    para.append(title + ".")
                    flush()
                continue
            if req in _PARA_REQS:
                flush()
                if req in ("TP", "IP", "It") and rest and req != "TP":
                    para.append(unescape(" ".join(_macro_args(rest)[:1])))
                continue
            if req in _TEXT_MACROS:
                args = [unescape(a) for a in _macro_args(rest)]
                if req == "Nd":
                    para.append("- " + " ".join(args))
                elif req in _ALTERNATING:
                    para.append("".join(args))
                else:
                    para.append(" ".join(args))
            continue  # unknown request: dropped
        text = unescape(line)
        if text.strip():
            para.append(text.strip())
        elif para:
            flush()
    flush()
    return {k: "\n\n".join(v) for k, v in sections.items()}
