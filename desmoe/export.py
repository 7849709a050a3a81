"""The trained model as users load it: ``from_pretrained`` (desmoe, with the ALR) and ``export`` (stock HF).

A DES-MoE checkpoint's ``model/`` folder holds the pretrained *linear* routers: the trained routing is that
router plus the ALR residual MLP (``model/desmoe_alr.safetensors``), which stock transformers, vLLM or SGLang do
not know. So:

* :func:`from_pretrained` loads ``model/`` + the ALR exactly as trained (domain-free: no data, no method state).
* :func:`export` writes a stock Hugging Face model whose linear routers are *fitted*, per layer, to reproduce
  the trained routing (base + ALR) on hidden states of the training domains: ridge least squares on the router's
  logits, pulled towards the pretrained weight, solved in float64 from accumulated ``X^T X`` and ``X^T Z`` (memory
  O(D^2) per layer, whatever the token count). It measures, on held-out text, the share of tokens whose top-k
  expert set is unchanged, per layer, and the held-out loss of the exported model (loaded back with plain
  transformers, no desmoe) next to the trained one; below ``min_agreement`` it warns, or refuses and writes
  nothing. With ``layer_by_layer`` every forward runs one decoder layer at a time on the device, the model in host
  memory (:mod:`desmoe.export_layers`), for a model larger than the device.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from .export_layers import decoder_layers, layer_major_heads, run_layer_major
from .export_writer import ExportError, export_architecture, parse_size, serving_engines, write_weights_streaming
from .export_writer import SERVING_ARCHITECTURES  # noqa: F401  (re-exported: desmoe.export.SERVING_ARCHITECTURES)

EXPORT_REPORT = "desmoe_export.json"


def _is_hf_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def _model_dir(path: str) -> str:
    """``path`` itself if it holds an HF ``config.json``; else its checkpoint's ``model/`` (run dirs resolve to
    their latest checkpoint). A desmoe checkpoint (also when ``path`` is its ``model/``) is verified against its
    manifest, as ``desmoe eval`` does; every model folder's files are checked before transformers reads them
    (:func:`desmoe.train.checkpoint.check_model_files`: safetensors only, whole JSON and headers)."""
    from .train import checkpoint as ck

    if not isinstance(path, str) or not path:
        raise ExportError(f"path must be a non-empty str, got {path!r}")
    desmoe_dir = any(os.path.isfile(os.path.join(path, f)) for f in ("meta.json", ck.MANIFEST, ck.LATEST))
    if _is_hf_folder(path) or (os.path.isfile(os.path.join(path, "config.json")) and not desmoe_dir):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.basename(os.path.abspath(path)) == "model" and os.path.isfile(os.path.join(parent, ck.MANIFEST)):
            ck.open_checkpoint(parent)
        ck.check_model_files(path)
        return path
    try:
        ckpt = ck.resolve_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{path!r} is neither a Hugging Face model folder nor a desmoe run/checkpoint: {e}") from None
    ck.open_checkpoint(ckpt)  # manifest: truncation, bit flips, planted files, FSDP2 state
    mdir = os.path.join(ckpt, "model")
    if not os.path.isfile(os.path.join(mdir, "config.json")):
        raise ExportError(f"checkpoint {ckpt!r} has no model/config.json")
    ck.check_model_files(mdir)
    return mdir


def from_pretrained(path: str, *, device="cpu", dtype=torch.float32, backend: str = "auto"):
    """``(model, tokenizer)``: the model exactly as trained — patched with desmoe, with the ALR residuals if it
    was trained with them — in eval mode. ``path``: a run directory (latest checkpoint), a checkpoint directory,
    or a model folder. No domain, data or method state is needed. A desmoe checkpoint is verified against its
    manifest first, and only safetensors weights are read (nothing in a received folder runs)."""
    if not isinstance(device, torch.device):
        from .train.config import check_device_available

        check_device_available("device", str(device))
    return _load_model_dir(_model_dir(path), device=device, dtype=dtype, backend=backend)


def _load_model_dir(mdir: str, *, device, dtype, backend):
    """:func:`from_pretrained` of a folder :func:`_model_dir` returned (already checked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.hf import patch
    from .method.alr_files import ALRFileError, load_alr_

    try:  # safetensors only, no remote code: nothing in a received folder runs
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        tok = (AutoTokenizer.from_pretrained(mdir, trust_remote_code=False)
               if os.path.isfile(os.path.join(mdir, "tokenizer.json")) else None)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a damaged folder
        msg = str(e).strip().splitlines()
        raise ExportError(f"cannot load the model in {mdir!r} ({msg[0] if msg else type(e).__name__})") from None
    patch(model, backend=backend)
    try:
        load_alr_(model, mdir)
    except ALRFileError as e:
        raise ExportError(str(e)) from None
    model.to(device).eval()
    return model, tok


# --- fitting linear routers to the trained routing -------------------------------------------------------------
def _logits_and_ids(mod, out) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's ``(logits_TE, ids_TK)`` from its forward output, whichever order its family returns."""
    return (out[2], out[0]) if mod.index_first else (out[0], out[2])


class _RouterStats:
    """Per router: float64 ``X^T X`` [D, D], ``X^T Z`` [D, E] and the token count, accumulated by forward hooks."""

    def __init__(self, routers):
        self.routers = routers
        D, E = routers[0].hidden_dim, routers[0].num_experts
        self.xtx = [torch.zeros(D, D, dtype=torch.float64) for _ in routers]
        self.xtz = [torch.zeros(D, E, dtype=torch.float64) for _ in routers]
        self.n = 0
        self.mask_T: torch.Tensor | None = None  # valid (non-padding) tokens of the current batch

    def hook(self, i):
        def fn(mod, args, out):
            x = args[0].reshape(-1, mod.hidden_dim).detach().to(torch.float64).cpu()
            z = _logits_and_ids(mod, out)[0].detach().to(torch.float64).cpu()
            b = mod.logits_bias()  # gpt-oss: the router keeps its bias; the weight is fitted to logits - bias
            if b is not None:
                z = z - b.detach().to(torch.float64).cpu()
            if self.mask_T is not None:
                x, z = x[self.mask_T], z[self.mask_T]
            self.xtx[i] += x.T @ x
            self.xtz[i] += x.T @ z
            if i == 0:
                self.n += x.shape[0]
        return fn


def _forward_all(model, batches, before_batch, *, layer_by_layer: bool, device) -> None:
    """``model`` on every batch, ``before_batch(batch)`` first: whole on its own device, or layer-major on ``device``
    (:func:`desmoe.export_layers.run_layer_major`; the router hooks fire the same, batch after batch per layer)."""
    from .data.packing import packed_forward

    if layer_by_layer:
        run_layer_major(model, list(batches), device="cpu" if device is None else device, before_batch=before_batch)
        return
    dev = next(model.parameters()).device
    with torch.no_grad():
        for b in batches:
            before_batch(b)
            packed_forward(model, b, device=dev)


def fit_linear_routers(model, batches, *, ridge: float = 1e-3, layer_by_layer: bool = False,
                       device=None) -> list[torch.Tensor]:
    """Per router, the weight ``[E, D]`` minimising ``||X W^T - Z||^2 + mu ||W - W0||^2`` where X are the router
    inputs and Z the trained router's logits (base + ALR) on ``batches``, W0 the pretrained weight and
    ``mu = ridge * mean(diag(X^T X))``. Returns float32 CPU tensors; the model is not changed. ``layer_by_layer``:
    the model stays in host memory, one decoder layer at a time runs on ``device`` (default cpu)."""
    from .integrations.hf import routers as get_routers

    routers = get_routers(model)
    if not routers:
        raise ExportError("the model has no desmoe routers (was it patched?)")
    stats = _RouterStats(routers)
    handles = [r.register_forward_hook(stats.hook(i)) for i, r in enumerate(routers)]

    def before(b):
        am = b.get("attention_mask")
        stats.mask_T = None if am is None else am.reshape(-1).bool()

    try:
        _forward_all(model, batches, before, layer_by_layer=layer_by_layer, device=device)
    finally:
        for h in handles:
            h.remove()
    if stats.n == 0:
        raise ExportError("no tokens to fit the routers on (the training domains gave no text)")
    out = []
    for r, xtx, xtz in zip(routers, stats.xtx, stats.xtz):
        w0 = r.weight.detach().to("cpu", torch.float64)
        mu = ridge * float(xtx.diagonal().mean().clamp(min=1e-12))
        eye = torch.eye(xtx.shape[0], dtype=torch.float64)
        wt = torch.linalg.solve(xtx + mu * eye, xtz + mu * w0.T)
        out.append(wt.T.to(torch.float32).contiguous())
    return out


def routing_agreement(model, weights: list[torch.Tensor], batches, *, layer_by_layer: bool = False,
                      device=None) -> list[dict]:
    """Per router, on ``batches``: the share of tokens whose top-k expert set under the candidate linear weight
    equals the trained router's (``topk_exact``), and the mean share of the k experts kept (``topk_overlap``).
    ``layer_by_layer``: as in :func:`fit_linear_routers`."""
    from . import ops
    from .integrations.hf import routers as get_routers

    routers = get_routers(model)
    exact = [0] * len(routers)
    overlap = [0.0] * len(routers)
    n = [0]
    mask = {"T": None}

    def hook(i):
        def fn(mod, args, out):
            x = args[0].reshape(-1, mod.hidden_dim).detach()
            ids = _logits_and_ids(mod, out)[1].detach()
            s = mod.spec
            lb = mod.logits_bias()
            logits = torch.nn.functional.linear(x.float(), weights[i].to(x.device),
                                                None if lb is None else lb.detach().float())
            bias = args[1] if len(args) > 1 and args[1] is not None else mod.bias_E()  # LFM2 passes it in
            _, cand = ops.topk_route(logits, s, bias_E=bias, backend="reference")
            if mask["T"] is not None:
                m = mask["T"].to(ids.device)
                ids, cand = ids[m], cand[m]
            a, b = ids.sort(-1).values, cand.sort(-1).values
            exact[i] += int((a == b).all(-1).sum())
            same = (ids.unsqueeze(-1) == cand.unsqueeze(-2)).any(-1).sum(-1)
            overlap[i] += float(same.double().sum() / s.top_k)
            if i == 0:
                n[0] += ids.shape[0]
        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]

    def before(b):
        am = b.get("attention_mask")
        mask["T"] = None if am is None else am.reshape(-1).bool()

    try:
        _forward_all(model, batches, before, layer_by_layer=layer_by_layer, device=device)
    finally:
        for h in handles:
            h.remove()
    tot = max(n[0], 1)
    return [{"layer": i, "topk_exact": exact[i] / tot, "topk_overlap": overlap[i] / tot, "tokens": n[0]}
            for i in range(len(routers))]


