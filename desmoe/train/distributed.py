"""torchrun support: process group, DDP / FSDP2 wrapping, and the few collectives the loop needs.

``train.distributed: ddp|fsdp2`` with ``torchrun --nproc-per-node N -m desmoe.train --config C.yaml ...``.
Backend: NCCL on CUDA, gloo on CPU. ``data.batch_size`` is per rank; rank ``r`` reads rows ``r*B..r*B+B-1`` of
every global batch (``MixedDomainStream(rank=r, world_size=N)``), so N ranks see exactly the rows one process
with ``batch_size = N*B`` sees.
"""
from __future__ import annotations

import os

import torch


class Dist:
    """Rank/world of this process and thin collectives that are no-ops in a single process."""

    def __init__(self, mode: str = "none"):
        self.mode = mode
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.owns_group = False

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, mode: str, device_cfg: str = "auto") -> "Dist":
        d = cls(mode)
        if mode == "none":
            return d
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError(f"train.distributed={mode!r} but this torch build has no torch.distributed")
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ValueError(f"train.distributed={mode!r} needs the torchrun environment (missing "
                                 f"{', '.join(missing)}): launch with `torchrun --nproc-per-node N -m desmoe.train "
                                 f"--config C.yaml --output-dir DIR`, or set train.distributed=none")
            cuda = torch.cuda.is_available() and not str(device_cfg).startswith("cpu")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
            d.owns_group = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
        d.local_rank = int(os.environ.get("LOCAL_RANK", d.rank))
        return d

    def device(self, base: torch.device) -> torch.device:
        if self.enabled and base.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return base

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over ranks (``sum`` or ``max``); CPU tensors go through gloo, CUDA ones through NCCL."""
        if self.enabled:
            import torch.distributed as dist

            rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            dev = _coll_device(t.device)
            if t.device == dev:
                dist.all_reduce(t, op=rop)
            else:  # NCCL reduces CUDA tensors only: small CPU tensors (counters, flags) make a round trip
                tmp = t.to(dev)
                dist.all_reduce(tmp, op=rop)
                t.copy_(tmp.to(t.device))
        return t

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def routing_snapshot(tracker) -> tuple[torch.Tensor, torch.Tensor]:
    return tracker.counts_LME.clone(), tracker.load_LE.clone()


def sync_routing_stats_(tracker, snap: tuple[torch.Tensor, torch.Tensor] | None, dist: Dist) -> None:
    """Make the affinity tracker's counts ``snap`` (taken after the previous sync, identical on every rank) plus
    the sum over ranks of what each rank observed since. Integer sums: every rank then holds the same counts,
    hence the same A and masks, as one process that saw the whole global batch."""
    if not dist.enabled:
        return
    if snap is not None and snap[0].shape == tracker.counts_LME.shape:
        base_c, base_l = snap
        delta_c = tracker.counts_LME - base_c.to(tracker.counts_LME.device)
        delta_l = tracker.load_LE - base_l.to(tracker.load_LE.device)
    else:
        delta_c, delta_l = tracker.counts_LME.clone(), tracker.load_LE.clone()
        base_c, base_l = torch.zeros_like(delta_c), torch.zeros_like(delta_l)
    flat = dist.all_reduce_(torch.cat([delta_c.reshape(-1), delta_l.reshape(-1)]))
    dev = flat.device
    n = delta_c.numel()
    tracker.counts_LME = base_c.to(dev) + flat[:n].view_as(delta_c)
    tracker.load_LE = base_l.to(dev) + flat[n:].view_as(delta_l)


def global_means(dist: Dist, task, kd, n_task, n_kd):
    """Global-batch means of the task and added loss, and each rank's rescaling of its own mean: the averaged
    DDP gradient is then the gradient of the global-batch mean (what one process would compute)."""
    W = dist.world
    zero = torch.zeros((), dtype=torch.float64, device=task.device)
    red = torch.stack([task.detach().double() * n_task, n_task,
                       (kd.detach().double() if kd is not None else zero) * n_kd, n_kd]).cpu()
    dist.all_reduce_(red)
    g_task = float(red[0] / red[1].clamp(min=1))
    g_kd = float(red[2] / red[3].clamp(min=1)) if kd is not None else None
    s_task = float(n_task) * W / float(red[1].clamp(min=1)) if W > 1 else 1.0
    s_kd = float(n_kd) * W / float(red[3].clamp(min=1)) if W > 1 else 1.0
    return g_task, g_kd, s_task, s_kd


def _coll_device(dev: torch.device) -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """DDP over the parameters that train *now*. Frozen parameters are not registered, so they cost no
    communication and raise no unused-parameter error; the loop re-wraps when a phase changes ``requires_grad``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=False)


def fsdp_mp_policy(model: torch.nn.Module, bf16: bool):
    """FSDP2 mixed precision over float32 shards: bf16 parameters for compute (all-gathered in bf16), gradients
    reduced in float32 into the float32 shards the optimizer steps; None for pure-dtype or fp32-compute runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    p = next(model.parameters())
    if not bf16 or p.dtype != torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fully_shard_model(model: torch.nn.Module, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (parameters become DTensors sharded on dim 0;
    the 3-D expert weights are therefore sharded by expert), with :func:`fsdp_mp_policy` when ``bf16``."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise ValueError(f"train.distributed=fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6): "
                         f"{e}") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"train.distributed=fsdp2: {type(model).__name__} has no model.layers to shard")
    mp = fsdp_mp_policy(model, bf16)
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model
