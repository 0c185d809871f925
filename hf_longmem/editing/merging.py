"""Merging of WISE knowledge shards (paper Sec. 3.3: "knowledge sharding and merging").

A shard is a copy ``W_i`` of the main memory ``W`` trained on a random subset of its entries; its task vector is
``delta_i = W_i - W``. :func:`merge_task_vectors` combines the task vectors of several shards into one weight,
following the generalised task arithmetic of Yadav et al. (TIES-merging) as EasyEdit's ``GTA`` class does:

1. sparsify each ``delta_i``: keep its ``density`` fraction of largest-magnitude entries (``"magnitude"``), or a
   random ``density`` fraction, rescaled by ``1 / density`` (``"rescaled_random"``, DARE) or not (``"random"``);
2. weight: ``w_i * delta_i``;
3. sign consensus (``"sum"``): an entry keeps only the contributions whose sign equals the sign of the weighted
   sum of all contributions to it (ties count as positive);
4. sum the kept contributions; with ``normalize`` divide each entry by the total weight of its kept contributions,
   so an entry only one shard changed keeps that shard's value exactly;
5. ``W + merged delta``.

Named algorithms (:data:`ALGORITHMS`) are those of EasyEdit, with one deviation: EasyEdit's ``"linear"`` (and
``"slerp"``) interpolate between two tensors only and silently drop every shard after the first; here ``"linear"``
is the weighted average of all task vectors, and ``"slerp"`` is not offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ALGORITHMS", "merge_task_vectors", "sparsify"]

#: name -> (sparsify method, consensus method, normalize), as in EasyEdit's ``merge_dict``.
ALGORITHMS: dict[str, tuple[str | None, str | None, bool]] = {
    "ties": ("magnitude", "sum", True),
    "magnitude_norm": ("magnitude", None, True),
    "magnitude": ("magnitude", None, False),
    "sign": (None, "sum", True),
    "dare_ties": ("rescaled_random", "sum", False),
    "dare_linear": ("random", None, False),
    "linear": (None, None, True),
}


def sparsify(
    delta: torch.Tensor, density: float, method: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a ``density`` fraction of the entries of ``delta`` (any shape); the others become 0.

    Args:
        delta: task vector.
        density: fraction kept, in (0, 1]; 1 returns ``delta`` unchanged.
        method: ``"magnitude"`` (largest ``|delta|``, ``int(density * numel)`` entries, at least 1),
            ``"rescaled_random"`` (Bernoulli(density) mask, kept entries scaled by ``1 / density``) or
            ``"random"`` (same mask, no rescaling).
        generator: random generator of the random methods.

    Returns:
        tensor shaped and typed like ``delta``.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}.")
    if density >= 1.0:
        return delta
    if method == "magnitude":
        flat = delta.reshape(-1)
        k = max(1, int(density * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
        keep[torch.topk(flat.abs().float(), k, largest=True).indices] = True
        return (flat * keep).view_as(delta)
    if method in ("rescaled_random", "random"):
        work = delta.float()
        mask = torch.rand(work.shape, generator=generator, device="cpu").to(work.device) < density
        out = work * mask
        if method == "rescaled_random":
            out = out / density
        return out.to(delta.dtype)
    raise ValueError(f"sparsify method must be 'magnitude', 'rescaled_random' or 'random', got {method!r}.")


def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    algorithm: str = "ties",
    density: float = 0.53,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge weights that share a base into one, by their task vectors ``tensors[i] - base``.

    Args:
        base: ``(out, in)`` (any shape) the weight every tensor was trained from (the main memory).
        tensors: shaped like ``base``: the shards (and, for WISE-Merge's later merges, the previous merged memory).
        weights: one weight per tensor.
        algorithm: one of :data:`ALGORITHMS`.
        density: fraction of each task vector kept by the sparsify step.
        generator: random generator of ``dare_*``.

    Returns:
        the merged weight, shaped and typed like ``base`` (computed in float32).

    Raises:
        ValueError: an unknown algorithm, no tensors, a weight count or a shape that does not match.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}.")
    if len(tensors) == 0:
        raise ValueError("tensors must hold at least one weight to merge.")
    if len(weights) != len(tensors):
        raise ValueError(f"weights has {len(weights)} entries for {len(tensors)} tensors.")
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise ValueError(f"tensors[{i}] has shape {tuple(tensor.shape)}, base has {tuple(base.shape)}.")
    sparsify_method, consensus, normalize = ALGORITHMS[algorithm]
    base32 = base.float()
    deltas = []
    for tensor in tensors:
        delta = tensor.float() - base32
        if sparsify_method is not None:
            delta = sparsify(delta, density, sparsify_method, generator)
        deltas.append(delta)
    stacked = torch.stack(deltas)  # (n, *shape)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=stacked.device)
    w = w.view(-1, *([1] * base.dim()))
    weighted = stacked * w
    if consensus == "sum":
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        keep = (weighted.sign() == majority).float()
        mixed = (weighted * keep).sum(0)
        divisor = (w * keep).sum(0)
        divisor[divisor == 0] = 1.0
    elif consensus is None:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1.0
    else:  # pragma: no cover - ALGORITHMS only names the consensus methods above
        raise ValueError(f"unknown consensus method {consensus!r}.")
    if normalize:
        mixed = mixed / divisor
    return (base32 + mixed).to(base.dtype)
