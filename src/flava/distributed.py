"""Several processes as one: the world, gathers with gradient, means over every process's entries."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import ConfigError


class World(NamedTuple):
    rank: int
    size: int


def world() -> World:
    """This process's rank and the number of processes; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def data_parallel(module: torch.nn.Module, device: torch.device,
                  find_unused_parameters: bool = False) -> torch.nn.Module:
    """`module` under DDP over the process group, on this process's GPU (`device_ids`) or the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the rank that owns the rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order (every rank must pass the same shape)."""
    return x if world().size == 1 else _GatherWithGrad.apply(x)


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank in rank order, where only this rank's own rows carry gradient (the
    'local' contrastive loss of OpenCLIP and of the paper's Table C.1)."""
    size = world().size
    if size == 1:
        return x
    rank, rows = world().rank, x.shape[0]
    others = gather(x.detach())
    return torch.cat([others[:rank * rows], x, others[(rank + 1) * rows:]])


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Like `gather_with_grad` without gradient."""
    size = world().size
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


_host_group = None
"""A gloo group beside an NCCL default group, for numbers the host reads (`host_group`)."""


def start_host_group(timeout=None) -> None:
    """Every process calls this once after joining an NCCL group (after a gloo one it does nothing);
    `timeout` (a timedelta) as the default group's."""
    global _host_group
    if dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo", timeout=timeout)


def end_host_group() -> None:
    global _host_group
    _host_group = None  # destroy_process_group ends every group; this forgets it


def host_group():
    """The group over which Python numbers are agreed without the device: an NCCL reduction of
    them would copy to the GPU and read back, a host-device sync at every step. None: the default
    group, gloo already (or a group some caller made without `start_host_group`: then their
    tensors go through it on the device, as before)."""
    return _host_group


def max_over_processes(value: int, device: torch.device) -> int:
    """The largest `value` any process holds (one all_reduce; every process must call it). On the
    host when it can be (`host_group`), else on `device`."""
    if world().size == 1:
        return value
    group = host_group()
    on_device = group is None and dist.get_backend() != "gloo"
    t = torch.tensor([value], device=device if on_device else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def mean_over_processes(values: torch.Tensor, like: torch.Tensor, count: torch.Tensor | None = None,
                        total: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `values` over every process's entries, in the form data-parallel training needs.

    Each process returns sum_local * world / count_global: averaging these (as gradient
    averaging does) gives sum_global / count_global, so processes holding different numbers of
    masked tokens or ITM rows train exactly like one process with the whole batch. With no entry
    anywhere the result is a zero that still reaches `like`'s graph (every parameter used).
    `count` (a device tensor) says how many of `values` are entries, the rest being zeros (a
    selection of a size fixed in advance pads with them); by default all are.
    Every process must call this the same number of times (it runs one all_reduce), unless
    `total` gives count_global: then it runs none (a batch in chunks divides each chunk's sum by
    the whole batch's count, so the chunks' results add up to the batch's mean).
    """
    size = world().size
    zero = like.sum() * 0.0
    if total is not None:
        return values.sum() * size / total.float().clamp_min(1.0) + zero
    if count is None and size == 1:
        return values.mean() + zero if values.numel() else zero
    # A fill, not torch.tensor(n, device=...): copying a host number to a GPU waits for it.
    count = values.new_full((), float(values.numel()), dtype=torch.float32) if count is None else count.float()
    if size > 1:
        dist.all_reduce(count)
    return values.sum() * size / count.clamp_min(1.0) + zero


def resolve_device(name: str) -> torch.device:
    """This process's device for a `device` setting ('auto': the GPU when there is one, 'cpu' or
    'cuda'); under torchrun a process's GPU is its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use the CPU (device cpu)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
