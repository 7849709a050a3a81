"""What a training step of each method costs: DES-MoE per phase against FFT, ESFT and frozen_router.

    python benchmarks/bench_method_cost.py --quick     # tiny model on CPU (seconds; the CPU suite runs it)
    python benchmarks/bench_method_cost.py --save      # CPU: hidden 256, 4 layers, 16 experts top-4, 2048 tokens/step
    python benchmarks/bench_method_cost.py             # GPU: DeepSeek-V2-Lite layer shapes (1 layer), bf16 autocast
    python benchmarks/bench_method_cost.py --update-readme   # the README's "Method cost" table from the committed JSON

One process; every method is built side by side from the same seed (same weights), on the same batch, backend and
dtype, and their steps are **interleaved** (one step of each per round) so machine load hits every method alike.
A step is what ``desmoe train`` runs at world size 1: ``begin_step`` → forward under ``ctl.applied`` (masks, KD) →
``λ·KD + (1-λ)·task`` → backward → ``before_optimizer_step`` → gradient clipping → AdamW. DES-MoE is pinned to one
step of each phase (warmup: all experts + ALR + KD; stabilization: DGES masks + ALR + KD; consolidation: DGES
masks only); its masks and ESFT's selection come from one fixed affinity matrix (the same for both, ``rand**4``
normalised per domain, phi 0.6 / esft_p 0.2), so they do not drift during the run.

Per method: the median step time and its ratio to FFT's; ``trainable_params``, ``grad_bytes`` (every ``.grad``
after the backward), ``opt_state_bytes`` (AdamW's state after the steps), ``opt_elems_stepped`` (elements AdamW
updates per step: parameters whose ``.grad`` is not None); ``saved_mb`` (tensors autograd holds for the backward);
peak memory: on CPU the peak RSS of a process that builds and steps this method alone (``peak_mem_gb`` = that RSS,
``peak_mem_kind: "rss"``; one subprocess per method, so methods do not share the number); on CUDA the step's
``max_memory_allocated`` above what was allocated before it plus this method's own parameters, gradients and
optimizer state (what a process holding only this method would peak at). And the FLOP accounting of the step
(:func:`flop_accounting`): forward, the dX the backward must compute (every layer at or above the lowest trainable
parameter), dW for trainable weights only (per trainable (token, expert) pair for masked experts), as a
floor and as the ratio of floors to FFT's, beside the measured ratio.

CPU runs call ``torch.set_flush_denormal(True)`` as every desmoe entry point does (see README, "Method cost").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import desmoe  # noqa: E402
from desmoe.context import recording  # noqa: E402
from desmoe.integrations.tiny import tiny_model  # noqa: E402
from desmoe.method import MethodConfig, MethodController  # noqa: E402
from desmoe.method.esft import select_top_p  # noqa: E402
from desmoe.train.loss import task_loss  # noqa: E402

QUICK = dict(shape="tiny", family="qwen3_moe",
             overrides=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                            vocab_size=512, max_position_embeddings=512), B=2, S=64)
CPU = dict(shape="cpu-256x4L-16e-top4", family="qwen3_moe",
           overrides=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=32, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                          vocab_size=2048, max_position_embeddings=1024), B=4, S=512)
# DeepSeek-V2-Lite's layer (hidden 2048, MLA with kv_lora_rank 512, 64 routed experts of 1408, top-6, 2 shared):
# one decoder layer and a 32k vocabulary so that six methods' weights, gradients and AdamW state fit one 80 GB GPU
GPU = dict(shape="deepseek-v2-lite-layer", family="deepseek_v2",
           overrides=dict(hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
                          moe_intermediate_size=1408, intermediate_size=10944, n_routed_experts=64,
                          num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=0, kv_lora_rank=512,
                          q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                          topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                          vocab_size=32000, max_position_embeddings=4096), B=2, S=2048)
M_DOMAINS = 4
TOTAL_STEPS = 100  # the phase clock: warmup [0, 20), stabilization [20, 70), consolidation [70, 100)
VARIANTS = {  # name: (method, the step the method is pinned to)
    "fft": ("fft", 0),
    "des_warmup": ("des_moe", 0),
    "des_stabilization": ("des_moe", 30),
    "des_consolidation": ("des_moe", 90),
    "esft": ("esft_gate", 0),
    "frozen_router": ("frozen_router", 0),
}
README_BEGIN = "<!-- method-cost:begin (generated by benchmarks/bench_method_cost.py --update-readme) -->"
README_END = "<!-- method-cost:end -->"


def _affinity(L: int, E: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    A = torch.rand(L, M_DOMAINS, E, generator=g) ** 4
    return A / A.sum(-1, keepdim=True)


class Variant:
    """One method on its own copy of the model (same seed), with its controller, optimizer and pinned step."""

    def __init__(self, name: str, spec: dict, device, dtype):
        method, self.step0 = VARIANTS[name]
        self.name, self.device, self.bf16 = name, device, dtype == torch.bfloat16
        self.model = desmoe.patch(tiny_model(spec["family"], seed=0, **spec["overrides"]).to(device).train())
        self.ctl = ctl = MethodController(self.model, MethodConfig(name=method), TOTAL_STEPS,
                                          [f"d{i}" for i in range(M_DOMAINS)])
        A = _affinity(len(ctl.blocks), ctl.num_experts).to(device)
        if method == "des_moe":
            ctl.tracker.A_LME = A
            ctl.tracker.initialised = True
            ctl.tracker.update_masks()
        elif method.startswith("esft"):
            ctl.method.selection_LE = select_top_p(A, ctl.cfg.esft_p).any(dim=1)
        ctl.begin_step(self.step0)
        self.opt = ctl.optimizer(lr=1e-5)  # what desmoe train and DesMoETrainer build

    def step(self, batch: dict, *, count: bool = False) -> dict | None:
        ctl, opt, model = self.ctl, self.opt, self.model
        ctl.begin_step(self.step0)
        opt.zero_grad(set_to_none=True)
        saved = _common.SavedBytes() if count else None
        dom_T = batch["domain_ids"].reshape(-1)
        with ctl.applied(dom_T) as fwd:
            if saved is not None:
                saved.__enter__()
            try:
                task, aux, _, _ = task_loss(model, batch, self.device, self.bf16)
            finally:
                if saved is not None:
                    saved.__exit__(None, None, None)
        loss = ctl.combine(task, fwd.added_loss)
        if aux is not None:
            loss = loss + aux
        loss.backward()
        info = None
        if count:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            info = {"saved_mb": saved.bytes / 1e6, "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
                    "opt_elems_stepped": sum(g.numel() for g in grads), "kd_active": fwd.added_loss is not None}
        ctl.before_optimizer_step(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        return info

    def persistent_bytes(self) -> dict:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        params += sum(p.numel() * p.element_size() for a in self.ctl.alr for p in a.parameters()
                      if not any(p is q for q in self.model.parameters()))
        state = sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
        return {"param_bytes": params, "opt_state_bytes": state}


class PlainHF:
    """The guard's baseline: the unpatched transformers model (its own default experts implementation) trained by a
    plain loop — forward with labels, backward, clipping, AdamW — on the same weights and batch."""

    name = "hf_plain"

    def __init__(self, spec: dict, device, dtype):
        self.device, self.bf16 = device, dtype == torch.bfloat16
        self.model = tiny_model(spec["family"], seed=0, **spec["overrides"]).to(device).train()
        self.impl = getattr(self.model.config, "_experts_implementation", None) or "eager"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def step(self, batch: dict, *, count: bool = False) -> dict | None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        info = None
        if count:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            info = {"saved_mb": 0.0, "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
                    "opt_elems_stepped": sum(g.numel() for g in grads), "kd_active": False}
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return info

    def persistent_bytes(self) -> dict:
        return {"param_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "opt_state_bytes": sum(t.numel() * t.element_size() for st in self.opt.state.values()
                                       for t in st.values() if torch.is_tensor(t))}


def make_batch(spec: dict, device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, S, V = spec["B"], spec["S"], spec["overrides"]["vocab_size"]
    ids = torch.randint(4, V, (B, S), generator=g)
    dom = (torch.arange(B * S) * M_DOMAINS // (B * S)).reshape(B, S)  # contiguous domain blocks
    return {"input_ids": ids.to(device), "labels": ids.to(device), "domain_ids": dom.to(device)}


# --- the FLOP and byte accounting ------------------------------------------------------------------------------
def flop_accounting(v: Variant, batch: dict) -> dict:
    """FLOPs of one step of ``v`` at its floor: forward + the dX the backward needs + dW of what trains.

    Counted per matmul (2·m·n·k): every ``nn.Linear`` (attention projections, dense and shared-expert MLPs, LM head,
    ALR), the routers (2·T·D·E), the routed experts (SwiGLU: 6·D·I per (token, expert) pair forward, 6·D·I dX,
    6·D·I dW only for pairs whose expert may train and, with per-token masks, whose token's domain owns it) and
    attention's two S×S products (4·B·S²·H·d forward, twice that for dX, no causal discount). The gradient flows
    from the loss down to the lowest trainable parameter: a decoder layer needs dX when it or a layer below it
    holds a trainable parameter (the embedding's dW needs layer 0's), the LM head whenever anything trains
    (counted per layer: the lowest trainable layer's own modules below its lowest trainable parameter are counted
    too). The ALR's floor is one evaluation per forward; ``flops_as_run`` adds what the code runs besides
    (``alr_evals_per_forward`` = 2 while the KD student is evaluated separately: its forward, its dW and the dX into
    its hidden layer). Elementwise work (norms, softmax, activations, AdamW) is left out."""
    from desmoe.integrations.hf import moe_blocks

    model, ctl = v.model, v.ctl
    cfg = model.config
    B, S = batch["input_ids"].shape
    T = B * S
    n_layers = len(model.model.layers)

    def layer_of(name: str) -> int | None:
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1]) if "layers" in parts else None

    trainable_layers = {layer_of(n) for n, p in model.named_parameters() if p.requires_grad} - {None}
    low = min(trainable_layers, default=n_layers)
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        low = 0
    any_trainable = any(p.requires_grad for p in model.parameters())
    kd = ctl.last_lambda > 0 and bool(ctl.alr)
    shared = bool(ctl.alr) and getattr(ctl.alr[0], "shares_kd_evaluation", False)  # one evaluation for routing + KD
    fwd = dx = dw = extra = 0.0
    alr_fwd = alr_bwd = 0.0
    alr_ids = {id(p) for a in ctl.alr for p in a.parameters()}
    alr_up_ids = {id(a.up.weight) for a in ctl.alr}
    expert_ids = {id(ex.gate_up_proj) for ex in ctl.experts} | {id(ex.down_proj) for ex in ctl.experts}
    for mod_name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or id(m.weight) in expert_ids:
            continue
        w = m.weight
        f = 2.0 * T * w.shape[0] * w.shape[1]
        l = layer_of(mod_name)
        need_dx = any_trainable if l is None else l >= low
        g_dw = f if w.requires_grad else 0.0
        g_dx = f if need_dx or (id(w) in alr_ids and id(w) not in alr_up_ids and w.requires_grad) else 0.0
        if id(w) in alr_ids:
            alr_fwd, alr_bwd = alr_fwd + f, alr_bwd + g_dw + g_dx
            if kd and not shared:  # the KD student's own evaluation: forward, dW, dX into its hidden layer (not into x)
                extra += f + g_dw + (f if id(w) not in alr_up_ids else 0.0)
            continue
        fwd, dw, dx = fwd + f, dw + g_dw, dx + g_dx
    # routers and routed experts
    K = ctl.routers[0].top_k
    trainable_LE = ctl.expert_trainable_LE()
    masks_LME = ctl.method.token_masks_LME(ctl)
    dom_T = batch["domain_ids"].reshape(-1)
    with torch.no_grad(), recording(ctl.routers) as rec:
        model(input_ids=batch["input_ids"])
    records = rec.layers()
    pairs_trainable = 0.0
    for l, ((name, router, ex), rec) in enumerate(zip(moe_blocks(model), records)):
        D, E = router.hidden_dim, router.num_experts
        I = ex.down_proj.shape[-1]
        layer = layer_of(name)
        fwd += 2.0 * T * D * E + 6.0 * T * K * D * I
        if layer is None or layer >= low:
            dx += 2.0 * T * D * E + 6.0 * T * K * D * I
        dw += 2.0 * T * D * E if router.weight.requires_grad else 0.0
        if ex.gate_up_proj.requires_grad:
            ids_TK = rec["topk_ids_TK"]
            ok_TK = torch.ones_like(ids_TK, dtype=torch.bool)
            if trainable_LE is not None:
                ok_TK &= trainable_LE[l][ids_TK]
            if masks_LME is not None:
                ok_TK &= masks_LME[l][dom_T.clamp(min=0)][torch.arange(T, device=ids_TK.device)[:, None], ids_TK]
            n = float(ok_TK.sum())
            pairs_trainable += n / (T * K) / len(ctl.blocks)
            dw += 6.0 * n * D * I
    # attention's S x S products (no weights: forward, and dX where needed)
    H = cfg.num_attention_heads
    hd_qk = (getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0)
             or getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
    hd_v = getattr(cfg, "v_head_dim", None) or hd_qk
    att = 2.0 * B * S * S * H * (hd_qk + hd_v)
    fwd += att * n_layers
    dx += 2 * att * sum(1 for l in range(n_layers) if l >= low)
    return {"flops_fwd": fwd, "flops_dx": dx, "flops_dw": dw, "flops_alr_fwd_once": alr_fwd,
            "flops_alr_bwd": alr_bwd, "alr_evals_per_forward": (2 if kd and not shared else 1) if ctl.alr else 0,
            "flops_floor": fwd + dx + dw + alr_fwd + alr_bwd, "flops_as_run": fwd + dx + dw + alr_fwd + alr_bwd + extra,
            "expert_pairs_trainable_frac": pairs_trainable if ctl.experts[0].gate_up_proj.requires_grad else 0.0,
            "experts_trainable_frac": 1.0 if trainable_LE is None else float(trainable_LE.float().mean())}


# --- peak RSS of one method alone (CPU) ---------------------------------------------------------------------------
def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(name: str, quick: bool, steps: int) -> None:
    torch.set_flush_denormal(True)
    spec = QUICK if quick else CPU
    try:  # the peak from here on, not the imports' (Linux: writing 5 to clear_refs resets VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    v = Variant(name, spec, torch.device("cpu"), torch.float32)
    batch = make_batch(spec, torch.device("cpu"))
    for _ in range(steps):
        v.step(batch)
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb()}))


def peak_rss_alone(name: str, quick: bool, steps: int = 2) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_rss-child", name]
                         + (["--quick"] if quick else []), capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


# --- the run ----------------------------------------------------------------------------------------------------
def run(a) -> dict:
    cuda = torch.cuda.is_available() and not a.quick
    device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    spec = QUICK if a.quick else GPU if cuda else CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    iters = a.iters or (2 if a.quick else 7)
    batch = make_batch(spec, device)
    variants = {n: Variant(n, spec, device, dtype) for n in VARIANTS}
    variants["hf_plain"] = PlainHF(spec, device, dtype)  # the guard: desmoe's FFT step against transformers' own
    counts = {n: v.step(batch, count=True) for n, v in variants.items()}  # first step: counts, optimizer state made
    times = {n: [] for n in variants}
    peaks = {n: 0.0 for n in variants}
    for i in range(iters + 1):  # round 0 warms up
        for n, v in variants.items():
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            v.step(batch)
            if cuda:
                torch.cuda.synchronize()
                own = v.persistent_bytes()
                peaks[n] = max(peaks[n], (torch.cuda.max_memory_allocated() - before + own["param_bytes"]
                                          + own["opt_state_bytes"] + counts[n]["grad_bytes"]) / 1e9)
            if i:
                times[n].append((time.perf_counter() - t0) * 1e3)
    if not cuda and not a.no_rss:
        for n in VARIANTS:
            peaks[n] = peak_rss_alone(n, a.quick) / 1e3
    res = _common.header("method_cost", device)
    res.update(quick=a.quick, iters=iters, dtype=str(dtype).replace("torch.", ""), spec=spec,
               flush_denormal=device.type == "cpu", threads=torch.get_num_threads(),
               peak_mem_kind="cuda_allocated" if cuda else "rss" if not a.no_rss else None)
    tokens = batch["input_ids"].numel()
    acc = {n: flop_accounting(v, batch) for n, v in variants.items() if n in VARIANTS}
    acc["hf_plain"] = dict(acc["fft"], alr_evals_per_forward=0)  # the same model and work as FFT
    for n, v in variants.items():
        ms = sorted(times[n])[len(times[n]) // 2]
        res["records"].append({
            "shape": spec["shape"], "T": tokens, "impl": "desmoe" if n in VARIANTS else "torch", "pass": n,
            "method": VARIANTS[n][0] if n in VARIANTS else f"fft (transformers, experts {v.impl})",
            "ms": ms, "times_ms": [round(t, 2) for t in times[n]], "ratio_to_fft": None,
            "tflops": acc[n]["flops_as_run"] / (ms * 1e-3) / 1e12, "peak_mem_gb": peaks[n],
            "trainable_params": sum(p.numel() for p in v.model.parameters() if p.requires_grad),
            **counts[n], **v.persistent_bytes(), **acc[n]})
    fft = next(r for r in res["records"] if r["pass"] == "fft")
    for r in res["records"]:
        r["ratio_to_fft"] = r["ms"] / fft["ms"]
        r["floor_ratio_to_fft"] = r["flops_floor"] / fft["flops_floor"]
        r["as_run_ratio_to_fft"] = r["flops_as_run"] / fft["flops_as_run"]
        r["peak_mem_ratio_to_fft"] = r["peak_mem_gb"] / fft["peak_mem_gb"] if fft["peak_mem_gb"] else None
    plain = next(r for r in res["records"] if r["pass"] == "hf_plain")
    # the guard (goal >= 0.95): desmoe's FFT step speed relative to a plain transformers step, same run
    res["fft_speed_vs_plain_transformers"] = plain["ms"] / fft["ms"]
    return res


def readme_table(res: dict, path: str) -> str:
    label = f"**{res['label']}**: " if res.get("label") else ""
    head = label + (f"`{res['spec']['shape']}` ({res['records'][0]['T']} tokens/step, {res['dtype']}, {res['threads']} "
            f"thread(s)) on `{res['device']}` — torch {res['torch']}, transformers {res['transformers']}, "
            f"{res['date']}, git `{res['git_sha'][:10]}`, median of {res['iters']} interleaved steps (`{path}`)")
    mem = "peak RSS alone (MB)" if res.get("peak_mem_kind") == "rss" else "peak memory (GB)"
    lines = [head, "", f"| method / phase | step ms | × FFT step | FLOP floor × FFT | FLOPs as run × FFT | {mem} | "
                       "trainable params | AdamW state (MB) | grads (MB) | saved for bwd (MB) | expert pairs with dW |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        if r["pass"] not in VARIANTS:
            continue
        m = r["peak_mem_gb"] * 1e3 if res.get("peak_mem_kind") == "rss" else r["peak_mem_gb"]
        lines.append(f"| {r['pass']} | {r['ms']:.0f} | {r['ratio_to_fft']:.2f} | {r['floor_ratio_to_fft']:.2f} | "
                     f"{r['as_run_ratio_to_fft']:.2f} | {m:.0f} | {r['trainable_params']:,} | "
                     f"{r['opt_state_bytes'] / 1e6:.1f} | {r['grad_bytes'] / 1e6:.1f} | {r['saved_mb']:.0f} | "
                     f"{r['expert_pairs_trainable_frac']:.0%} |")
    if "fft_speed_vs_plain_transformers" in res:
        plain = next(r for r in res["records"] if r["pass"] == "hf_plain")
        lines += ["", f"Guard: desmoe's FFT step runs at **{res['fft_speed_vs_plain_transformers']:.2f}×** the speed "
                      f"of a plain transformers training step on the same model and batch, same run "
                      f"({plain['ms']:.0f} ms, {plain['method']}; goal ≥ 0.95×)."]
    return "\n".join(lines)


def update_readme(results_dir: str = _common.RESULTS_DIR,
                  readme: str = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                                             "method.md")):
    import glob

    blocks = []
    for path in sorted(glob.glob(os.path.join(results_dir, "method_cost-*.json"))):
        res = json.load(open(path))
        if not res.get("quick"):
            blocks.append(readme_table(res, os.path.relpath(path, os.path.dirname(readme))))
    text = open(readme).read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the markers {README_BEGIN!r} ... {README_END!r}")
    pre, rest = text.split(README_BEGIN, 1)
    _, post = rest.split(README_END, 1)
    with open(readme, "w") as f:
        f.write(pre + README_BEGIN + "\n" + ("\n\n".join(blocks) or "_No results committed yet._") + "\n"
                + README_END + post)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-rss", action="store_true", help="CPU: skip the per-method peak-RSS subprocesses")
    ap.add_argument("--update-readme", action="store_true", help="regenerate the README table from the committed JSON")
    ap.add_argument("--_rss-child", default=None, help=argparse.SUPPRESS)
    _common.add_output_args(ap)
    a = ap.parse_args(argv)
    if a._rss_child:
        return _rss_child(a._rss_child, a.quick, 2)
    if a.update_readme:
        return update_readme()
    out = _common.output_dir(a, quick=a.quick)
    res = run(a)
    path = _common.write_results(res, out) if out is not None else None
    print(f"guard: desmoe FFT step speed / plain transformers step = {res['fft_speed_vs_plain_transformers']:.3f} "
          f"(goal >= 0.95)")
    _common.print_table(res["records"], cols=("shape", "T", "pass", "ms", "ratio_to_fft", "floor_ratio_to_fft",
                                              "as_run_ratio_to_fft", "peak_mem_gb", "opt_state_bytes", "grad_bytes",
                                              "saved_mb"))
    if path:
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
