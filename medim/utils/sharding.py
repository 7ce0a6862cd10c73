"""Which samples this process makes when a job runs on several processes (torchrun): the k-th item
goes to rank k % world_size, so every rank knows its share without talking to the others.

Example (run with `torchrun --nproc_per_node 4 script.py`; every rank writes its own files):
    >>> from medim.utils.sharding import rank_indices
    >>> for i in rank_indices(len(prompts)):        # rank r: r, r + 4, r + 8, ...
    ...     g = torch.Generator().manual_seed(seed + i)
    ...     pipe.text_to_image([prompts[i]], generator=g).images[0].save(f"{i:06d}.png")
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from medim.utils.checks import check_int

__all__ = ["Shard", "current_shard", "rank_indices", "shard"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """A process's place in a job: `rank` of `world_size` processes, `local_rank` on its machine
    (the GPU it uses)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank"):
            check_int(getattr(self, name), name)
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def current_shard() -> Shard:
    """This process's place: torch.distributed's when a process group is initialised, else the
    environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), else rank 0 of 1.

    Example:
        >>> current_shard()          # a plain `python script.py`
        Shard(rank=0, world_size=1, local_rank=0)
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size(), local_rank)
    return Shard(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local_rank)


def _resolve(rank: int | None, world_size: int | None) -> Shard:
    here = current_shard() if rank is None or world_size is None else None
    return Shard(here.rank if rank is None else rank, here.world_size if world_size is None else world_size)


def rank_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The indices in `range(n)` that `rank` makes: rank, rank + world_size, ... (None: this
    process's rank and world size, see `current_shard`). A rank beyond `n` gets an empty range.

    Example:
        >>> list(rank_indices(10, rank=1, world_size=4))
        [1, 5, 9]
    """
    check_int(n, "n", minimum=0)
    where = _resolve(rank, world_size)
    return range(where.rank, n, where.world_size)


def shard(items: Iterable[T], rank: int | None = None, world_size: int | None = None) -> Iterator[T]:
    """This rank's items of any iterable, read lazily: the k-th item goes to rank k % world_size.
    `rank_indices(n)` is `shard(range(n))`; use this one to split what is left of a job (e.g.
    the samples not yet finished) evenly.

    Example:
        >>> list(shard(["a", "b", "c", "d", "e"], rank=0, world_size=2))
        ['a', 'c', 'e']
    """
    where = _resolve(rank, world_size)
    return itertools.islice(items, where.rank, None, where.world_size)
