"""Process topology under `torchrun` / `accelerate launch`: which process this is, and the few collective steps the
stages need (main-process-only work, sharded work gathered, one value shared from the main process).

Training itself is distributed by the transformers Trainer (DDP through accelerate); this module is for what
guardtune does around it: one validation, one reference precompute split over the ranks, one adapter, one audit,
one release. Without a launcher (WORLD_SIZE unset or 1) every function is the single-process identity, and
torch.distributed is never touched.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


_teardown_registered = False


def _group() -> Any:
    """torch.distributed, its process group initialised through accelerate's PartialState (gloo on CPU, NCCL on
    CUDA): the same state the Trainer uses afterwards. The group is destroyed at exit: left to interpreter
    teardown, gloo's threads can abort a process that has finished its work ("terminate called without an
    active exception", seen once in CI on the 2-process test)."""
    global _teardown_registered
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()
    if not _teardown_registered:
        atexit.register(_destroy_group)
        _teardown_registered = True
    return dist


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, nothing is left to report it to
            pass


def barrier() -> None:
    if world_size() > 1:
        _group().barrier()


def share(value: T | None) -> T:
    """The main process's `value` on every process (the others pass anything, usually None)."""
    if world_size() == 1:
        return value  # type: ignore[return-value]
    box = [value]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(value: int | float) -> int | float:
    if world_size() == 1:
        return value
    gathered: list[Any] = [None] * world_size()
    _group().all_gather_object(gathered, value)
    return sum(gathered)


def sharded(items: Sequence[Any], work: Callable[[list[Any]], list[T]]) -> list[T]:
    """work(items) computed with the items split over the processes (item i on rank i % world) and gathered, in
    the items' order, on every process."""
    n = world_size()
    if n == 1:
        return work(list(items))
    mine = work([items[i] for i in range(rank(), len(items), n)])
    gathered: list[Any] = [None] * n
    _group().all_gather_object(gathered, mine)
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::n] = part
    return out
