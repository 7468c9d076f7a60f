"""Process-group helpers. One process never initialises torch.distributed: gathers are identities,
reductions return their input and barriers do nothing, so CPU and single-GPU runs need no launcher."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes and its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> DistInfo:
    """Read rank and world size set by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device_type: str, dist_url: str = "env://") -> DistInfo:
    """Join the process group when several processes were launched; NCCL on GPUs, gloo on CPU."""
    info = world_info_from_env()
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, init_method=dist_url, world_size=info.world_size, rank=info.rank,
                                timeout=datetime.timedelta(minutes=30))
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def gather_features(tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order.

    With ``with_grad`` the backward pass sums the gradients that all processes' losses send to each
    slice and returns that sum to the slice's owner (torch.distributed.nn semantics), so after DDP's
    gradient averaging the parameters get exactly the single-process gradient of the mean loss.
    Without it, the other processes' slices are constants and only the local slice carries gradient.
    """
    if not is_initialized():
        return tensor
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(tensor), 0)
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.detach())
    parts[get_rank()] = tensor
    return torch.cat(parts, 0)


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs per process (evaluation shards), no gradient."""
    if not is_initialized():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)], 0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (for logging values that each process computed on its rows)."""
    if not is_initialized():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (counts each process made on its shard, e.g. a confusion matrix);
    a new tensor, so the caller's own counts stay as they were."""
    if not is_initialized():
        return tensor.clone()
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor


def all_true(flag: torch.Tensor) -> bool:
    """Whether a boolean scalar is true on every process (a MIN reduction)."""
    if not is_initialized():
        return bool(flag)
    value = flag.detach().to(torch.int32).reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_object(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order (e.g. RNG states for a checkpoint)."""
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Contiguous slice of ``range(n)`` evaluated by this process; concatenating shards in rank order gives 0..n-1."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
