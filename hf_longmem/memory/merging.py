"""Merge math shared by the KV-merging caches (D2O, KVMerger).

Everything works on batched per-head tensors (``[batch, heads, n, head_dim]``) with scatter/gather, so no Python
loop runs over tokens or heads. Similarities and merges are computed in float32 and cast back to the input dtype.

* :func:`cosine_best_match`: for each source key, its most cosine-similar valid target key (D2O).
* :func:`weighted_merge_into`: ``x_c <- (x_c + sum_e w_e x_e) / (1 + sum_e w_e)``, a convex combination (D2O).
* :func:`consecutive_merge_sets`: greedy sets of consecutive tokens whose keys are similar to the set's anchor
  (KVMerger).
* :func:`gaussian_kernel_weights` and :func:`merge_runs`: one KV per run of consecutive slots, weighted by a
  Gaussian kernel around the run's pivot (KVMerger).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Source keys compared at once in :func:`cosine_best_match`; bounds the ``[batch, heads, chunk, S]`` block.
MATCH_CHUNK = 1024
_EPS = 1e-12


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity, clamped to ``[-1, 1]``.

    Args:
        a: ``[..., m, d]``.
        b: ``[..., n, d]``.

    Returns:
        ``[..., m, n]`` float32 (a zero vector has similarity 0 with everything).
    """
    a = F.normalize(a.float(), dim=-1, eps=_EPS)
    b = F.normalize(b.float(), dim=-1, eps=_EPS)
    return (a @ b.transpose(-1, -2)).clamp(-1.0, 1.0)


