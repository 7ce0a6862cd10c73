"""The Halton commit order of image tokens: a low-discrepancy walk over the square grid of codes.

Committing image tokens in this order (maskgit's `order="halton"`) spreads each step's tokens over
the whole image, so the tokens decided together are far apart and depend little on each other
(the idea of Besnier et al., "Halton Scheduler for Masked Generative Image Transformers", 2025).
"""

from __future__ import annotations

import functools

import torch

from medim.utils.checks import check_int

__all__ = ["halton_order", "halton_rank"]


def _radical_inverse(n: int, base: int) -> float:
    """n written in `base`, digits mirrored behind the point: 1 -> 0.1, 2 -> 0.01, 3 -> 0.11 (base 2)."""
    value, scale = 0.0, 1.0 / base
    while n:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


@functools.lru_cache(maxsize=8)
def halton_order(side: int) -> tuple[int, ...]:
    """Raster indices (row * side + column) of a `side` x `side` grid in Halton order: the cells hit
    by the 2-D Halton points (bases 2 and 3, starting at n = 1), each kept the first time it is hit.

    Example:
        >>> halton_order(2)
        (1, 2, 0, 3)
    """
    check_int(side, "side", minimum=1)
    cells = side * side
    seen: dict[int, None] = {}  # insertion-ordered set
    n = 1
    # The points are dense in the square, so every cell is hit; for a 32 x 32 grid after ~7000 points.
    while len(seen) < cells:
        col = int(_radical_inverse(n, 2) * side)
        row = int(_radical_inverse(n, 3) * side)
        seen.setdefault(row * side + col)
        n += 1
    return tuple(seen)


def halton_rank(length: int) -> torch.LongTensor:
    """rank[j]: when image position j (raster order) comes in the Halton order of its square grid
    (0 = first). `length` must be a perfect square."""
    side = round(length**0.5)
    if side * side != length:
        raise ValueError(f"the Halton order needs a square grid of image tokens; got {length} tokens")
    rank = torch.empty(length, dtype=torch.long)
    rank[torch.tensor(halton_order(side))] = torch.arange(length)
    return rank
