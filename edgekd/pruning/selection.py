"""Which units to remove, given their scores: the lowest per layer, the lowest across layers, or
the same lowest-ranked unit indices in every layer (``lowest_uniform``).

Every layer keeps at least its floor (``capacity`` = how many it may still lose).
"""

from __future__ import annotations

import torch


def spread(total: int, capacity: list[int]) -> list[int]:
    """Split ``total`` removals over layers as evenly as their capacities allow (water-filling);
    a remainder goes to the layers with the most capacity left, then the lowest index."""
    counts = [0] * len(capacity)
    left = min(total, sum(capacity))
    while left > 0:
        open_layers = [i for i, c in enumerate(capacity) if counts[i] < c]
        share = left // len(open_layers)
        if share == 0:
            order = sorted(open_layers, key=lambda i: (-(capacity[i] - counts[i]), i))
            for i in order[:left]:
                counts[i] += 1
            break
        for i in open_layers:
            take = min(share, capacity[i] - counts[i])
            counts[i] += take
            left -= take
    return counts


def lowest_per_layer(scores: list[torch.Tensor], counts: list[int]) -> dict[int, list[int]]:
    """The ``counts[i]`` lowest-scoring units of each layer ``i`` (current indices, sorted)."""
    chosen = {}
    for i, (s, k) in enumerate(zip(scores, counts, strict=True)):
        if k > 0:
            chosen[i] = sorted(torch.argsort(s.float().cpu(), stable=True)[:k].tolist())
    return chosen


def lowest_global(scores: list[torch.Tensor], total: int, capacity: list[int]) -> dict[int, list[int]]:
    """The ``total`` lowest-scoring units across layers, skipping a layer once it reaches its floor.
    ``scores`` must already be comparable across layers (see ``normalise_per_layer``)."""
    flat = [(float(v), layer, idx) for layer, s in enumerate(scores) for idx, v in enumerate(s.float().cpu().tolist())]
    flat.sort()
    taken = [0] * len(scores)
    chosen: dict[int, list[int]] = {}
    for _, layer, idx in flat:
        if total <= 0:
            break
        if taken[layer] < capacity[layer]:
            chosen.setdefault(layer, []).append(idx)
            taken[layer] += 1
            total -= 1
    return {k: sorted(v) for k, v in chosen.items()}


def counts_for_fraction(fraction: float, sizes: list[int], capacity: list[int],
                        at_least_one: bool = False) -> list[int]:
    """Per layer: ``fraction`` of its current units, rounded, within its capacity. With ``at_least_one``
    (a search round, ``prune.latency_step``) a layer with room above its floor gives up at least one
    unit when the fraction is positive: 10% of 4 heads rounds to none, and a round that removes
    nothing would end the search as if the floors had been reached."""
    return [min(max(round(fraction * n), 1 if at_least_one and fraction > 0 else 0), c)
            for n, c in zip(sizes, capacity, strict=True)]


def lowest_uniform(scores: list[torch.Tensor], count: int) -> dict[int, list[int]]:
    """The ``count`` unit indices with the lowest score summed over layers, the same in every layer.

    For families whose units exist in every layer alike (MPNet's heads, see edgekd.encoders); the
    layers must have the same number of units, and ``scores`` must already compare across layers
    (see ``normalise_per_layer``) so that no layer outweighs the others."""
    sizes = {len(s) for s in scores}
    if len(sizes) != 1:
        raise ValueError(f"uniform selection needs the same number of units in every layer, got {[len(s) for s in scores]}")
    if count <= 0:
        return {}
    total = torch.stack([s.float().cpu() for s in scores]).sum(0)
    chosen = sorted(torch.argsort(total, stable=True)[:count].tolist())
    return {i: list(chosen) for i in range(len(scores))}
