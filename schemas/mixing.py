"""Several sources made one training set, as a stage's `mix` says (schemas/spec.py `Mix`).

- concatenate: every source in order, each row `weight` times: weight 2 repeats every row, 0.5 keeps a seeded
  half (in the file's order), 1.5 every row and a seeded half again.
- interleave: rows drawn from the sources at random, each draw picking a source with probability in proportion to
  its weight and taking its next row, as `datasets.interleave_datasets` does: until the first source runs out
  (first_exhausted: every source down-sampled to the shortest's share), or until every source has run out at least
  once, a source that ran out starting again from its first row (all_exhausted: up-sampled to the longest's).

Seeded by `Mix.seed`, so a re-run mixes alike; each source's rows in and rows used are counted for the stage's log.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from schemas.spec import Mix


def _concatenated(sizes: list[int], weights: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    chosen = []
    for size, weight in zip(sizes, weights):
        whole, part = divmod(weight, 1.0)
        extra = np.sort(rng.choice(size, size=round(part * size), replace=False)) if part else np.array([], int)
        chosen.append(np.concatenate([np.tile(np.arange(size), int(whole)), extra]).astype(np.int64))
    return chosen


def _interleaved(sizes: list[int], weights: list[float], until: str, rng: np.random.Generator) -> np.ndarray:
    """(source, row) pairs in draw order; a source with no rows takes no part."""
    live = np.asarray([weight if size else 0.0 for size, weight in zip(sizes, weights)])
    if not live.any():
        return np.zeros((0, 2), dtype=np.int64)
    probabilities = live / live.sum()
    taken = [0] * len(sizes)
    exhausted = [size == 0 for size in sizes]
    drawn: list[tuple[int, int]] = []
    # draws come in batches: one rng call per batch, not per row
    while True:
        for source in rng.choice(len(sizes), size=1024, p=probabilities):
            drawn.append((source, taken[source] % sizes[source]))
            taken[source] += 1
            if taken[source] % sizes[source] == 0:
                exhausted[source] = True
                if until == "first_exhausted" or all(exhausted):
                    return np.asarray(drawn, dtype=np.int64).reshape(-1, 2)


def mixed(frames: list[pl.DataFrame], weights: list[float | None], mix: Mix) -> tuple[pl.DataFrame, list[int]]:
    """The sources' rows as one frame, and how many rows of each it holds."""
    if len(frames) == 1 and weights[0] in (None, 1.0):
        return frames[0], [len(frames[0])]
    given = [1.0 if weight is None else weight for weight in weights]
    sizes = [len(frame) for frame in frames]
    rng = np.random.default_rng(mix.seed)
    if mix.strategy == "concatenate":
        chosen = _concatenated(sizes, given, rng)
        parts = [frame[rows] for frame, rows in zip(frames, chosen)]
        return pl.concat(parts), [len(rows) for rows in chosen]
    pairs = _interleaved(sizes, given, mix.until, rng)
    # gather each source's rows once, then put them in draw order
    parts = [frames[source][pairs[pairs[:, 0] == source, 1]] for source in range(len(frames))]
    whole = pl.concat(parts)
    offsets = np.cumsum([0, *[len(part) for part in parts]])
    position = np.empty(len(pairs), dtype=np.int64)
    for source in range(len(frames)):
        mask = pairs[:, 0] == source
        position[mask] = np.arange(offsets[source], offsets[source + 1])
    return whole[position], [int((pairs[:, 0] == source).sum()) for source in range(len(frames))]
