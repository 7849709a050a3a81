"""Layer-major ("sequential calibration") forwards for ``desmoe export --layer-by-layer``: a model larger than one
device's memory stays in host memory (CPU) and only one decoder layer at a time sits on the compute device, the way
GPTQ / AWQ / llm-compressor calibrate.

One pass over ``batches``:

1. **capture** — the small modules outside the decoder layers (embeddings, rotary, final norm, LM head; for a
   vision-language model its vision tower too) are moved to the device, and every decoder layer is replaced, in its
   ``nn.ModuleList``, by a stand-in that records the call it gets (hidden states, positional and keyword arguments:
   position embeddings, the mask *of that layer* — sliding-window and linear-attention layers get their own —,
   ``position_ids`` ...) and passes the hidden states through; the last one stops the forward. The model is called
   through :func:`desmoe.data.packed_forward`, so what is recorded is exactly what the model gives its layers for
   that batch. A KV cache the model makes for itself (a forward with ``use_cache``) is dropped: one forward over a
   fresh cache attends to exactly the keys it computes.
2. **layers** — for each decoder layer in turn: moved to the device, every batch's hidden states run through it
   (its recorded arguments moved to the device), the outputs kept, the layer moved back to the host. Router hooks
   fire inside the layer as in a whole-model forward, batch after batch.
3. **head** (held-out losses) — :func:`layer_major_heads` gives, per group of batches, a module that
   :func:`desmoe.eval.domain_loss` calls like the model: the model's own forward with every decoder layer replaced by
   the stored output of the last one, so embeddings, masks, the final norm, the LM head (and any logit scaling of
   the family) and the loss are the model's and ``domain_loss``'s own code.

Where things live: parameters in host memory except one decoder layer and the modules outside the layers; the
hidden states of every batch (tokens x D in the model's dtype) and the recorded arguments in host memory, each
moved to the device for its layer's forward. Every layer is moved to the device once and back once per pass.

It needs a model whose forward calls each decoder layer once, in order, with nothing between two layers that
changes the hidden states (true of every family in :data:`desmoe.integrations.families.MODEL_TYPES` for text
input); a model that does otherwise, or whose decoder layers cannot be found, is refused with an
:class:`~desmoe.export_writer.ExportError`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .export_writer import ExportError

HOST = torch.device("cpu")


class _Stop(Exception):
    """Raised by the last stand-in: the capture has what it needs, the rest of the forward is not run."""


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder layers: the first ``nn.ModuleList`` whose modules' class names all end in
    ``DecoderLayer`` (``model.model.layers`` for a causal LM), else :class:`ExportError` naming what was expected."""
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(
                type(m).__name__.endswith("DecoderLayer") for m in mod):
            return mod
    raise ExportError(f"layer-by-layer export: {type(model).__name__} has no decoder layers to run one at a time "
                      f"(expected an nn.ModuleList of modules whose class names end in 'DecoderLayer', like "
                      f"model.model.layers of a transformers causal LM); export without --layer-by-layer")


def _to_device(layer: nn.Module, device: torch.device) -> None:
    """One decoder layer onto the compute device (the only place a layer goes there)."""
    layer.to(device)


def _to_host(layer: nn.Module) -> None:
    """One decoder layer back to host memory."""
    layer.to(HOST)


def _outside_to(model, layers: nn.ModuleList, device) -> None:
    """Everything of ``model`` but ``layers`` to ``device``: whole subtrees beside the path to ``layers``, and the
    path's own parameters and buffers."""
    name = next(n for n, m in model.named_modules() if m is layers)
    path = [model]
    for part in name.split(".") if name else []:
        path.append(getattr(path[-1], part))
    for p in path[:-1]:
        p._apply(lambda t: t.to(device), recurse=False)
        for child in p.children():
            if child is not layers and not any(child is q for q in path):
                child.to(device)


def _is_cache(obj) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported transformers has it
        Cache = ()
    return isinstance(obj, Cache) or type(obj).__name__.endswith("Cache")