# --- export ----------------------------------------------------------------------------------------------------
def _domain_batches(cfg, tok, split: str, names: list[str], max_tokens: int) -> dict[str, tuple[list, list[dict]]]:
    """Per domain: its token documents and the (at most ``max_tokens``) batches built from them."""
    from .data import eval_batches, tokenize_domains
    from .train.builders import load_texts

    max_docs = cfg.data.max_docs if split == "train" else cfg.data.eval_max_docs
    docs = tokenize_domains(tok, load_texts(cfg, names, split, max_docs))  # held-out: the trainer's eval docs
    per_batch = cfg.data.seq_len * cfg.data.batch_size
    max_batches = max(1, max_tokens // per_batch)
    return {d: (docs[d], list(eval_batches(docs[d], cfg.data.seq_len, cfg.data.batch_size, tok.eos_token_id,
                                           max_batches=max_batches, packing=cfg.data.packing))) for d in names}


def _held_out_loss(model, cfg, tok, batches_by_domain: dict[str, list[dict]], *, layer_by_layer: bool = False,
                   device="cpu") -> dict[str, float]:
    """Per-domain held-out loss over exactly the batches in ``batches_by_domain`` (via :func:`desmoe.eval.domain_loss`,
    which rebuilds the same batches from the documents). ``layer_by_layer``: one layer-major pass over all domains'
    batches on ``device``, then ``domain_loss`` on the model's own head over the stored last-layer outputs
    (:func:`desmoe.export_layers.layer_major_heads`)."""
    from .eval import domain_loss

    def loss(m, docs, n, dev):
        return domain_loss(m, docs, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                           eos_id=tok.eos_token_id, max_batches=n, device=dev, packing=cfg.data.packing)["loss"]

    if not layer_by_layer:
        dev = next(model.parameters()).device
        return {d: loss(model, docs, len(batches), dev) for d, (docs, batches) in batches_by_domain.items()}
    with layer_major_heads(model, {d: bs for d, (_, bs) in batches_by_domain.items()}, device=device) as heads:
        return {d: loss(heads[d], docs, len(batches), torch.device(device))
                for d, (docs, batches) in batches_by_domain.items()}


EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def export(checkpoint: str, out_dir: str, *, fit_tokens: int = 65536, eval_tokens: int = 16384,
           min_agreement: float = 0.9, on_low: str = "warn", ridge: float = 1e-3, overwrite: bool = False,
           device: str = "cpu", dtype: str = "auto", max_shard_size: str | int = "5GB",
           layer_by_layer: bool = False) -> dict:
    """Write a stock Hugging Face model to ``out_dir`` that routes like the trained checkpoint; returns the report
    (also written to ``out_dir/desmoe_export.json``). See the module docstring.

    ``dtype``: the weights' dtype on disk: ``"auto"`` is the run's training dtype (``model.dtype``: bf16 for a bf16
    run, whose masters were fp32), else ``float32``/``bfloat16``/``float16``. ``max_shard_size``: safetensors
    shards of at most this size with an index, as ``save_pretrained`` writes them. The agreement gate
    (``min_agreement``) is judged on the validation split; the test split's agreement and losses are reported.
    ``layer_by_layer``: the models stay in host memory and every forward (fit, agreement, both held-out losses) runs
    one decoder layer at a time on ``device`` (:mod:`desmoe.export_layers`), for a model larger than the device."""
    from transformers import AutoModelForCausalLM

    from .integrations.hf import routers as get_routers
    from .integrations.hf import unpatch
    from .train import checkpoint as ck

    if on_low not in ("warn", "refuse"):
        raise ExportError(f"on_low must be 'warn' or 'refuse', got {on_low!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ExportError(f"min_agreement must be in [0, 1], got {min_agreement!r}")
    for name, v in (("fit_tokens", fit_tokens), ("eval_tokens", eval_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ExportError(f"{name} must be an int >= 1, got {v!r}")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if not isinstance(layer_by_layer, bool):
        raise ExportError(f"layer_by_layer must be a bool, got {layer_by_layer!r}")
    from .train.config import check_device_available

    check_device_available("device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    load_on = "cpu" if layer_by_layer else device  # layer by layer: the model in host memory
    lbl = {"layer_by_layer": layer_by_layer, "device": device}  # how every forward below runs
    _check_out(out_dir, overwrite)
    mdir = _model_dir(checkpoint)
    ckpt = os.path.dirname(mdir)
    if not os.path.isfile(os.path.join(ckpt, "config.json")) and ck.run_config_path(ckpt) is None:
        raise ExportError(f"no config.yaml beside checkpoint {ckpt!r}: the training domains to fit on are unknown")
    from .train.evaluate import checkpoint_config

    # the checkpoint's own config (manifest-covered), not a config.yaml edited since; a difference is reported
    cfg = checkpoint_config(ckpt, log=lambda m: warnings.warn(m, stacklevel=2))
    model, tok = _load_model_dir(mdir, device=load_on, dtype=torch.float32,
                                 backend="reference" if device == "cpu" else "auto")
    if tok is None:
        raise ExportError(f"checkpoint {ckpt!r} has no tokenizer in model/")
    if layer_by_layer:
        decoder_layers(model)  # refused before any work when its layers cannot be found
    routers = get_routers(model)
    has_alr = any(r.residual is not None for r in routers)
    names = cfg.data.eval_domains()
    held = _domain_batches(cfg, tok, "test", names, eval_tokens)
    val = _domain_batches(cfg, tok, "validation", names, eval_tokens)  # the gate's split (model selection)
    if has_alr:
        fit = _domain_batches(cfg, tok, "train", list(cfg.data.domains), fit_tokens)
        weights = fit_linear_routers(model, [b for _, bs in fit.values() for b in bs], ridge=ridge, **lbl)
        agree_val = routing_agreement(model, weights, [b for _, bs in val.values() for b in bs], **lbl)
        agree = routing_agreement(model, weights, [b for _, bs in held.values() for b in bs], **lbl)
    else:  # nothing to fit: the linear routers are the trained routers
        weights = [r.weight.detach().float().cpu() for r in routers]
        agree = [{"layer": i, "topk_exact": 1.0, "topk_overlap": 1.0, "tokens": 0} for i in range(len(routers))]
        agree_val = agree
    worst = min(a["topk_exact"] for a in agree_val)
    low = worst < min_agreement
    msg = (f"exported routers reproduce the trained top-k set on {worst:.1%} of validation tokens in the worst "
           f"layer (min_agreement {min_agreement:.1%})")
    if low and on_low == "refuse":
        raise ExportError(msg + "; nothing written (use --on-low warn to export anyway)")
    trained_loss = _held_out_loss(model, cfg, tok, held, **lbl)
    parse_size(max_shard_size)
    for r in routers:
        r.residual = None
    unpatch(model)
    ids = {id(r.weight): i for i, r in enumerate(routers)}  # the same Parameters as the HF routers'
    replace = {n: weights[ids[id(p)]] for n, p in model.named_parameters() if id(p) in ids}
    if len(replace) != len(routers):
        raise ExportError(f"found {len(replace)} of the {len(routers)} router weights among the model's parameters")
    config, gen = model.config, getattr(model, "generation_config", None)
    config.architectures = [export_architecture(type(model).__name__)]
    del model, routers  # the weights are written from the checkpoint's files, one shard at a time
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    out_dtype = cfg.model.dtype if dtype == "auto" else dtype
    try:  # written to OUT.tmp-export, renamed when whole; removed on any failure (full disk, Ctrl-C, ...)
        config.dtype = out_dtype
        config.save_pretrained(tmp)
        if gen is not None:
            gen.save_pretrained(tmp)
        write_weights_streaming(mdir, tmp, replace=replace, dtype=getattr(torch, out_dtype),
                                max_shard_size=max_shard_size)
        tok.save_pretrained(tmp)
        # plain transformers, in the dtype written (what a server loads)
        stock = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, out_dtype)).to(load_on).eval()
        exported_loss = _held_out_loss(stock, cfg, tok, held, **lbl)
        report = {"checkpoint": os.path.normpath(ckpt), "had_alr": has_alr, "fit_tokens_per_domain": fit_tokens,
                  "ridge": ridge, "agreement": agree, "agreement_validation": agree_val, "gate_split": "validation",
                  "min_topk_exact": worst, "min_agreement": min_agreement, "below_threshold": low,
                  "layer_by_layer": layer_by_layer, "device": device,
                  "dtype": out_dtype, "architectures": list(getattr(stock.config, "architectures", None) or []),
                  "serving": {"transformers": True, **serving_engines(stock.config.architectures)},
                  "serving_note": "a stock transformers checkpoint (config, safetensors, tokenizer; no desmoe keys): "
                                  "loaded by transformers (checked here); vllm/sglang: true when the engine "
                                  "registers the config's architecture name (desmoe.export.SERVING_ARCHITECTURES; "
                                  "not run here)",
                  "held_out_loss": {d: {"trained": trained_loss[d], "exported": exported_loss[d],
                                        "delta": exported_loss[d] - trained_loss[d]} for d in held}}
        with open(os.path.join(tmp, EXPORT_REPORT), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from .train.durable import describe_error, is_write_fault

        if isinstance(e, Exception) and is_write_fault(e):
            raise ExportError(f"cannot write the exported model to {out_dir!r} ({describe_error(e)}); nothing was "
                              f"written (the temporary folder {tmp!r} was removed)") from None
        raise
    if low:
        warnings.warn(msg, stacklevel=2)
    report["out_dir"] = os.path.normpath(out_dir)
    return report


def _check_out(out_dir: str, overwrite: bool) -> None:
    """``--out`` checked before any work: not a file, not non-empty (unless ``overwrite``), its parent a
    writable directory (the export is written beside it, to ``OUT.tmp-export``)."""
    if not isinstance(out_dir, str) or not out_dir.strip("/"):
        raise ExportError(f"--out must be a folder path, got {out_dir!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir!r} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir!r} exists and is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out_dir.rstrip("/")))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ExportError(f"--out {out_dir!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"--out {out_dir!r}: {parent!r} is not writable")


def format_report(rep: dict) -> str:
    lines = [f"{'layer':>5}  {'top-k exact (validation, gate)':>30}  {'top-k exact (test)':>18}  "
             f"{'top-k overlap (test)':>20}"]
    for v, a in zip(rep.get("agreement_validation", rep["agreement"]), rep["agreement"]):
        lines.append(f"{a['layer']:>5}  {v['topk_exact']:>30.3f}  {a['topk_exact']:>18.3f}  {a['topk_overlap']:>20.3f}")
    lines.append(f"{'domain':<14}{'trained':>9}{'exported':>10}{'delta':>9}")
    for d, r in rep["held_out_loss"].items():
        lines.append(f"{d:<14}{r['trained']:>9.4f}{r['exported']:>10.4f}{r['delta']:>+9.4f}")
    if rep["below_threshold"]:
        lines.append(f"WARNING: the worst layer agrees on {rep['min_topk_exact']:.1%} of validation tokens, below "
                     f"{rep['min_agreement']:.1%}")
    if "dtype" in rep:
        lines.append(f"weights written in {rep['dtype']} ({', '.join(rep.get('architectures') or ['?'])})")
    if isinstance(rep.get("serving"), dict):
        lines.append("serving engines loading it unmodified: " + ", ".join(
            f"{e} {'yes' if ok else 'no (architecture not registered)'}" for e, ok in rep["serving"].items()))
    return "\n".join(lines)
