"""Experiment configuration (``configs/experiments/*.yaml``): the base model, shared fine-tuning settings, the
domains, the LR grid, seeds, the methods of each experiment. Validated on load; errors name the key."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .methods import SINGLE_METHODS, TRAINER_METHOD

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                          "experiments")
DEFAULT_CONFIG = "paper.yaml"


@dataclass
class ExperimentSpec:
    """``base``: {pretrain_steps, config (a desmoe train config dict with model.tiny), aux_loss_coef, pretrain_mix};
    ``finetune``: the data/method/train sections shared by every fine-tuning run (model/tokenizer come from the
    base; ``train.max_steps`` is ``steps_per_domain`` × the run's number of domains)."""

    base: dict
    finetune: dict
    domains: list = field(default_factory=lambda: ["math", "code", "translation", "law", "summary"])
    steps_per_domain: int = 30
    lrs: list = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    seeds: int = 3
    math_n: int = 0
    pareto_methods: list = field(default_factory=lambda: ["fft_mixed", "esft_gate", "esft_token", "frozen_router",
                                                          "des_moe"])
    single_methods: list = field(default_factory=lambda: ["esft_gate_single"])  # one model per domain
    scaling_counts: list = field(default_factory=lambda: [2, 3, 4, 5])
    scaling_methods: list = field(default_factory=lambda: ["fft_mixed", "des_moe"])
    variants: dict = field(default_factory=dict)  # extra rows: name -> {method: METHOD, overrides: {method.* keys}}
    cache: str = "runs/experiments/cache"
    keep_checkpoints: bool = False
    source: str = "config"

    def __post_init__(self):
        from ..data import DOMAINS

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
            raise ValueError(f"{s}: unknown base key(s) {sorted(set(self.base) - base_keys)}; "
                             f"valid: {sorted(base_keys)}")
        mix = self.base.get("pretrain_mix")
        if mix is not None and (not isinstance(mix, dict) or not mix or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0 for w in mix.values())):
            raise ValueError(f"{s}: base.pretrain_mix must be a mapping domain -> weight > 0 (or absent), got {mix!r}")
        if not isinstance(self.finetune, dict) or set(self.finetune) - {"data", "method", "train"}:
            raise ValueError(f"{s}: finetune must be a mapping with only data/method/train sections, got "
                             f"{sorted(self.finetune) if isinstance(self.finetune, dict) else self.finetune!r}")
        if "max_steps" in self.finetune.get("train", {}):
            raise ValueError(f"{s}: finetune.train.max_steps is set per run (steps_per_domain × domains); "
                             f"set steps_per_domain instead")
        tr = self.finetune.get("train", {})
        if not tr.get("val_batches") or not tr.get("val_every"):
            raise ValueError(f"{s}: finetune.train.val_batches and val_every must be > 0 (LRs are chosen on the "
                             f"validation split; wall-clock is read off the validation curve), got "
                             f"val_batches={tr.get('val_batches')!r}, val_every={tr.get('val_every')!r}")
        if (not isinstance(self.domains, list) or len(self.domains) < 2 or len(set(self.domains)) != len(self.domains)
                or any(d not in DOMAINS for d in self.domains)):
            raise ValueError(f"{s}: domains must be a list of at least 2 distinct built-in domains {DOMAINS}, "
                             f"got {self.domains!r}")
        general = self.finetune.get("data", {}).get("general", "general")
        if general in self.domains:
            raise ValueError(f"{s}: domains must not contain the forgetting probe {general!r}")
        spd = self.steps_per_domain
        if isinstance(spd, bool) or not isinstance(spd, int) or spd < 1:
            raise ValueError(f"{s}: steps_per_domain must be an int >= 1, got {self.steps_per_domain!r}")
        if (not isinstance(self.lrs, list) or not self.lrs or len(set(self.lrs)) != len(self.lrs)
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0
                       for x in self.lrs)):
            raise ValueError(f"{s}: lrs must be a non-empty list of distinct finite numbers > 0, got {self.lrs!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"{s}: seeds must be an int >= 1, got {self.seeds!r}")
        if isinstance(self.math_n, bool) or not isinstance(self.math_n, int) or self.math_n < 0:
            raise ValueError(f"{s}: math_n must be an int >= 0, got {self.math_n!r}")
        if (not isinstance(self.scaling_counts, list) or len(self.scaling_counts) < 2
                or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= len(self.domains)
                       for c in self.scaling_counts) or len(set(self.scaling_counts)) != len(self.scaling_counts)):
            raise ValueError(f"{s}: scaling_counts must be at least 2 distinct ints in [1, {len(self.domains)}], "
                             f"got {self.scaling_counts!r}")
        if not isinstance(self.variants, dict):
            raise ValueError(f"{s}: variants must be a mapping name -> {{method, overrides}}, got {self.variants!r}")
        for name, v in self.variants.items():
            if (not isinstance(v, dict) or set(v) - {"method", "overrides"} or v.get("method") not in TRAINER_METHOD
                    or v.get("method") in SINGLE_METHODS or not isinstance(v.get("overrides", {}), dict)):
                raise ValueError(f"{s}: variants.{name} must be {{method: one of {list(TRAINER_METHOD)}, overrides: "
                                 f"{{method config keys}}}}, got {v!r}")
            if name in TRAINER_METHOD:
                raise ValueError(f"{s}: variants.{name}: the name is already a method")
        mixed = [m for m in TRAINER_METHOD if m not in SINGLE_METHODS]
        for key in ("pareto_methods", "scaling_methods"):
            ms = getattr(self, key)
            bad = [m for m in ms if (m not in TRAINER_METHOD and m not in self.variants) or m in SINGLE_METHODS] \
                if isinstance(ms, list) else ms
            if not isinstance(ms, list) or not ms or bad or len(set(ms)) != len(ms):
                raise ValueError(f"{s}: {key} must be a non-empty list of distinct methods; bad: {bad!r}; expected "
                                 f"some of {mixed + list(self.variants)}")
        for need in ("fft_mixed", "des_moe"):
            if need not in self.pareto_methods:
                raise ValueError(f"{s}: pareto_methods must include {need!r} (the comparison is against it)")
        bad = [m for m in self.scaling_methods if m not in self.pareto_methods]
        if bad:
            raise ValueError(f"{s}: scaling_methods {bad} must also be in pareto_methods (their LR is chosen there)")
        if (not isinstance(self.single_methods, list)
                or any(m not in SINGLE_METHODS for m in self.single_methods)):
            raise ValueError(f"{s}: single_methods must be a list of {list(SINGLE_METHODS)}, "
                             f"got {self.single_methods!r}")

    def cell_of(self, name: str) -> tuple[str, dict | None]:
        """``(METHOD, method overrides)`` of a method or variant name."""
        if name in self.variants:
            return self.variants[name]["method"], dict(self.variants[name].get("overrides") or {}) or None
        return name, None

    def to_dict(self) -> dict:
        import dataclasses

        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def load_spec(path: str | None = None, *, quick: bool = False, seeds: int | None = None) -> ExperimentSpec:
    """Load ``path`` (default ``configs/experiments/paper.yaml``, or ``quick.yaml`` with ``quick``)."""
    import dataclasses

    from ..train.config import read_yaml

    if path is None:
        path = os.path.join(CONFIG_DIR, "quick.yaml" if quick else DEFAULT_CONFIG)
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
