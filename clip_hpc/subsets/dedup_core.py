"""The pure core of `clip-hpc dedup`: numpy in, numpy out, no files and no ranks.

- `border_margin` / `assign_partitions`: which k-means partitions a vector joins, so that no pair with cosine >= S
  is split by a partition border (the proof is in `assign_partitions`' docstring).
- `pairs_above`: every pair of one partition with cosine >= S, in float32 matrix blocks of bounded size;
  `joining_pairs` keeps only a spanning forest of them, and counts them.
- `group_duplicates`: connected components of the pairs (a vectorised union-find), each kept as its lowest id.
- `balance`: partitions spread over ranks by their cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

ROUNDING_SLACK = 1e-4  # float32 dot products of 512-d unit vectors err by ~1e-6; the margin is widened by far more
BLOCK_FLOATS = 1 << 23  # one block of a similarity matrix: 8M float32 = 32 MiB


class Assignment(NamedTuple):
    """The partition memberships of a block of vectors: row `rows[i]` joins partition `partitions[i]`, as its
    nearest centroid when `primary[i]` (exactly one per row), else as a copy near a border."""

    rows: np.ndarray  # int64
    partitions: np.ndarray  # int64
    primary: np.ndarray  # bool


class Pairs(NamedTuple):
    """Pairs of ids with their cosine; `left < right`."""

    left: np.ndarray  # int64
    right: np.ndarray  # int64
    similarity: np.ndarray  # float32


class Groups(NamedTuple):
    """Every id that duplicates another, the id kept for its group (the group's lowest), and how many groups."""

    ids: np.ndarray  # int64, ascending
    kept: np.ndarray  # int64
    n_groups: int


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of norm 1: stored float16 embeddings are unit length only to ~1e-3."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


def border_margin(threshold: float) -> float:
    """How far apart two unit vectors with cosine >= `threshold` can be: |x - y| = sqrt(2 - 2 cos) <= sqrt(2 - 2S).
    For any unit c, |cos(x,c) - cos(y,c)| = |<x - y, c>| <= |x - y|, the bound this module's guarantee rests on."""
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold)))


