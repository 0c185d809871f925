"""Backend choice and argument checks shared by the kernel ops.

Every op has a torch reference (``reference.py``, the spec) and a Triton implementation (``triton.py``) with the
same signature. The public function in each op's ``__init__.py`` checks its arguments here, then dispatches:
Triton when the tensors are on CUDA and triton is importable, torch otherwise. ``backend="triton"`` forces the
Triton path, which also runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported) — that is how the tests compare both paths without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for these tensors.

    ``None`` picks Triton when every tensor is on CUDA and triton is importable, else torch. ``"triton"`` is
    honoured or fails loudly: without triton, or on CPU tensors outside the interpreter.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS} or None, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend is None:
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the `triton` package (pip install 'hf-longmem[triton]')")
        if not on_cuda and not triton_interpreted():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                "to run the kernels on CPU tensors"
            )
    return backend


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"`scaling` must be a positive finite float (usually head_dim ** -0.5), got {scaling!r}")
    return float(scaling)


def check_softcap(softcap) -> float | None:
    """``None`` (no soft-capping) or a positive finite float."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"`softcap` must be None or a positive finite float, got {softcap!r}")
    return float(softcap)


def check_4d(name: str, tensor, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a 4-D tensor {layout}, got {got}")
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {tensor.dtype}")


def check_same(name: str, tensor: torch.Tensor, query: torch.Tensor) -> None:
    """``tensor`` must share the query's device and dtype (the kernels multiply them without casting)."""
    if tensor.device != query.device:
        raise ValueError(f"`{name}` is on {tensor.device}, `query` on {query.device}")
    if tensor.dtype != query.dtype:
        raise ValueError(f"`{name}` is {tensor.dtype}, `query` is {query.dtype}: pass one dtype")


def check_query_keys_values(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    keys_name: str = "keys",
    values_name: str = "values",
    key_dim: int | None = None,
) -> tuple[int, int, int, int, int]:
    """Checks the ``[b, Hq, q, d]`` / ``[b, Hkv, n, dk]`` / ``[b, Hkv, n, dv]`` triple.

    ``key_dim`` is the expected key width (``None``: the query's ``d``).

    Returns:
        ``(batch, q_heads, kv_heads, num_queries, num_keys)``.
    """
    check_4d("query", query, "[batch, q_heads, q, head_dim]")
    check_4d(keys_name, keys, "[batch, kv_heads, n, head_dim]")
    check_4d(values_name, values, "[batch, kv_heads, n, v_head_dim]")
    batch, q_heads, num_q, head_dim = query.shape
    if num_q < 1:
        raise ValueError("`query` must hold at least one query (q >= 1)")
    if keys.shape[0] != batch or values.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: query {batch}, {keys_name} {keys.shape[0]}, {values_name} {values.shape[0]}"
        )
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if values.shape[1] != kv_heads or values.shape[2] != num_keys:
        raise ValueError(
            f"`{values_name}` {tuple(values.shape)} must match `{keys_name}` {tuple(keys.shape)} in kv_heads and n"
        )
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) of `{keys_name}`")
    expected = head_dim if key_dim is None else key_dim
    if keys.shape[-1] != expected:
        raise ValueError(f"`{keys_name}` head_dim {keys.shape[-1]} must be {expected}")
    for name, tensor in ((keys_name, keys), (values_name, values)):
        check_same(name, tensor, query)
    return batch, q_heads, kv_heads, num_q, num_keys


def check_valid(
    valid, batch: int, kv_heads: int, num_keys: int, name: str = "valid", device=None
) -> torch.Tensor | None:
    """Validates a slot mask and returns it as ``[batch, 1 or kv_heads, n]`` bool (a view), or ``None``."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise ValueError(f"`{name}` must be a bool tensor (False = pad slot), got {getattr(valid, 'dtype', valid)!r}")
    if device is not None and valid.device != torch.device(device):
        raise ValueError(f"`{name}` is on {valid.device}, the attention inputs on {device}")
    if valid.dim() == 2 and tuple(valid.shape) == (batch, num_keys):
        return valid[:, None, :]
    if valid.dim() == 3 and tuple(valid.shape) == (batch, kv_heads, num_keys):
        return valid
    raise ValueError(
        f"`{name}` must be [batch, n] = {(batch, num_keys)} or [batch, kv_heads, n] = {(batch, kv_heads, num_keys)}, "
        f"got {tuple(valid.shape)}"
    )


def check_causal(causal_new: bool, num_queries: int, num_keys: int) -> None:
    if causal_new and num_queries > num_keys:
        raise ValueError(
            f"causal_new=True takes the {num_queries} queries as the last slots, but there are only {num_keys} keys"
        )


def set_kernel_backend(cache, backend: str | None):
    """Chooses the kernels of one cache's layers: ``"torch"``, ``"triton"`` or ``None`` (the layer class's default).

    Per cache instance, so nothing global changes: a layer's ``kernel_backend`` attribute overrides its class's
    default. Layers without kernels (StreamingLLM, SirLLM, DuoAttention, the full cache) are left as they are, and so
    is a layer that set its own (compressed sliding-window layers keep ``"torch"``: the kernels apply no window).

    Args:
        cache: a cache built with the model or its config (``make_cache(name, model, ...)``), whose layers exist.
        backend: ``"torch"``, ``"triton"`` or ``None``.

    Returns:
        ``cache``.

    Raises:
        ValueError: an unknown backend, or a cache that creates its layers on first use (built without a config).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS} or None, got {backend!r}")
    layers = list(getattr(cache, "layers", ()))
    if getattr(cache, "layer_class_to_replicate", None) is not None and not layers:
        raise ValueError(
            f"{type(cache).__name__} creates its layers on first use: build it with the model "
            "(make_cache(name, model, ...)) to choose their kernels"
        )
    for layer in layers:
        if "kernel_backend" in vars(layer):  # the layer's own choice (sliding-window layers)
            continue
        if hasattr(type(layer), "kernel_backend"):
            layer.kernel_backend = backend
    return cache
