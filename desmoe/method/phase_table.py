"""The per-phase table of every registered method (what trains in each phase), as Markdown for the docs."""
from __future__ import annotations

import dataclasses

from ..integrations.families import shared_expert_footnote
from .config import MethodConfig
from .registry import method_class, method_names

_KIND_COLUMNS = (("router", "router weight"), ("alr", "ALR"), ("experts", "routed experts"),
                 ("shared_experts", "shared experts¹"), ("attention", "attention"),
                 ("embeddings", "embeddings + LM head"), ("other", "norms, dense MLPs"))


def phase_table_markdown(cfg: MethodConfig | None = None, total_steps: int = 100) -> str:
    """Markdown table of what trains in each phase of every registered method under ``cfg`` (default config),
    computed from :meth:`Method.trainable_kinds` and :meth:`Method.expert_scope` (the docs carry its output).
    """
    base = cfg or MethodConfig()
    head = "| method | phase (steps) | " + " | ".join(c for _, c in _KIND_COLUMNS) + " |"
    rows = [head, "|" + "---|" * (2 + len(_KIND_COLUMNS))]
    for name in method_names():
        m = method_class(name)(dataclasses.replace(base, name=name), total_steps)
        for phase, (a, b) in m.phase_spans().items():
            kinds = m.trainable_kinds(phase)
            cells = [(m.expert_scope(phase) if k == "experts" else "✓") if k in kinds else "–"
                     for k, _ in _KIND_COLUMNS]
            span = f"[{a / total_steps:g}T, {b / total_steps:g}T)"
            rows.append(f"| `{name}` | {phase} {span} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("¹ Shared experts: the parameters under the modules each family names "
                f"(`desmoe.integrations.families`): {shared_expert_footnote()} (nothing in this column). "
                f"Shown for `method.shared_experts: {base.shared_experts}`; `always` / `never` put ✓ / – in every "
                "phase of the DES variants.")
    return "\n".join(rows)