def _moved(obj, device, memo: dict):
    """``obj`` with its tensors on ``device`` (each tensor moved once per ``memo``: a mask shared by every layer stays
    one tensor); tuples, lists and dicts walked; a KV cache dropped (None); anything else as it is."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.detach().to(device))  # the source kept alive, so its id is not reused
        return memo[key][1]
    if isinstance(obj, (tuple, list)):
        items = [_moved(x, device, memo) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: _moved(v, device, memo) for k, v in obj.items()}
    if _is_cache(obj):
        return None
    to = getattr(obj, "to", None)  # a flex-attention BlockMask
    if callable(to) and not isinstance(obj, nn.Module) and type(obj).__name__ == "BlockMask":
        return to(device)
    return obj


class _StandIn(nn.Module):
    """Takes decoder layer ``i``'s place in its list: records the call (capture) or feeds a stored output (head).
    Attributes the model's loop reads off a layer (``attention_type`` ...) are the layer's."""

    def __init__(self, layer, i: int, on_call):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: no parameters of its own
        self._i = i
        self._on_call = on_call

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args, **kwargs):
        return self._on_call(self._i, args, kwargs)


@contextlib.contextmanager
def _standing_in(layers: nn.ModuleList, on_call):
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _StandIn(layer, i, on_call)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _hidden_of(args, kwargs) -> torch.Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise ExportError("layer-by-layer export: a decoder layer was called without hidden states (expected a "
                          "tensor as its first argument or as hidden_states=)")
    return h


def _capture(model, layers: nn.ModuleList, batch: dict, device) -> tuple[torch.Tensor, list]:
    """Layer 0's input hidden states and, per decoder layer, ``(positional, args, kwargs)`` of its call on ``batch``
    (all on the host)."""
    from .data.packing import packed_forward

    calls: list = []
    memo: dict = {}
    state = {"h0": None, "last": None}

    def on_call(i, args, kwargs):
        h = _hidden_of(args, kwargs)
        if i != len(calls):
            raise ExportError(f"layer-by-layer export: {type(model).__name__} called decoder layer {i} after "
                              f"{len(calls)} layer(s); it needs a model that calls each decoder layer once, in order")
        if i == 0:
            state["h0"] = h.detach().to(HOST)
        elif h.data_ptr() != state["last"].data_ptr():
            raise ExportError(f"layer-by-layer export: {type(model).__name__} changes the hidden states between "
                              f"decoder layers {i - 1} and {i} (e.g. visual features added); running its layers one "
                              f"at a time would skip that; export without --layer-by-layer")
        positional = bool(args)
        rest = args[1:] if positional else ()
        kw = dict(kwargs)
        if not positional:
            kw.pop("hidden_states")
        calls.append((positional, _moved(rest, HOST, memo), _moved(kw, HOST, memo)))
        state["last"] = h
        if i == len(layers) - 1:
            raise _Stop
        return h

    with _standing_in(layers, on_call):
        try:
            packed_forward(model, batch, device=device)
        except _Stop:
            pass
        else:
            raise ExportError(f"layer-by-layer export: {type(model).__name__}'s forward called {len(calls)} of its "
                              f"{len(layers)} decoder layers; it needs a model that calls each one once, in order")
    return state["h0"], calls


def _run_layers(model, layers, batches: list[dict], device, before_batch) -> tuple[list[torch.Tensor], bool]:
    """Steps 1-2 of the module docstring (the modules outside the layers already on ``device``): the last decoder
    layer's output per batch (host) and whether the layers return tuples."""
    hidden, calls = [], []
    for b in batches:
        h, c = _capture(model, layers, b, device)
        hidden.append(h)
        calls.append(c)
    tuple_out = False
    for i, layer in enumerate(layers):
        _to_device(layer, device)
        try:
            for j, b in enumerate(batches):
                if before_batch is not None:
                    before_batch(b)
                positional, rest, kw = calls[j][i]
                memo: dict = {}
                h = hidden[j].to(device)
                rest, kw = _moved(rest, device, memo), _moved(kw, device, memo)
                out = layer(h, *rest, **kw) if positional else layer(**kw, hidden_states=h)
                tuple_out = isinstance(out, tuple)
                hidden[j] = (out[0] if tuple_out else out).detach().to(HOST)
                calls[j][i] = None  # this layer's arguments are not needed again
        finally:
            _to_host(layer)
    return hidden, tuple_out


@contextlib.contextmanager
def _outside_on(model, layers, device):
    _outside_to(model, layers, device)
    try:
        yield
    finally:
        _outside_to(model, layers, HOST)


@torch.no_grad()
def run_layer_major(model, batches: list[dict], *, device, before_batch=None) -> list[torch.Tensor]:
    """Run ``model`` (in host memory) on every batch one decoder layer at a time on ``device``;
    ``before_batch(batch)`` is called before each batch's forward through each layer (set a hook's per-batch state
    there). Returns the last decoder layer's output per batch (host). The model is left in host memory."""
    device = torch.device(device)
    layers = decoder_layers(model)
    with _outside_on(model, layers, device):
        return _run_layers(model, layers, list(batches), device, before_batch)[0]


class _Head(nn.Module):
    """What :func:`desmoe.eval.domain_loss` calls in place of the model for one group of batches: the model's own
    forward, its decoder layers standing in for the stored output of the last one. ``module``: the model (as a
    wrapper's, so :func:`desmoe.data.packing.check_isolated_packing` checks the model itself)."""

    def __init__(self, model, batches: list[dict], finals: list[torch.Tensor], feed: dict):
        super().__init__()
        self.module = model
        self._batches, self._finals, self._feed = batches, finals, feed
        self._j = 0
        self.training = model.training  # domain_loss restores the mode it finds (train(was) recurses into model)

    def forward(self, **kwargs):
        j = self._j
        ids = kwargs["input_ids"]
        if j >= len(self._batches) or not torch.equal(ids.to(HOST).reshape(self._batches[j]["input_ids"].shape),
                                                      self._batches[j]["input_ids"]):
            raise RuntimeError(f"layer-by-layer head: batch {j} is not the batch the layers ran on")
        self._feed["h"] = self._finals[j]
        self._j += 1
        return self.module(**kwargs)


@contextlib.contextmanager
def layer_major_heads(model, batches_by_key: dict, *, device):
    """One layer-major pass over every group's batches; yields ``{key: module}`` where each module, called on that
    group's batches in order (as :func:`desmoe.eval.domain_loss` does), returns the model's output (logits) for
    them — equal to a whole-model forward's. The model is left in host memory."""
    device = torch.device(device)
    layers = decoder_layers(model)
    keys = list(batches_by_key)
    flat = [b for k in keys for b in batches_by_key[k]]
    with _outside_on(model, layers, device):
        with torch.no_grad():
            finals, tuple_out = _run_layers(model, layers, flat, device, None)
        feed: dict = {"h": None}

        def on_call(i, args, kwargs):
            h = feed["h"].to(device) if i == 0 else _hidden_of(args, kwargs)
            return (h,) if tuple_out else h

        heads, at = {}, 0
        for k in keys:
            n = len(batches_by_key[k])
            heads[k] = _Head(model, list(batches_by_key[k]), finals[at:at + n], feed)
            at += n
        with _standing_in(layers, on_call):
            yield heads