def cosine_best_match(
    sources: torch.Tensor, targets: torch.Tensor, target_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most cosine-similar valid target of every source, per batch row and head.

    Args:
        sources: ``[batch, heads, E, d]`` keys to place (D2O: the evicted keys).
        targets: ``[batch, heads, S, d]`` candidate keys (D2O: the kept keys).
        target_valid: ``[batch, 1 or heads, S]`` bool, False for targets that may not receive a merge (pad slots);
            ``None`` = all valid. Each (row, head) needs at least one valid target for its result to mean anything.

    Returns:
        ``(similarity [batch, heads, E] float32, index [batch, heads, E] int64)``; a (row, head) without valid
        targets gets similarity ``-inf`` and index 0.
    """
    batch, heads, num_sources, _ = sources.shape
    targets_n = F.normalize(targets.float(), dim=-1, eps=_EPS)
    best = sources.new_full((batch, heads, num_sources), float("-inf"), dtype=torch.float32)
    index = torch.zeros(batch, heads, num_sources, dtype=torch.long, device=sources.device)
    for start in range(0, num_sources, MATCH_CHUNK):
        stop = min(start + MATCH_CHUNK, num_sources)
        chunk = F.normalize(sources[:, :, start:stop].float(), dim=-1, eps=_EPS)
        sim = (chunk @ targets_n.transpose(-1, -2)).clamp(-1.0, 1.0)  # [b, h, chunk, S]
        if target_valid is not None:
            sim = sim.masked_fill(~target_valid[:, :, None, :], float("-inf"))
        best[:, :, start:stop], index[:, :, start:stop] = sim.max(dim=-1)
    return best, index


def weighted_merge_into(
    targets: torch.Tensor, sources: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Merges sources into targets: ``x_c <- (x_c + sum_{e -> c} w_e x_e) / (1 + sum_{e -> c} w_e)``.

    The weights of a merged slot (1 for itself, ``w_e`` for each source) sum to one after the division, so merging
    copies of a vector leaves it unchanged (D2O's official code divides by ``1 + n_c`` instead, which shrinks it).

    Args:
        targets: ``[batch, heads, S, d]``.
        sources: ``[batch, heads, E, d]``.
        index: ``[batch, heads, E]`` target slot of each source.
        weights: ``[batch, heads, E]`` non-negative; 0 leaves a source out.

    Returns:
        ``[batch, heads, S, d]`` in the dtype of ``targets``.
    """
    if bool((weights < 0).any()):
        raise ValueError("merge `weights` must be non-negative")
    d = targets.shape[-1]
    w = weights.float()
    added = torch.zeros_like(targets, dtype=torch.float32).scatter_add_(
        2, index[..., None].expand(-1, -1, -1, d), sources.float() * w[..., None]
    )
    mass = torch.zeros(targets.shape[:-1], dtype=torch.float32, device=targets.device).scatter_add_(2, index, w)
    return ((targets.float() + added) / (1.0 + mass)[..., None]).to(targets.dtype)


def consecutive_merge_sets(
    keys: torch.Tensor, candidates: torch.Tensor, threshold: float, max_set_size: int | None = None
) -> torch.Tensor:
    """Greedy merging sets of consecutive tokens (KVMerger's set identification, reconstructed).

    Scanning from the newest candidate towards the oldest, a set starts at an anchor token and absorbs the
    following (older) tokens while each one's key has cosine similarity ``> threshold`` with the anchor's key, up to
    ``max_set_size`` tokens; the first token that fails starts the next set. Every set is a run of consecutive
    candidate slots. Implemented without a loop over tokens: each token's run length is found by comparing it with
    its next ``max_set_size - 1`` neighbours (a loop over offsets that stops once no run continues), and the chain
    of anchors is followed by pointer doubling (``log2 n`` vectorised rounds).

    Args:
        keys: ``[batch, heads, n, d]``.
        candidates: ``[batch, 1 or heads, n]`` bool; the candidates of a row must be one contiguous run of slots
            (the tokens allowed to merge).
        threshold: cosine similarity a token needs with its set's anchor (``> threshold``; above 1 nothing merges).
        max_set_size: the largest set; ``None`` = unbounded (costs up to ``n^2`` similarities when keys are alike).

    Returns:
        ``[batch, heads, n]`` int64 set index, increasing with the slot index, ``-1`` for non-candidates.
    """
    batch, heads, n, _ = keys.shape
    cand = candidates.expand(batch, heads, n).flip(-1)  # scan order: newest first
    if n == 0:
        return torch.full((batch, heads, 0), -1, dtype=torch.long, device=keys.device)
    unit = F.normalize(keys.float(), dim=-1, eps=_EPS).flip(2)
    limit = n if max_set_size is None else min(n, max_set_size)
    run = torch.zeros(batch, heads, n, dtype=torch.long, device=keys.device)
    alive = cand.clone()
    for offset in range(1, limit):
        sim = (unit[:, :, :-offset] * unit[:, :, offset:]).sum(-1).clamp(-1.0, 1.0)
        alive = alive[..., : n - offset] & cand[..., offset:] & (sim > threshold)
        if not bool(alive.any()):
            break
        run[..., : n - offset] += alive.long()
    # next anchor after an anchor at f is f + run + 1; slot n is an absorbing sentinel.
    arange = torch.arange(n + 1, device=keys.device)
    jump = torch.cat((arange[:n] + run + 1, torch.full((batch, heads, 1), n, device=keys.device)), dim=-1).clamp(max=n)
    first = cand.long().argmax(-1, keepdim=True)  # first candidate in scan order
    has_cand = cand.any(-1, keepdim=True)
    mark = torch.zeros(batch, heads, n + 1, dtype=torch.long, device=keys.device)
    mark.scatter_(-1, first, has_cand.long())
    for _ in range(max(1, math.ceil(math.log2(n + 1)))):
        mark = (mark + torch.zeros_like(mark).scatter_add_(-1, jump, mark)).clamp(max=1)
        jump = jump.gather(-1, jump)
    anchors = mark[..., :n].bool() & cand
    set_id = anchors.long().cumsum(-1) - 1
    set_id = torch.where(cand, set_id, torch.full_like(set_id, -1))
    num_sets = anchors.sum(-1, keepdim=True)
    # back to slot order, numbering sets oldest first
    set_id = set_id.flip(-1)
    return torch.where(set_id >= 0, num_sets - 1 - set_id, set_id)


def gaussian_kernel_weights(distance_sq: torch.Tensor, run_id: torch.Tensor, num_runs: int) -> torch.Tensor:
    """KVMerger's Gaussian-kernel merge weights, normalised within each run.

    ``w_i = exp(-d_i^2 / (2 sigma^2)) / sum_{j in run} exp(-d_j^2 / (2 sigma^2))`` with ``d_i = ||k_p - k_i||`` the
    distance to the run's pivot and ``sigma^2`` the mean of ``d_i^2`` over the run's other members (so a typical
    member gets ``exp(-1/2)`` of the pivot's weight). A run whose members all coincide with the pivot
    (``sigma = 0``) gets uniform weights; a single-token run gets weight 1.

    Args:
        distance_sq: ``[batch, heads, n]`` squared distance of each slot's key to its run's pivot key.
        run_id: ``[batch, heads, n]`` run of each slot in ``[0, num_runs)``, or ``num_runs`` for slots left out.
        num_runs: number of runs.

    Returns:
        ``[batch, heads, n]`` float32 weights (0 for slots left out); the pivot's is the largest of its run.
    """
    shape = (*run_id.shape[:-1], num_runs + 1)
    member = (run_id < num_runs).float()
    d2 = distance_sq.float() * member
    count = torch.zeros(shape, device=run_id.device).scatter_add_(-1, run_id, member)
    total = torch.zeros(shape, device=run_id.device).scatter_add_(-1, run_id, d2)
    sigma_sq = (total / (count - 1).clamp(min=1)).gather(-1, run_id)  # the pivot's own d^2 = 0 adds nothing
    kernel = torch.where(sigma_sq > 0, torch.exp(-d2 / (2 * sigma_sq).clamp(min=_EPS)), torch.ones_like(d2)) * member
    norm = torch.zeros(shape, device=run_id.device).scatter_add_(-1, run_id, kernel).gather(-1, run_id)
    return kernel / norm.clamp(min=_EPS)


def merge_runs(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    run_id: torch.Tensor,
    num_runs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merges each run of slots into one KV at its pivot (KVMerger's Gaussian-kernel weighted merge).

    The pivot of a run is its slot with the highest ``score`` (the first on ties). Keys and values are merged with
    the same :func:`gaussian_kernel_weights` (computed from key distances), written as
    ``x_p + sum_i w_i (x_i - x_p)`` so that a run of identical states merges exactly into that state. The merged
    slot takes the pivot's position.

    Args:
        keys: ``[batch, heads, n, d]``; values: ``[batch, heads, n, dv]``; positions, scores: ``[batch, heads, n]``.
        run_id: ``[batch, heads, n]`` int64 run of each slot in ``[0, num_runs)`` (runs numbered in slot order), or
            ``num_runs`` for a slot that is dropped.
        num_runs: runs per (row, head); each must have at least one slot.

    Returns:
        ``(keys [b, h, R, d], values [b, h, R, dv], positions [b, h, R], weights [b, h, n])`` with ``R = num_runs``.
    """
    batch, heads, n, d = keys.shape
    slots = torch.arange(n, device=keys.device).expand(batch, heads, n)
    shape = (batch, heads, num_runs + 1)
    score = scores.float().masked_fill(run_id >= num_runs, float("-inf"))
    best = torch.full(shape, float("-inf"), device=keys.device).scatter_reduce(-1, run_id, score, "amax")
    is_pivot = (score == best.gather(-1, run_id)) & (run_id < num_runs)
    pivot = torch.full(shape, n, device=keys.device, dtype=torch.long)
    pivot = pivot.scatter_reduce(-1, run_id, torch.where(is_pivot, slots, n), "amin")[..., :num_runs]
    pivot_of_slot = pivot.gather(-1, run_id.clamp(max=num_runs - 1))  # [b, h, n]

    def centred(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = states.shape[-1]
        at_pivot = states.gather(2, pivot_of_slot[..., None].expand(-1, -1, -1, width)).float()
        return states.float() - at_pivot, states.gather(2, pivot[..., None].expand(-1, -1, -1, width)).float()

    key_diff, pivot_keys = centred(keys)
    value_diff, pivot_values = centred(values)
    weights = gaussian_kernel_weights(key_diff.square().sum(-1), run_id, num_runs)

    def merged(diff: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        width = diff.shape[-1]
        out = torch.zeros(batch, heads, num_runs + 1, width, device=keys.device)
        out.scatter_add_(2, run_id[..., None].expand(-1, -1, -1, width), diff * weights[..., None])
        return (base + out[:, :, :num_runs]).to(dtype)

    return (
        merged(key_diff, pivot_keys, keys.dtype),
        merged(value_diff, pivot_values, values.dtype),
        positions.gather(-1, pivot),
        weights,
    )


__all__ = [
    "consecutive_merge_sets",
    "cosine_best_match",
    "cosine_similarity",
    "gaussian_kernel_weights",
    "merge_runs",
    "weighted_merge_into",
]
