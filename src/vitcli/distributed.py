"""torchrun: this process's place in the job, the collectives fine-tuning uses, and shared failures.

A failure on one rank must end every rank at once, with the error: work done by rank 0 alone (the
run folder, saving) and work shared by every rank (the image check) go through ``on_rank0`` and
``on_every_rank``, which hand each rank the outcome, result or error, in one collective. (Without
that, a rank that fails leaves the others in a collective until its timeout: 10 to 30 minutes.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from vitcli.devices import resolve_device
from vitcli.errors import RankFailedError, VitcliError, first_line
from vitcli.inference.shards import Rank as Dist  # one notion of a torchrun process for every command
from vitcli.inference.shards import init_process_group, torchrun_rank

T = TypeVar("T")


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and pick this rank's device."""
    dist = torchrun_rank()
    if not dist.enabled:
        return dist, resolve_device(device)
    dist, this_device, _ = init_process_group(device)  # the same join as predict's and evaluate's
    return dist, torch.device(this_device)


def close_distributed(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def broadcast(obj: T, dist: Dist) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T, dist: Dist) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    boxes: list[Any] = [None] * dist.world
    tdist.all_gather_object(boxes, obj)
    return boxes


def all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (through the GPU under nccl, which reduces CUDA tensors only)."""
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl" and t.device.type != "cuda":
            work = t.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(work)
            t.copy_(work.cpu())
        else:
            tdist.all_reduce(t)
    return t


# An outcome travels between ranks as plain values: an exception may not pickle (custom __init__).
Outcome = tuple[bool, Any, str, int]  # (ok, result, error message, exit code)


def _outcome(fn: Callable[[], T]) -> tuple[Outcome, Exception | None]:
    try:
        return (True, fn(), "", 0), None
    except Exception as e:  # every failure, not only vitcli's: the other ranks must not wait for this one
        message = str(e) if isinstance(e, VitcliError) else f"{type(e).__name__}: {first_line(e)}"
        return (False, None, message, getattr(e, "exit_code", 1)), e


def _raise_first_failure(outcomes: list[Outcome], mine: Exception | None, dist: Dist) -> None:
    if mine is not None:
        raise mine  # this rank's own error, traceback and type intact
    for rank, (ok, _, message, code) in enumerate(outcomes):
        if not ok:
            raise RankFailedError(f"rank {rank} of {dist.world} failed: {message}", code)


def on_rank0(fn: Callable[[], T], dist: Dist) -> T:
    """``fn()`` run on rank 0; its result on every rank, or its error (any exception) raised on every rank."""
    if not dist.enabled:
        return fn()
    outcome, error = _outcome(fn) if dist.main else ((True, None, "", 0), None)
    shared = broadcast(outcome, dist)
    _raise_first_failure([shared], error, dist)
    return shared[1]


def on_every_rank(fn: Callable[[], T], dist: Dist) -> list[T]:
    """``fn()`` run on every rank; all the results in rank order, or the first error raised on every rank."""
    outcome, error = _outcome(fn)
    outcomes = all_gather(outcome, dist)
    _raise_first_failure(outcomes, error, dist)
    return [result for _, result, _, _ in outcomes]


def any_rank(flag: bool, dist: Dist) -> bool:
    """Whether ``flag`` is set on any rank (one small collective)."""
    return bool(all_reduce(torch.tensor([float(flag)]), dist).item() > 0)


def share_step(loss: torch.Tensor | None, interrupt: bool, failure: Exception | None,
               dist: Dist) -> tuple[float, bool]:
    """One collective per batch: the mean loss (for the NaN check), whether any rank was interrupted, and
    whether any rank failed (then every rank raises, the failed one its own error)."""
    if failure is not None and not dist.enabled:
        raise failure
    flags = torch.tensor([loss.item() if failure is None else 0.0, float(interrupt), float(failure is not None)])
    all_reduce(flags, dist)
    if flags[2].item() > 0:
        on_every_rank(lambda: _raise(failure), dist)
    return flags[0].item() / dist.world, flags[1].item() > 0


def _raise(failure: Exception | None) -> None:
    if failure is not None:
        raise failure