def centroid_spacing(centroids: np.ndarray, of: np.ndarray) -> np.ndarray:
    """|a - b| from unit centroid(s) `of` to every centroid, by the cosine: sqrt(2 - 2 <a, b>)."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (of @ centroids.T)))


def border_allowance(centroids: np.ndarray, margin: float) -> np.ndarray:
    """(k, k): how much less similar than its nearest centroid a a vector may be to centroid b and still join b,
    margin |a - b| (see `assign_partitions`), widened by the rounding slack."""
    return (margin * centroid_spacing(centroids, centroids) + ROUNDING_SLACK).astype(np.float32)


def assign_partitions(vectors: np.ndarray, centroids: np.ndarray, margin: float) -> Assignment:
    """Each unit row joins its nearest centroid a, and also every other centroid b with
    `<v, a - b> <= m |a - b|` (m = `border_margin`): v lies within m of the bisector between cells a and b.

    Why no pair is lost: take x, y with cos(x, y) >= S, a = x's nearest centroid and b = y's. If a == b, both are
    primaries of a. Else y joins a, because <y, b - a> = <x, b - a> + <y - x, b - a> <= 0 + m |b - a| (a is
    x's nearest, so <x, b - a> <= 0; Cauchy-Schwarz with |y - x| <= m). So x and y always meet in x's nearest
    partition, with x a primary there; `pairs_above` compares each primary with every member. This is the
    brief's bound |cos(x,c) - cos(y,c)| <= m applied along the direction b - a; it is never looser than a flat
    margin of 2m on the cosine (|a - b| <= 2) and much tighter between nearby centroids. `margin` is m for that
    guarantee (`border_margin`), or less (`dedup_margin.calibrated_margins`: what the data's pairs need)."""
    sims = vectors @ centroids.T  # (n, k)
    nearest = np.argmax(sims, axis=1)
    best = sims[np.arange(len(sims)), nearest]
    near_border = (best[:, None] - sims) <= border_allowance(centroids, margin)[nearest]
    near_border[np.arange(len(sims)), nearest] = True
    rows, partitions = np.nonzero(near_border)
    return Assignment(rows.astype(np.int64), partitions.astype(np.int64), partitions == nearest[rows])


def assign_in_chunks(vectors: np.ndarray, centroids: np.ndarray, margin: float, chunk: int) -> Assignment:
    """`assign_partitions` of `chunk` rows at a time, so the (rows x partitions) matrices stay small."""
    parts = []
    for start in range(0, len(vectors), chunk):
        part = assign_partitions(vectors[start : start + chunk], centroids, margin)
        parts.append(part._replace(rows=part.rows + start))
    return Assignment(*(np.concatenate(column) for column in zip(*parts)))


def distinct_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each row's copy set's first row, whether each row is that first one): rows are copies when their
    stored bytes are equal. Web data holds one placeholder image thousands of times, every copy the same vector."""
    rows = np.ascontiguousarray(vectors)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel() if rows.size else rows[:, 0]
    _, first, label = np.unique(keys, return_index=True, return_inverse=True)
    source = first[label.ravel()]
    return source, source == np.arange(len(rows))


def collapse_copies(vectors: np.ndarray, ids: np.ndarray, n_primary: int) -> tuple[np.ndarray, int, Pairs]:
    """The positions left to compare (the lowest id of every set of copies; primaries still first), how many of
    them are primaries, and the pairs joining every other copy to that one (cosine 1). m copies then cost m - 1
    pairs and one row, not m(m - 1)/2 pairs: every pair a copy makes with another row is its set's pair, and the
    groups are the same. Copies have the same nearest centroid, so a set is all primaries or all border copies."""
    order = np.lexsort((ids, np.arange(len(ids)) >= n_primary))  # primaries first, each part by id
    source, first = distinct_rows(vectors[order])
    keep = np.sort(order[first])
    copies = ~first & (order < n_primary)[source]  # a border copy's set is joined in its own primary partition
    chain = _ordered(ids[order[source[copies]]], ids[order[copies]], np.ones(int(copies.sum()), np.float32))
    return keep, int(np.count_nonzero(keep < n_primary)), chain


class PartitionPairs(NamedTuple):
    """What one partition contributes: a spanning forest of its pairs >= S (the same groups in at most one pair per
    member), and how many pairs >= S it counts (each pair of the whole set is counted in exactly one partition)."""

    pairs: Pairs
    found: int


def similarity_blocks(rows: np.ndarray, n_primary: int, block_floats: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, block): the cosines of primaries start.. with every row from start on, at most `block_floats` of
    them, each pair once (j <= i is -inf: the pair's other order, or the row itself)."""
    n = len(rows)
    step = max(1, min(n_primary, block_floats // max(1, n)))
    for start in range(0, n_primary, step):
        stop = min(n_primary, start + step)
        block = rows[start:stop] @ rows[start:].T  # row r of the block is vector start + r; column c is start + c
        block[np.tril_indices(stop - start, m=n - start)] = -np.inf
        yield start, block


def block_pairs(
    rows: np.ndarray, n_primary: int, threshold: float, block_floats: int = BLOCK_FLOATS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(i, j, cosine) of every pair >= `threshold` with i among the first `n_primary` unit rows and j > i, one
    block (`similarity_blocks`) at a time."""
    for start, block in similarity_blocks(rows, n_primary, block_floats):
        r, c = np.nonzero(block >= threshold)
        yield start + r, start + c, block[r, c]


def pairs_above(
    vectors: np.ndarray, ids: np.ndarray, n_primary: int, threshold: float, block_floats: int = BLOCK_FLOATS
) -> Pairs:
    """Every pair (i, j) with cos >= `threshold` where i is one of the first `n_primary` rows (the partition's
    primaries) and j any later row: each pair once, in blocks of at most `block_floats` similarities. Copies (equal
    stored rows) are compared once, through their lowest id (`collapse_copies`), and joined at cosine 1 exactly:
    their float32 product lands a few ulps either side of 1.0, so at `threshold` 1.0 a product would miss some."""
    keep, n_primary, chain = collapse_copies(vectors, ids, n_primary)
    ids = ids[keep]
    found = list(block_pairs(unit_rows(vectors[keep]), n_primary, threshold, block_floats))
    if not found:
        return chain
    i, j, sim = (np.concatenate(parts) for parts in zip(*found))
    compared = _ordered(ids[i], ids[j], sim.astype(np.float32))
    return Pairs(*(np.concatenate([a, b]) for a, b in zip(compared, chain)))


class Border(NamedTuple):
    """Which partition is compared, with every centroid and the margin: what tells whether a pair found here is
    found in its other end's nearest partition too (with a margin under `border_margin` it may not be)."""

    partition: int
    centroids: np.ndarray
    margin: float


def joining_pairs(
    vectors: np.ndarray,
    ids: np.ndarray,
    n_primary: int,
    threshold: float,
    border: Border,
    block_floats: int = BLOCK_FLOATS,
) -> PartitionPairs:
    """`pairs_above`, kept only where a pair joins two groups apart so far (a spanning forest, block by block): a
    partition of m near-copies holds m - 1 pairs, not m(m - 1)/2, whatever their number. The count is of every
    pair found, each once: where both ends' nearest partitions find it, in its lower id's (`counted_here`)."""
    keep, n_primary, chain = collapse_copies(vectors, ids, n_primary)
    ids, rows = ids[keep], unit_rows(vectors[keep])
    label = np.arange(len(ids))  # each row's group so far, named by its lowest position
    forest, found = [chain], len(chain.left)
    for i, j, sim in block_pairs(rows, n_primary, threshold, block_floats):
        found += int(np.count_nonzero(counted_here(rows, ids, n_primary, i, j, border)))
        picked = spanning_edges(len(ids), label[i], label[j])
        if len(picked):
            forest.append(_ordered(ids[i[picked]], ids[j[picked]], sim[picked].astype(np.float32)))
            label = union_find_roots(len(ids), label[i[picked]], label[j[picked]])[label]
    return PartitionPairs(Pairs(*(np.concatenate(column) for column in zip(*forest))), found)


def counted_here(
    rows: np.ndarray, ids: np.ndarray, n_primary: int, i: np.ndarray, j: np.ndarray, border: Border
) -> np.ndarray:
    """Which pairs (primary i, later member j) this partition counts. Two primaries: only here. Primary x with a
    border member y (nearest b): the pair is also found in b when x joined b there (`assign_partitions`' test), and
    then only the lower id's partition counts it; otherwise only here does."""
    counted = (j < n_primary) | (ids[i] < ids[j])
    centroids, a = border.centroids, border.partition
    spacing = centroid_spacing(centroids, centroids[a])  # as `border_allowance` measures it
    unsure = np.flatnonzero(~counted)
    step = max(1, BLOCK_FLOATS // max(rows.shape[1], len(centroids)))  # rows of dim floats: a block's pairs are GBs
    for rest in (unsure[lo : lo + step] for lo in range(0, len(unsure), step)):
        x, y = rows[i[rest]], rows[j[rest]]
        b = np.argmax(y @ centroids.T, axis=1)
        gap = np.einsum("ij,ij->i", x, centroids[a] - centroids[b])  # <x, a> - <x, b>
        counted[rest] = gap > border.margin * spacing[b] + ROUNDING_SLACK  # x did not join b: found only here
    return counted


def spanning_edges(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Positions of edges that span the same components of 0..n-1 as all of them, without a cycle (Boruvka: each
    component takes its lowest-numbered edge out; with every edge numbered apart these never close a cycle)."""
    label = np.arange(n)
    alive = np.flatnonzero(left != right)
    chosen = [alive[:0]]
    while len(alive):
        a, b = label[left[alive]], label[right[alive]]
        apart = a != b
        alive, a, b = alive[apart], a[apart], b[apart]
        if not len(alive):
            break
        first = np.full(n, len(left), dtype=np.int64)
        np.minimum.at(first, a, alive)
        np.minimum.at(first, b, alive)
        picked = np.unique(first[first < len(left)])
        chosen.append(picked)
        label = union_find_roots(n, label[left[picked]], label[right[picked]])[label]
    return np.sort(np.concatenate(chosen))


def _ordered(a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> Pairs:
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return Pairs(np.minimum(a, b), np.maximum(a, b), sim)


def union_find_roots(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The root of every element 0..n-1 after joining each (left[i], right[i]): a vectorised union-find whose
    union hooks the larger root under the smaller and whose find compresses paths fully, so every component's
    root is its lowest element. Parents only ever decrease, so it ends; every edge inside a component at the end."""
    parent = np.arange(n, dtype=np.int64)
    left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
    while True:
        while True:  # find: point every element at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        a, b = parent[left], parent[right]
        apart = a != b
        if not apart.any():
            return parent
        low, high = np.minimum(a[apart], b[apart]), np.maximum(a[apart], b[apart])
        np.minimum.at(parent, high, low)  # union: each root hooks under the lowest root it touches


def duplicates_in(
    vectors: np.ndarray, ids: np.ndarray, centroids: np.ndarray, threshold: float, margin: float | None = None
) -> Groups:
    """The duplicate groups of one in-memory set (a filter's subset): the same partitions with border copies and
    exact pairs per partition as `clip-hpc dedup`, without files or ranks; `margin` None: `border_margin`."""
    rows = unit_rows(vectors)
    margin = border_margin(threshold) if margin is None else margin
    assignment = assign_in_chunks(rows, centroids, margin, chunk=16_384)
    order = np.lexsort((~assignment.primary, assignment.partitions))  # each partition's primaries first
    members, partitions, primary = (column[order] for column in assignment)
    found = [_ordered(ids[:0], ids[:0], np.zeros(0, np.float32))]
    for part in np.split(np.arange(len(partitions)), np.flatnonzero(np.diff(partitions)) + 1):
        if len(part) > 1:
            border = Border(int(partitions[part[0]]), centroids, margin)
            n_primary = int(primary[part].sum())
            found.append(joining_pairs(rows[members[part]], ids[members[part]], n_primary, threshold, border).pairs)
    return group_duplicates(Pairs(*(np.concatenate(column) for column in zip(*found))))


def group_duplicates(pairs: Pairs) -> Groups:
    """Connected components of the pairs: every member but the lowest id of its component, with that id."""
    members = np.unique(np.concatenate([pairs.left, pairs.right]))
    roots = union_find_roots(len(members), np.searchsorted(members, pairs.left), np.searchsorted(members, pairs.right))
    duplicate = roots != np.arange(len(members))
    return Groups(members[duplicate], members[roots[duplicate]], int(np.count_nonzero(~duplicate)))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (stored rows, normalised here)."""
    return np.einsum("ij,ij->i", unit_rows(a), unit_rows(b)).astype(np.float32)


def estimated_cost(sample: Assignment, k: int, n_vectors: int, dim: int) -> float:
    """Dot products a partitioning will cost on `n_vectors`, from a sample's assignment: assigning every vector
    (n k), comparing each partition's primaries with its later members (sum of P T - P^2 / 2, scaled from the
    sample; one partition is all pairs, n^2 / 2), and each membership counted as `dim` more, for its 2 dim bytes
    written and read back (measured: ~500 at dim 512)."""
    n_sample = int(np.count_nonzero(sample.primary))
    primaries = np.bincount(sample.partitions[sample.primary], minlength=k).astype(np.float64)
    members = np.bincount(sample.partitions, minlength=k).astype(np.float64)
    scale = n_vectors / max(1, n_sample)
    compared = float(primaries @ members - primaries @ primaries / 2) * scale**2
    return float(n_vectors) * k + compared + float(members.sum()) * scale * dim


def balance(costs: np.ndarray, n_ranks: int) -> np.ndarray:
    """The rank of each partition: largest cost first, each to the least loaded rank so far (deterministic)."""
    owner = np.zeros(len(costs), dtype=np.int64)
    load = np.zeros(n_ranks, dtype=np.float64)
    for p in np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable"):
        rank = int(np.argmin(load))
        owner[p] = rank
        load[rank] += float(costs[p])
    return owner
