"""Micro-batch planner: split S sequences into micro-batches of at most ``max_tokens`` tokens, balanced
across data-parallel ranks, every sequence kept whole.

Algorithm (greedy, deterministic, O(S log S)):
  1. Ranks: longest-processing-time first (Graham's LPT): sequences in decreasing length, each to the rank
     with the fewest tokens so far. Bound: the token totals of any two ranks differ by at most the longest
     sequence (the last sequence placed on the heaviest rank was placed when it was the lightest).
  2. Micro-batches inside a rank: worst-fit decreasing into k bins (the emptiest bin that still fits), with
     k the same on every rank (DDP needs the same number of backward passes on each rank): the smallest k
     with which every rank fits, starting from ceil(rank tokens / max_tokens). Worst-fit keeps the bins of
     a rank level: whenever the emptiest bin had room, bins differ by at most the longest sequence.
Why not Karmarkar-Karp: its better balance matters when items are comparable to the bin size; here a
rank holds many sequences per micro-batch, LPT's bound (one sequence) is already within a few percent, and
the greedy version is simple to verify. Ties break on the sequence index, so a plan is reproducible.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatchPlan:
    """plan[r][m] = the sequence indices of rank r's m-th micro-batch (same count on every rank).

    lengths: the (possibly truncated) token count of every sequence, indexed like the input.
    """

    plan: list[list[list[int]]]
    lengths: list[int]
    max_tokens: int

    @property
    def num_micro_batches(self) -> int:
        return len(self.plan[0]) if self.plan else 0

    def tokens(self, rank: int, mb: int) -> int:
        return sum(self.lengths[i] for i in self.plan[rank][mb])

    def rank_tokens(self) -> list[int]:
        return [sum(self.lengths[i] for mb in r for i in mb) for r in self.plan]


def plan_micro_batches(lengths, max_tokens: int, *, num_ranks: int = 1, truncate: bool = False,
                       min_micro_batches: int = 1) -> MicroBatchPlan:
    """Plan micro-batches for sequences of the given lengths.

    Args:
        lengths: S ints >= 0 (tokens per sequence).
        max_tokens: token budget of one micro-batch (> 0).
        num_ranks: data-parallel ranks (>= 1).
        truncate: a sequence longer than max_tokens is cut to max_tokens (its recorded length) instead of
            raising ValueError.
        min_micro_batches: at least this many micro-batches per rank (ranks that plan on their own agree on the
            largest count this way; a micro-batch is empty only when a rank has fewer sequences than that).
    """
    lengths = [int(x) for x in lengths]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"sequence {i} has negative length {n}")
        if n > max_tokens:
            if not truncate:
                raise ValueError(f"sequence {i} has {n} tokens, more than max_tokens={max_tokens} "
                                 f"(raise max_tokens or pass truncate=True)")
            lengths[i] = max_tokens
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    # 1. LPT over ranks
    heap = [(0, r) for r in range(num_ranks)]
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in order:
        load, r = heapq.heappop(heap)
        per_rank[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    # 2. the same number k of worst-fit-decreasing bins on every rank
    k = max(1, min_micro_batches, max(-(-sum(lengths[i] for i in seqs) // max_tokens) for seqs in per_rank))
    while True:
        bins = [_worst_fit(seqs, lengths, k, max_tokens) for seqs in per_rank]
        if all(b is not None for b in bins):
            return MicroBatchPlan(plan=bins, lengths=lengths, max_tokens=max_tokens)
        k += 1


def _worst_fit(seqs, lengths, k, cap):
    """Sequences (already in decreasing length) into k bins of capacity cap, each to the emptiest bin that
    fits; None if one does not fit anywhere."""
    heap = [(0, b) for b in range(k)]
    bins = [[] for _ in range(k)]
    for i in seqs:
        load, b = heap[0]
        if load + lengths[i] > cap:  # the emptiest bin is full for it, so is every other
            return None
        heapq.heapreplace(heap, (load + lengths[i], b))
        bins[b].append(i)
    return bins
