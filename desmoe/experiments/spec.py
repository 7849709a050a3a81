"""Experiment configuration (``configs/experiments/*.yaml``): the base model, shared fine-tuning settings, the
domains, LR search grid, seeds, and per-experiment knobs. Validated on load; errors name the key."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                          "experiments")


@dataclass
class ExperimentSpec:
    """``base``: {pretrain_steps, config (a desmoe train config dict with model.tiny)}; ``finetune``: the
    data/method/train sections shared by every fine-tuning run (model/tokenizer come from the base)."""

    base: dict
    finetune: dict
    domains: list = field(default_factory=lambda: ["math", "code", "translation", "law", "summary"])
    lrs: list = field(default_factory=lambda: [3e-4, 1e-3])
    seeds: int = 3
    math_n: int = 32
    scaling_counts: list = field(default_factory=lambda: [2, 4, 5])
    scaling_methods: list = field(default_factory=lambda: ["fft_mixed", "esft_gate", "des_moe"])
    forgetting_methods: list = field(default_factory=lambda: ["fft_mixed", "esft_gate", "esft_token", "frozen_router",
                                                              "des_moe"])
    phis: list = field(default_factory=lambda: [0.4, 0.6, 0.8])
    single_methods: list = field(default_factory=lambda: ["fft_single"])  # single_vs_mixed: one model per domain
    variants: dict = field(default_factory=dict)  # extra rows: name -> {method: METHOD, overrides: {method.* keys}}
    cache: str = "runs/experiments/cache"
    keep_checkpoints: bool = True
    source: str = "config"

    def __post_init__(self):
        from ..data import DOMAINS
        from .runner import SINGLE_METHODS, TRAINER_METHOD

        s = self.source
        if not isinstance(self.base, dict) or not isinstance(self.base.get("config"), dict):
            raise ValueError(f"{s}: base.config must be a desmoe train config mapping")
        if not isinstance(self.base.get("pretrain_steps"), int) or self.base["pretrain_steps"] < 1:
            raise ValueError(f"{s}: base.pretrain_steps must be an int >= 1, got {self.base.get('pretrain_steps')!r}")
        aux = self.base.get("aux_loss_coef", 0.0)
        if isinstance(aux, bool) or not isinstance(aux, (int, float)) or aux < 0:
            raise ValueError(f"{s}: base.aux_loss_coef must be a number >= 0, got {aux!r}")
        base_keys = {"pretrain_steps", "config", "aux_loss_coef", "pretrain_mix"}
        if set(self.base) - base_keys:
            raise ValueError(f"{s}: unknown base key(s) {sorted(set(self.base) - base_keys)}; valid: {sorted(base_keys)}")
        mix = self.base.get("pretrain_mix")
        if mix is not None and (not isinstance(mix, dict) or not mix or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0 for w in mix.values())):
            raise ValueError(f"{s}: base.pretrain_mix must be a mapping domain -> weight > 0 (or absent), got {mix!r}")
        if not isinstance(self.finetune, dict) or set(self.finetune) - {"data", "method", "train"}:
            raise ValueError(f"{s}: finetune must be a mapping with only data/method/train sections, got "
                             f"{sorted(self.finetune) if isinstance(self.finetune, dict) else self.finetune!r}")
        if (not isinstance(self.domains, list) or not self.domains or len(set(self.domains)) != len(self.domains)
                or any(d not in DOMAINS for d in self.domains)):
            raise ValueError(f"{s}: domains must be a non-empty list of distinct built-in domains {DOMAINS}, "
                             f"got {self.domains!r}")
        general = self.finetune.get("data", {}).get("general", "general")
        if general in self.domains:
            raise ValueError(f"{s}: domains must not contain the forgetting probe {general!r}")
        if not isinstance(self.lrs, list) or not self.lrs or any(not isinstance(x, (int, float)) or x <= 0 for x in self.lrs):
            raise ValueError(f"{s}: lrs must be a non-empty list of numbers > 0, got {self.lrs!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"{s}: seeds must be an int >= 1, got {self.seeds!r}")
        if isinstance(self.math_n, bool) or not isinstance(self.math_n, int) or self.math_n < 0:
            raise ValueError(f"{s}: math_n must be an int >= 0, got {self.math_n!r}")
        if (not isinstance(self.scaling_counts, list) or not self.scaling_counts
                or any(not isinstance(c, int) or not 1 <= c <= len(self.domains) for c in self.scaling_counts)):
            raise ValueError(f"{s}: scaling_counts must be ints in [1, {len(self.domains)}], got {self.scaling_counts!r}")
        if not isinstance(self.variants, dict):
            raise ValueError(f"{s}: variants must be a mapping name -> {{method, overrides}}, got {self.variants!r}")
        for name, v in self.variants.items():
            if (not isinstance(v, dict) or set(v) - {"method", "overrides"} or v.get("method") not in TRAINER_METHOD
                    or v.get("method") == "fft_single" or not isinstance(v.get("overrides", {}), dict)):
                raise ValueError(f"{s}: variants.{name} must be {{method: one of {list(TRAINER_METHOD)}, overrides: "
                                 f"{{method config keys}}}}, got {v!r}")
            if name in TRAINER_METHOD:
                raise ValueError(f"{s}: variants.{name}: the name is already a method")
        for key in ("scaling_methods", "forgetting_methods"):
            bad = [m for m in getattr(self, key) if (m not in TRAINER_METHOD and m not in self.variants)
                   or m in SINGLE_METHODS]
            if bad:
                raise ValueError(f"{s}: {key} has unknown method(s) {bad}; expected some of "
                                 f"{[m for m in TRAINER_METHOD if m not in SINGLE_METHODS]}")
        if (not isinstance(self.single_methods, list) or not self.single_methods
                or any(m not in SINGLE_METHODS for m in self.single_methods)):
            raise ValueError(f"{s}: single_methods must be a non-empty list of {list(SINGLE_METHODS)}, "
                             f"got {self.single_methods!r}")
        if not isinstance(self.phis, list) or any(not isinstance(p, (int, float)) or not 0 < p <= 1 for p in self.phis):
            raise ValueError(f"{s}: phis must be a list of numbers in (0, 1], got {self.phis!r}")

    def cell_of(self, name: str) -> tuple[str, dict | None]:
        """``(METHOD, method overrides)`` of a method or variant name."""
        if name in self.variants:
            return self.variants[name]["method"], dict(self.variants[name].get("overrides") or {}) or None
        return name, None

    def to_dict(self) -> dict:
        import dataclasses

        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def load_spec(path: str | None = None, *, quick: bool = False, seeds: int | None = None) -> ExperimentSpec:
    """Load ``path`` (default ``configs/experiments/small.yaml``, or ``quick.yaml`` with ``quick``)."""
    import dataclasses

    from ..train.config import read_yaml

    if path is None:
        path = os.path.join(CONFIG_DIR, "quick.yaml" if quick else "small.yaml")
    d = read_yaml(path, "--config: experiment config")
    if not isinstance(d, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping at the top level")
    fields = {f.name for f in dataclasses.fields(ExperimentSpec)} - {"source"}
    bad = set(d) - fields
    if bad:
        raise ValueError(f"{path}: unknown key(s) {sorted(bad)}; valid keys: {sorted(fields)}")
    missing = {"base", "finetune"} - set(d)
    if missing:
        raise ValueError(f"{path}: missing key(s) {sorted(missing)}")
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"--seeds must be an int >= 1, got {seeds!r}")
        d["seeds"] = seeds
    return ExperimentSpec(**d, source=path)
