"""DuoAttention (Xiao et al., 2024, arXiv 2410.10819): retrieval heads keep every token, streaming heads keep
attention sinks + a recent window.

Each (layer, KV head) is either a *retrieval* head, which keeps the whole KV cache, or a *streaming* head, which
keeps its first ``sink_size`` tokens and its ``recent_size`` most recent ones (StreamingLLM per head). Which heads
are which comes from gates ``α ∈ [0, 1]`` per (layer, KV head), learned offline
(``recipes/duo_identify_heads.py``) or loaded from the official ``full_attention_heads.tsv``; a ``sparsity``
target (the fraction of STREAMING heads) turns them into a pattern.

Storage is real: each layer holds two tensors, retrieval ``[batch, Hr, n, head_dim]`` and streaming
``[batch, Hs, <= S + R, head_dim]``, each with its own position metadata, so :meth:`memory_bytes` shows the saving
(about ``1 - sparsity`` of the full cache at long contexts). The attention of a step is computed per group: the
query heads of each group are gathered with one ``index_select`` on the head axis (GQA-aware: a KV head's whole
query group goes with it), attention runs with the model's fallback kernel (SDPA or eager) and a mask built from
the group's own slots, and the outputs are put back in head order with one more ``index_select``.

Positions are the true ones (no re-rotation), as in the official code. A step attends to what is stored plus the
new tokens (exact attention for every head during a single-chunk prefill, as the official ``q_len == kv_seq_len``
path; ``S + R + chunk`` for streaming heads in a chunked prefill or a decoding step), then the streaming heads are
truncated back to ``S + R`` (the official ``cache[S:S+R] <- last R``).

Deviations from the official code (mit-han-lab/duo-attention), on purpose:

* no weight permutation: the official deployment permutes the q/k/v/o weights so that retrieval heads come first
  and slices contiguous head ranges; we gather heads with ``index_select`` instead (same math, no model surgery);
* per-row decisions: each row of a left-padded batch keeps its own first ``S`` real tokens and last ``R`` real
  tokens and never a pad (the official code is batch-1 and truncates every row at the same columns);
* deterministic thresholding: the official ``sparsify_attention_heads`` breaks ties with ``U(0, 1e-6)`` noise; we
  keep its quantile rule (``ceil(sparsity * (N - 1))`` streaming heads, which is what ``gates >= quantile`` gives
  for distinct gates) and break ties by (layer, head) order; ``sparsity=None`` uses the fixed threshold 0.5 (the
  official function crashes on ``sparsity=None``);
* ``recent_size`` must be at least 1 (the official ``[-recent_size:]`` slice keeps everything when it is 0);
* attention weights are not returned (the two groups attend to different numbers of keys).

Model attention features: each group runs the model's own attention function (softcap, scaling, dropout as the
model applies them); per-query-head state (GPT-OSS's ``module.sinks`` / ``s_aux``) is sliced to the group's query
heads (:class:`~hf_longmem.memory.attention_features.HeadSubsetModule`), and a sliding window goes into the group's
own mask. Where that function is transformers' ``sdpa_attention_forward`` and a decoding step needs no mask, the layer
makes the function's ``scaled_dot_product_attention`` calls itself (the same arguments and output bits, one
transpose for both groups: fewer ops per step).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.integrations import sdpa_attention

from hf_longmem.attention import EAGER_ATTENTION_NAME, LAYER_KWARG, fallback_attention
from hf_longmem.memory.attention_features import HeadSubsetModule
from hf_longmem.memory.masks import slot_mask
from hf_longmem.memory.padding import PAD_POSITION, advance_seen, slot_positions, zero_seen
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_int, check_real

from .base import CompressedLayer, LongMemCache
from .scored import NEEDS_ATTENTION_MESSAGE
from .static import (
    KEEP,
    append_static_options,
    check_static_layers,
    check_static_step,
    finish_freeze,
    lowest_priority_slot,
)

#: ``format`` field of our JSON / safetensors pattern files.
PATTERN_FORMAT = "hf_longmem.duo_attention.head_pattern"
PATTERN_VERSION = 1
#: File names searched in a folder (a model folder or an official ``attn_patterns/...`` folder), in this order.
PATTERN_FILE_NAMES = ("duo_attention_heads.json", "duo_attention_heads.safetensors", "full_attention_heads.tsv")
PATTERN_SUFFIXES = (".json", ".safetensors", ".tsv")

HeadPattern = str | os.PathLike | torch.Tensor | Sequence | bool | None


# ------------------------------------------------------------------------------------------------ pattern files
def load_head_pattern(path: str | os.PathLike) -> torch.Tensor:
    """Reads head gates or a boolean head pattern, ``[num_layers, num_kv_heads]``.

    Args:
        path: a ``.tsv`` file in the official ``full_attention_heads.tsv`` format (tab-separated gates, one row
            per layer), a ``.json`` / ``.safetensors`` file written by :func:`save_head_pattern`, or a folder
            holding one of :data:`PATTERN_FILE_NAMES` (a model folder, or an official ``attn_patterns/...`` folder).

    Returns:
        float32 gates clipped to ``[0, 1]`` (as the official loader does), or a bool tensor (True = retrieval
        head) if the file holds a pattern rather than gates.

    Raises:
        ValueError: if the file is missing, has an unknown suffix or does not hold a 2-D pattern.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in PATTERN_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise ValueError(f"`head_pattern` folder {path} holds none of {list(PATTERN_FILE_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"`head_pattern` file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        try:
            pattern = torch.tensor([[float(value) for value in row] for row in rows], dtype=torch.float32)
        except ValueError as error:  # ragged rows or non-numbers
            raise ValueError(
                f"`head_pattern` file {path} is not a tab-separated [layers x kv_heads] table: {error}"
            ) from None
    elif suffix == ".json":
        content = json.loads(path.read_text())
        if isinstance(content, dict):
            if "retrieval" in content and "gates" not in content:
                pattern = torch.tensor(content["retrieval"], dtype=torch.bool)
            elif "gates" in content:
                pattern = torch.tensor(content["gates"], dtype=torch.float32)
            else:
                raise ValueError(f"`head_pattern` file {path} has neither 'gates' nor 'retrieval'")
        else:
            pattern = torch.tensor(content, dtype=torch.float32)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        key = "gates" if "gates" in tensors else "retrieval"
        if key not in tensors:
            raise ValueError(f"`head_pattern` file {path} has neither a 'gates' nor a 'retrieval' tensor")
        pattern = tensors[key]
    else:
        raise ValueError(f"`head_pattern` file {path} must end with one of {PATTERN_SUFFIXES}")
    return _check_pattern_tensor(pattern, f"file {path}")


def load_head_pattern_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict saved with a JSON / safetensors pattern (empty for the official tsv)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        content = json.loads(path.read_text())
        return dict(content.get("metadata", {})) if isinstance(content, dict) else {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("metadata", "{}"))
    return {}


def save_head_pattern(
    path: str | os.PathLike, gates: torch.Tensor | Sequence, metadata: dict[str, Any] | None = None
) -> Path:
    """Writes gates (float) or a boolean pattern ``[num_layers, num_kv_heads]`` atomically.

    The format follows the suffix: ``.tsv`` (the official format; a bool pattern is written as 0/1 gates, reload it
    with ``sparsity=None`` to keep it exactly; ``metadata`` is not stored), ``.json`` or ``.safetensors`` (ours:
    gates or pattern plus ``metadata``). The file is written to a temporary name in the same folder and renamed,
    so a reader never sees a partial file.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix.lower() not in PATTERN_SUFFIXES:
        raise ValueError(f"`path` must end with one of {PATTERN_SUFFIXES}, got {str(path)!r}")
    pattern = _check_pattern_tensor(torch.as_tensor(gates).detach().cpu(), "`gates`", name="gates")
    is_bool = pattern.dtype == torch.bool
    metadata = dict(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    handle.close()
    tmp = Path(handle.name)
    try:
        suffix = path.suffix.lower()
        if suffix == ".tsv":
            rows = pattern.to(torch.float64).tolist()
            tmp.write_text("".join("\t".join(f"{value:.18e}" for value in row) + "\n" for row in rows))
        elif suffix == ".json":
            key = "retrieval" if is_bool else "gates"
            content = {
                "format": PATTERN_FORMAT,
                "version": PATTERN_VERSION,
                key: pattern.tolist(),
                "metadata": metadata,
            }
            tmp.write_text(json.dumps(content, indent=1) + "\n")
        else:
            from safetensors.torch import save_file

            key = "retrieval" if is_bool else "gates"
            header = {"format": PATTERN_FORMAT, "version": str(PATTERN_VERSION), "metadata": json.dumps(metadata)}
            save_file({key: pattern.contiguous()}, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)  # temp files are created 0600; the pattern is an ordinary shareable file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_pattern_tensor(pattern: torch.Tensor, where: str, name: str = "head_pattern") -> torch.Tensor:
    if pattern.ndim != 2 or pattern.numel() == 0:
        raise ValueError(
            f"`{name}` ({where}) must be a non-empty 2-D [num_layers, num_kv_heads] table, got shape {tuple(pattern.shape)}"
        )
    if pattern.dtype == torch.bool:
        return pattern
    if not (pattern.is_floating_point() or pattern.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"`{name}` ({where}) must hold float gates or booleans, got {pattern.dtype}")
    pattern = pattern.to(torch.float32)
    if not bool(torch.isfinite(pattern).all()):
        raise ValueError(f"`{name}` ({where}) holds NaN or infinite gates")
    return pattern.clamp(0.0, 1.0)


# -------------------------------------------------------------------------------------------------- thresholding
def num_streaming_heads(num_heads: int, sparsity: float) -> int:
    """Streaming heads chosen out of ``num_heads`` at ``sparsity``: ``ceil(sparsity * (num_heads - 1))``.

    That is the count ``gates >= quantile(gates, sparsity)`` leaves below the threshold when gates are distinct
    (the official rule), within one head of ``sparsity * num_heads``.
    """
    return min(num_heads, math.ceil(round(sparsity * (num_heads - 1), 9)))


def select_retrieval_heads(gates: torch.Tensor, sparsity: float | None = 0.5) -> torch.Tensor:
    """Turns gates ``[num_layers, num_kv_heads]`` into a retrieval pattern (True = retrieval head).

    Args:
        gates: float gates in ``[0, 1]`` (higher = needs full attention).
        sparsity: fraction of STREAMING heads in ``[0, 1)``: the :func:`num_streaming_heads` lowest gates stream,
            ties broken by (layer, head) order (earlier heads stream first). ``None``: gates ``>= 0.5`` are retrieval.

    Returns:
        ``[num_layers, num_kv_heads]`` bool.
    """
    gates = _check_pattern_tensor(torch.as_tensor(gates), "gates", name="gates")
    if gates.dtype == torch.bool:
        return gates
    if sparsity is None:
        return gates >= 0.5
    _check_sparsity(sparsity)
    flat = gates.flatten()
    order = flat.sort(stable=True).indices
    retrieval = torch.ones_like(flat, dtype=torch.bool)
    retrieval[order[: num_streaming_heads(flat.numel(), sparsity)]] = False
    return retrieval.view(gates.shape)


def _check_sparsity(sparsity) -> None:
    if sparsity is None:
        return
    check_real("sparsity", sparsity, low=0.0, high=1.0, strict_high=True, hint="fraction of streaming heads, or None")


def resolve_head_pattern(head_pattern: HeadPattern, sparsity: float | None, config=None) -> torch.Tensor | bool:
    """``head_pattern`` as a retrieval pattern: a bool ``[num_layers, num_kv_heads]`` tensor, or one bool for all.

    Args:
        head_pattern: a file or folder (see :func:`load_head_pattern`); gates or a bool pattern as a tensor / array /
            nested list; ``True`` (every head retrieval: the full cache) or ``False`` (every head streaming);
            ``None``: the pattern file saved in the model's folder (``config._name_or_path``).
        sparsity: see :func:`select_retrieval_heads` (ignored for bool patterns).
        config: the model config; the pattern's shape is checked against it.
    """
    _check_sparsity(sparsity)
    if isinstance(head_pattern, bool):
        return head_pattern
    if head_pattern is None:
        folder = getattr(config, "_name_or_path", "") if config is not None else ""
        if not folder or not Path(folder).is_dir() or not any((Path(folder) / n).is_file() for n in PATTERN_FILE_NAMES):
            raise ValueError(
                "`head_pattern` is required: pass a pattern file (official full_attention_heads.tsv or one written by "
                "recipes/duo_identify_heads.py), gates / a bool tensor [num_layers, num_kv_heads], or True/False; "
                f"no {' / '.join(PATTERN_FILE_NAMES)} was found in the model folder {folder!r}"
            )
        head_pattern = folder
    if isinstance(head_pattern, (str, os.PathLike)):
        pattern = load_head_pattern(head_pattern)
    else:
        try:
            pattern = torch.as_tensor(head_pattern).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"`head_pattern` must be a path, a tensor/nested list or a bool, got {type(head_pattern).__name__}: {error}"
            ) from None
        pattern = _check_pattern_tensor(pattern, "tensor")
    retrieval = select_retrieval_heads(pattern, sparsity)
    if config is not None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        expected = (
            text_config.num_hidden_layers,
            getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
        )
        if tuple(retrieval.shape) != expected:
            raise ValueError(
                f"`head_pattern` has shape {tuple(retrieval.shape)} but the model has [num_layers, num_kv_heads] = "
                f"{list(expected)}"
            )
    return retrieval


# --------------------------------------------------------------------------------------------------------- layer
class DuoAttentionLayer(CompressedLayer):
    """One layer of a :class:`DuoAttentionCache`: two groups of KV heads stored separately.

    Stored state (every tensor per row, so beam search and batch selection keep them aligned):

    * ``keys``/``values``: retrieval heads ``[batch, Hr, n, head_dim]`` (``None`` if the layer has none);
    * ``positions``: ``[batch, 1, n]`` int32 true position of each retrieval slot (shared by the group's heads),
      ``PAD_POSITION`` for pad slots;
    * ``streaming_keys``/``streaming_values``: streaming heads ``[batch, Hs, m, head_dim]`` with
      ``m <= sink_size + recent_size`` between steps (``None`` if the layer has none);
    * ``streaming_positions``: ``[batch, 1, m]`` int32;
    * ``real_seen``: ``[batch]`` real tokens seen.

    ``get_stored_length()`` is the longest group (retrieval when present); :meth:`update` returns that group's K/V,
    so ``get_mask_sizes`` matches it, but :meth:`attend` builds each group's mask from its own slots anyway.

    Args:
        retrieval: ``[num_kv_heads]`` bool (True = retrieval head), or one bool for every head.
        sink_size, recent_size: what a streaming head keeps.
        layer_idx: the decoder layer index (for error messages).
    """

    batch_state = (
        "keys",
        "values",
        "positions",
        "streaming_keys",
        "streaming_values",
        "streaming_positions",
        "real_seen",
    )

    def __init__(self, retrieval: torch.Tensor | bool, sink_size: int, recent_size: int, layer_idx: int = 0):
        super().__init__()
        self.retrieval = retrieval
        self.sink_size, self.recent_size, self.layer_idx = sink_size, recent_size, layer_idx
        self.streaming_keys: torch.Tensor | None = None
        self.streaming_values: torch.Tensor | None = None
        # ring writes whose positions are not stored yet: (last slot written, writes since the positions were
        # stored), or None (see the ``streaming_positions`` property)
        self._ring_lazy: tuple[int, int] | None = None
        self._streaming_positions: torch.Tensor | None = None
        self.retrieval_heads: torch.Tensor | None = None  # [Hr] kv-head indices
        self.streaming_heads: torch.Tensor | None = None  # [Hs]
        self.num_kv_heads = 0
        self._query_index: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        # When both groups are contiguous head ranges: their sizes in head order and whether retrieval comes first,
        # so that one ``split`` (a view) separates the groups instead of an ``index_select`` per group and tensor.
        self._contiguous: tuple[list[int], bool] | None = None
        self._pending = False
        # Whether the streaming group holds pad slots (then attention needs a mask), kept from the padding checks
        # update() runs anyway (the retrieval group uses the base class's ``has_pad_slots``).
        self._streaming_padded = False
        # Decoding ring buffer of the streaming heads: when not None, the streaming tensors hold S sinks and a ring of
        # R + 1 recent slots, and ``_oldest`` is the ring slot the next token overwrites (the token that left the
        # window, its position set to PAD_POSITION).
        self._oldest: int | None = None

    # ----------------------------------------------------------------------------------------------- contract
    @property
    def streaming_positions(self) -> torch.Tensor | None:
        """``[batch, 1, m]`` int32 positions of the streaming heads' slots.

        While the ring decodes pad-free rows, its writes do not store positions (nothing reads them: the attention
        needs no mask); they are stored here when first asked: the ``k``-th latest write holds position
        ``real_seen - 1 - k`` in every row (one real token per row and step), and the slot the next token overwrites
        is free once its step has attended.
        """
        if self._ring_lazy is not None:
            last, writes = self._ring_lazy
            self._ring_lazy = None
            ring = self.recent_size + 1
            back = torch.arange(min(writes, ring), device=self._streaming_positions.device)
            slots = self.sink_size + (last - self.sink_size - back) % ring  # [k]
            values = (self.real_seen[:, None] - 1 - back).to(torch.int32)  # [b, k]
            self._streaming_positions[:, 0, slots] = values
            if not self._pending:
                self._streaming_positions.select(2, self._oldest).fill_(PAD_POSITION)
        return self._streaming_positions

    @streaming_positions.setter
    def streaming_positions(self, value: torch.Tensor | None) -> None:
        self._streaming_positions = value
        self._ring_lazy = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        if isinstance(self.retrieval, bool):
            retrieval = torch.full((heads,), self.retrieval, dtype=torch.bool)
        else:
            retrieval = self.retrieval
            if retrieval.shape != (heads,):
                raise ValueError(
                    f"`head_pattern` gives {retrieval.numel()} KV heads for layer {self.layer_idx}, the model has {heads}"
                )
        retrieval = retrieval.to(self.device)
        self.num_kv_heads = heads
        self.retrieval_heads = retrieval.nonzero().flatten()
        self.streaming_heads = (~retrieval).nonzero().flatten()
        self._contiguous = _contiguous_groups(retrieval.tolist())
        positions = torch.zeros(batch, 1, 0, dtype=torch.int32, device=self.device)

        def empty(states: torch.Tensor, count: int) -> torch.Tensor:
            return states.new_zeros(batch, count, 0, states.shape[-1])

        if self.retrieval_heads.numel():
            self.keys = empty(key_states, self.retrieval_heads.numel())
            self.values = empty(value_states, self.retrieval_heads.numel())
            self.positions = positions
        if self.streaming_heads.numel():
            self.streaming_keys = empty(key_states, self.streaming_heads.numel())
            self.streaming_values = empty(value_states, self.streaming_heads.numel())
            self.streaming_positions = positions.clone()
        self.real_seen = zero_seen(batch, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``[batch, kv_heads, q, head_dim]`` states to both groups; :meth:`attend` then truncates.

        Returns the retrieval group's ``[batch, Hr, stored + q, head_dim]`` K/V (the streaming group's if the
        layer has no retrieval head), or the new states of every head at the first step.
        """
        if self._pending:
            raise RuntimeError(NEEDS_ATTENTION_MESSAGE.format(name=type(self).__name__))
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            raise RuntimeError(
                f"{type(self).__name__}: this model does not pass its attention kwargs to Cache.update, "
                "so per-head-group attention cannot run (unsupported model)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, num_new, _ = key_states.shape
        first_step = self.get_stored_length() == 0
        position_ids = attn_kwargs.get("position_ids")
        real_before = self.real_seen
        new_positions, new_pads, self.real_seen = advance_seen(position_ids, real_before, num_new, batch)
        self.cumulative_length += num_new
        retrieval_states, streaming_states = self._split_heads(key_states, value_states)
        if self.keys is not None:  # retrieval heads never drop a token: append into spare capacity (base class)
            keys, values = retrieval_states
            self._steady_appends = 0 if first_step else self._steady_appends + 1
            self.keys = self.append_slots("keys", keys)
            self.values = self.append_slots("values", values)
            if num_new == 1 and not new_pads and self._positions is not None:
                # a real decoded token: its position is the row's count, kept lazily (the base class's tail)
                if not self._tail_count:
                    self._tail_start = real_before
                self._tail_count += 1
            else:
                known = self._no_pads  # retrieval heads never drop a slot: appending real tokens keeps what is known
                # [b, 1, q] int32, converted once per step for every layer (a lazy decoding step needs none)
                self.positions = self.append_slots("positions", slot_positions(new_positions, 1))
                self._no_pads = False if new_pads else known
        if self.streaming_keys is not None:
            keys, values = streaming_states
            if num_new == 1 and not new_pads and not self._streaming_padded and self._ring_ready():
                self._ring_write(keys, values)
            else:
                self._unroll_ring()
                self.streaming_keys = torch.cat((self.streaming_keys, keys), dim=-2)
                self.streaming_values = torch.cat((self.streaming_values, values), dim=-2)
                self.streaming_positions = torch.cat(
                    (self.streaming_positions, slot_positions(new_positions, 1)), dim=-1
                )
                self._streaming_padded |= new_pads
        self._pending = True
        attn_kwargs[LAYER_KWARG] = self
        if first_step:  # every head sees the same tokens: a model on plain attention is exact at this step
            return key_states, value_states
        if self.keys is not None:
            return self.keys, self.values
        return self.streaming_keys, self.streaming_values

    def get_stored_length(self) -> int:
        if self.keys is not None:
            return self.keys.shape[-2]
        return self.get_streaming_length()

    def get_streaming_length(self) -> int:
        """Tokens held by the streaming heads (0 if the layer has none; the ring's free slot is not counted)."""
        if self.streaming_keys is None:
            return 0
        return self.streaming_keys.shape[-2] - (self._oldest is not None and not self._pending)

    # ----------------------------------------------------------------------------------------------- attention
    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """Attention of ``query`` ``[batch, q_heads, q, head_dim]`` per head group, in head order.

        ``key``/``value``/``attention_mask`` (the model's) are ignored: each group attends to its own stored slots
        with a mask built from its positions. Returns ``([batch, q, q_heads, head_dim], None)``.
        """
        implementation = module.config._attn_implementation
        eager = implementation == EAGER_ATTENTION_NAME
        attention = fallback_attention(module, implementation)
        window = kwargs.get("sliding_window")
        sinks = kwargs.get("s_aux") is not None or isinstance(getattr(module, "sinks", None), torch.Tensor)
        retrieval_q, streaming_q, order = self._query_heads(query.shape[1])
        split = self._contiguous
        if split is not None:  # both groups present, contiguous: one split view each, outputs cat'ed in head order
            sizes, retrieval_first = split
            group = query.shape[1] // self.num_kv_heads
            parts = query.split([size * group for size in sizes], dim=1)
            retrieval_part, streaming_part = parts if retrieval_first else parts[::-1]
        groups = (  # positions are read only where a mask is built (both are kept lazily while decoding)
            (self.keys, self.values, lambda: self.positions, retrieval_q),
            (self.streaming_keys, self.streaming_values, lambda: self.streaming_positions, streaming_q),
        )
        calls = []  # (module, query, keys, values, mask, kwargs) of each group present
        for keys, values, positions, query_heads in groups:  # two head groups, not a loop over heads
            if keys is None:
                continue
            whole = query_heads.numel() == query.shape[1]
            if whole:
                group_query = query
            elif split is not None:
                group_query = retrieval_part if query_heads is retrieval_q else streaming_part
            else:
                group_query = query.index_select(1, query_heads)
            group_module, group_kwargs = module, kwargs
            if sinks and not whole:  # per-query-head sinks (GPT-OSS): the model's attention sees this group's own
                group_module = HeadSubsetModule(module, query_heads)
                if kwargs.get("s_aux") is not None:
                    group_kwargs = {**kwargs, "s_aux": kwargs["s_aux"].index_select(0, query_heads)}
            padded = self.has_pad_slots() if keys is self.keys else self._streaming_padded
            needs_mask = eager or not getattr(module, "is_causal", True)  # SDPA is causal only if the module is
            mask = self._mask(positions, query.shape[-2], keys.shape[-2], query.dtype, needs_mask, padded, window)
            calls.append((group_module, group_query, keys, values, mask, group_kwargs))
        if split is not None and self._plain_sdpa_decode(attention, module, query, calls, sinks, dropout, kwargs):
            # transformers' SDPA function on both groups, called as it calls SDPA (same output bits), with the
            # outputs joined in the kernel's layout and transposed once: 3 ops a layer fewer than two calls of it
            gqa = {"enable_gqa": True} if getattr(module, "num_key_value_groups", 1) > 1 else {}
            outputs = [
                torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, **gqa)
                for _, q, k, v, _, _ in calls
            ]
            if not split[1]:  # streaming heads first: cat in head order
                outputs.reverse()
            output = torch.cat(outputs, dim=1).transpose(1, 2).contiguous()  # [batch, q, q_heads, head_dim]
            self._after_attention()
            return output, None
        outputs = []
        for group_module, group_query, keys, values, mask, group_kwargs in calls:
            output, _ = attention(
                group_module, group_query, keys, values, mask, scaling=scaling, dropout=dropout, **group_kwargs
            )
            outputs.append(output)  # [batch, q, group_q_heads, head_dim]
        if split is not None and not split[1]:  # streaming heads first: cat in head order
            outputs.reverse()
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        if order is not None and len(outputs) > 1 and split is None:
            output = output.index_select(2, order)
        self._after_attention()
        return output, None

    def _after_attention(self) -> None:
        """The step has attended: the ring's oldest token leaves the window (or the window is truncated)."""
        self._pending = False
        if self._oldest is not None:  # the ring's oldest token leaves the window now that this step has seen it
            if self._ring_lazy is None:  # else the positions property frees it when asked
                self._streaming_positions.select(2, self._oldest).fill_(PAD_POSITION)
        else:
            self._truncate_streaming()

    @staticmethod
    def _plain_sdpa_decode(attention, module, query, calls, sinks: bool, dropout: float, kwargs) -> bool:
        """Whether this step's two group calls are transformers' ``sdpa_attention_forward`` doing nothing but
        ``F.scaled_dot_product_attention`` (then :meth:`attend` makes those calls itself): one decoded query, no
        mask for either group, no sinks, softcap, dropout or attention-weights request, on CPU or CUDA, where that
        function passes ``enable_gqa`` (its ``use_gqa_in_sdpa``) rather than repeating the keys or packing the
        query."""
        uses_gqa = getattr(sdpa_attention, "use_gqa_in_sdpa", None)  # transformers' own choice, mirrored
        return (
            attention is sdpa_attention.sdpa_attention_forward
            and uses_gqa is not None
            and len(calls) == 2
            and query.shape[-2] == 1
            and all(call[4] is None for call in calls)
            and not sinks
            and not dropout
            and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)
            and query.device.type in ("cpu", "cuda")
            and all(uses_gqa(None, call[2], call[3]) for call in calls)
        )

    def _query_heads(self, num_query_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query-head indices of each group and the order that puts ``cat(retrieval, streaming)`` back."""
        if num_query_heads not in self._query_index:
            if num_query_heads % self.num_kv_heads:
                raise ValueError(f"{num_query_heads} query heads do not split into {self.num_kv_heads} KV-head groups")
            group = num_query_heads // self.num_kv_heads
            offsets = torch.arange(group, device=self.device)

            def expand(kv_heads: torch.Tensor) -> torch.Tensor:
                return (kv_heads[:, None] * group + offsets).flatten()

            retrieval_q, streaming_q = expand(self.retrieval_heads), expand(self.streaming_heads)
            order = torch.cat((retrieval_q, streaming_q)).argsort()
            identity = bool((order == torch.arange(num_query_heads, device=order.device)).all())
            self._query_index[num_query_heads] = (retrieval_q, streaming_q, None if identity else order)
        return self._query_index[num_query_heads]

    @staticmethod
    def _mask(
        positions: Callable[[], torch.Tensor],
        num_new: int,
        num_keys: int,
        dtype: torch.dtype,
        eager: bool,
        padded: bool,
        sliding_window: int | None = None,
    ):
        """The group's own mask ``[batch, 1, q, n]`` (``None`` where the kernel's causal default is exact), with the
        model's sliding window by true positions (attention functions take the window from the mask); ``positions``
        gives the group's ``[batch, 1, n]`` positions."""
        # no mask where SDPA's own causal default is exact (the caller passes eager=True for a module that is not
        # causal); an eager attention always gets one (some add the mask unconditionally, e.g. ModernBERT)
        plain = not eager and (num_new == 1 or num_new == num_keys)
        if plain and not padded and sliding_window is None:
            return None
        return slot_mask(positions()[:, 0], num_new, dtype if eager else None, sliding_window)

    def _split_heads(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """``((keys, values), (keys, values))`` of the retrieval and streaming heads ``[batch, H*, q, head_dim]``
        (a group the layer lacks: ``None``), as views when the groups are contiguous head ranges."""
        if self._contiguous is None:
            retrieval = None if self.keys is None else self._heads(key_states, value_states, self.retrieval_heads)
            streaming = (
                None if self.streaming_keys is None else self._heads(key_states, value_states, self.streaming_heads)
            )
            return retrieval, streaming
        sizes, retrieval_first = self._contiguous
        keys, values = key_states.split(sizes, dim=1), value_states.split(sizes, dim=1)
        first, second = (keys[0], values[0]), (keys[1], values[1])
        return (first, second) if retrieval_first else (second, first)

    @staticmethod
    def _heads(key_states: torch.Tensor, value_states: torch.Tensor, heads: torch.Tensor):
        if heads.numel() == key_states.shape[1]:
            return key_states, value_states
        return key_states.index_select(1, heads), value_states.index_select(1, heads)

    # ------------------------------------------------------------------------------------------- compression
    def _ring_ready(self) -> bool:
        """Whether a decoding token can go into the ring (creating it when the window has just filled up)."""
        if self._oldest is not None:
            return True
        if self.streaming_keys.shape[-2] != self.sink_size + self.recent_size:
            return False
        # The window is full and in token order: appending one slot makes the ring; slot S is the oldest recent token.
        batch, heads, _, head_dim = self.streaming_keys.shape
        self.streaming_keys = torch.cat(
            (self.streaming_keys, self.streaming_keys.new_empty(batch, heads, 1, head_dim)), 2
        )
        self.streaming_values = torch.cat(
            (self.streaming_values, self.streaming_values.new_empty(batch, heads, 1, self.streaming_values.shape[-1])),
            2,
        )
        self.streaming_positions = torch.cat(
            (self.streaming_positions, self.streaming_positions.new_full((batch, 1, 1), PAD_POSITION)), 2
        )
        self._oldest = self.sink_size + self.recent_size  # the new, free slot
        ring = torch.arange(self.sink_size, self._oldest + 1, device=self.streaming_keys.device)
        self._ring_slots = ring[:, None].unbind(0)  # the [1] index of each ring slot, made once
        return True

    def _ring_write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes one decoding token ``[batch, Hs, 1, head_dim]`` over the ring's free slot, in place.

        The step then attends to all ``S + R + 1`` slots: the sinks, the ``R`` previous recent tokens and this one,
        exactly what appending and truncating gives, without moving the window (order does not matter to attention;
        positions were applied by RoPE before the cache).
        """
        slot = self._oldest
        index = self._ring_slots[slot - self.sink_size]  # one op per tensor (index_copy_), not a slice and a copy
        self.streaming_keys.index_copy_(2, index, keys)
        self.streaming_values.index_copy_(2, index, values)
        # the position (the row's count) is stored when first asked (the streaming_positions property)
        lazy = self._ring_lazy
        self._ring_lazy = (slot, 1 if lazy is None else lazy[1] + 1)
        ring = self.recent_size + 1
        self._oldest = self.sink_size + (slot - self.sink_size + 1) % ring

    def streaming_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The streaming heads' tokens in token order: ``(keys, values, positions)``, or ``None`` without any.

        While decoding, the stored tensors are a ring (see :meth:`_ring_write`); this gives the sinks followed by the
        recent tokens oldest first, ``[batch, Hs, S + R, head_dim]`` (and ``[batch, 1, S + R]`` positions).
        """
        if self.streaming_keys is None:
            return None
        if self._oldest is None or self._pending:
            return self.streaming_keys, self.streaming_values, self.streaming_positions
        ring = self.recent_size + 1
        start = self._oldest - self.sink_size + 1  # the oldest token still in the window
        order = [*range(self.sink_size), *(self.sink_size + (start + j) % ring for j in range(self.recent_size))]
        index = torch.tensor(order, device=self.streaming_keys.device)
        return tuple(
            t.index_select(2, index) for t in (self.streaming_keys, self.streaming_values, self.streaming_positions)
        )

    def _unroll_ring(self) -> None:
        """Puts the ring back in token order (sinks, then the ``R`` recent tokens oldest first) for a general step."""
        if self._oldest is None:
            return
        self.streaming_keys, self.streaming_values, self.streaming_positions = self.streaming_state()
        self._oldest = None

    def _truncate_streaming(self) -> None:
        """Keeps, per row, the first ``sink_size`` and last ``recent_size`` real slots of the streaming heads.

        Rows with fewer real slots than the longest row's kept count are filled on the left with pad slots.
        """
        if self.streaming_keys is None:
            return
        positions = self.streaming_positions[:, 0]  # [b, n]
        batch, n = positions.shape
        if n <= self.sink_size + self.recent_size:
            return
        real = positions != PAD_POSITION
        rank = real.cumsum(-1) - 1  # index among the row's real slots
        count = real.sum(-1, keepdim=True)
        keep = real & ((rank < self.sink_size) | (rank >= count - self.recent_size))
        stored = int(keep.sum(-1).max())
        if stored == n:
            return
        slots = torch.arange(n, device=positions.device).expand(batch, n)
        index = torch.where(keep, slots, -1).sort(dim=-1).values[:, n - stored :]  # [b, stored], fillers first
        filler = index < 0
        index = index.clamp(min=0)
        heads = self.streaming_keys.shape[1]
        key_index = index[:, None, :, None].expand(batch, heads, stored, self.streaming_keys.shape[-1])
        value_index = index[:, None, :, None].expand(batch, heads, stored, self.streaming_values.shape[-1])
        self.streaming_keys = self.streaming_keys.gather(2, key_index)
        self.streaming_values = self.streaming_values.gather(2, value_index)
        self.streaming_positions = positions.gather(1, index).masked_fill(filler, PAD_POSITION)[:, None, :]
        self._streaming_padded = bool(filler.any())

    # ------------------------------------------------------------------------------------------------- misc
    def reset(self) -> None:
        super().reset()
        self.streaming_keys = self.streaming_values = self.streaming_positions = None
        self._pending = self._streaming_padded = False
        self._oldest = None


class StaticDuoAttentionLayer(DuoAttentionLayer):
    """:class:`DuoAttentionLayer` with a static layout (``static=True``; :mod:`~hf_longmem.cache_classes.static`).

    After the prefill, the retrieval heads hold the prompt plus ``max_new_tokens`` slots, filled in place (one more
    token raises), and the streaming heads ``sink_size + recent_size + 1`` slots, a ring where each step overwrites
    the oldest non-sink token (the one the dynamic layer dropped after the previous step). Each group's mask comes
    from its slots' validity.
    """

    is_compileable = True

    def __init__(self, *args, max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self._frozen = False

    def freeze(self) -> None:
        """Moves both groups into fixed buffers (eager, once, after the prefill)."""
        if self.sliding_window is not None:
            raise ValueError("DuoAttention (static=True) supports full-attention layers only")
        static = []
        if self.keys is not None:
            self.keys, self.values, positions = _padded(self.keys, self.values, self.positions, self.max_new_tokens)
            self.store(self.keys, self.values, positions, no_pads=False)
            static += [self.keys, self.values, self._positions]
        if self.streaming_keys is not None:
            extra = self.sink_size + self.recent_size + 1 - self.streaming_keys.shape[-2]
            self.streaming_keys, self.streaming_values, self.streaming_positions = _padded(
                self.streaming_keys, self.streaming_values, self.streaming_positions, extra
            )
            self._streaming_padded = True
            static += [self.streaming_keys, self.streaming_values, self.streaming_positions]
        self._append_buffers.clear()
        finish_freeze(self, static)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self._frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        name = type(self).__name__
        attn_kwargs = kwargs.get("kwargs")
        check_static_step(self, key_states.shape[-2], attn_kwargs, self._pending)
        new_position = self.real_seen.to(torch.int32)[:, None, None]  # [b, 1, 1]
        if self.keys is not None:  # retrieval heads: the first free slot
            free = self._positions[:, 0] == PAD_POSITION  # [b, capacity]
            torch._assert_async(
                free.any(dim=-1).all(), f"{name} (static=True): capacity exceeded, more tokens than max_new_tokens"
            )
            slot = free.to(torch.int32).argmax(dim=-1)[:, None, None]  # [b, 1, 1]
            keys, values = self._heads(key_states, value_states, self.retrieval_heads)
            _write(self.keys, self.values, self._positions, slot, keys, values, new_position)
        if self.streaming_keys is not None:  # streaming heads: a free slot, else the oldest non-sink token
            positions = self.streaming_positions
            priority = positions.long().masked_fill((positions >= 0) & (positions < self.sink_size), KEEP)
            priority = priority.masked_fill(positions == PAD_POSITION, PAD_POSITION - 1)
            slot = lowest_priority_slot(priority, positions)[..., None]  # [b, 1, 1]
            keys, values = self._heads(key_states, value_states, self.streaming_heads)
            _write(self.streaming_keys, self.streaming_values, positions, slot, keys, values, new_position)
        self.real_seen.add_(1)
        self.cumulative_length.add_(1)
        attn_kwargs[LAYER_KWARG] = self
        self._pending = True
        if self.keys is not None:
            return self.keys, self.values
        return self.streaming_keys, self.streaming_values

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        output = super().attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if not self._frozen:
            self.freeze()
        return output

    def _mask(self, positions, num_new, num_keys, dtype, eager, padded, sliding_window=None):
        if not self._frozen:
            return DuoAttentionLayer._mask(positions, num_new, num_keys, dtype, eager, padded, sliding_window)
        valid = (positions()[:, :1] != PAD_POSITION)[:, :, None, :]  # [b, 1, 1, capacity]
        if not eager:
            return valid
        return torch.zeros_like(valid, dtype=dtype).masked_fill(~valid, torch.finfo(dtype).min)

    def _truncate_streaming(self) -> None:
        if not self._frozen:  # frozen: the ring overwrites in place at the next step
            super()._truncate_streaming()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self._frozen:
            return super().get_mask_sizes(query_length)
        return self.get_stored_length(), 0  # unused by this layer (it masks its own slots)

    def reset(self) -> None:
        super().reset()
        self._frozen = False


def _contiguous_groups(retrieval: list[bool]) -> tuple[list[int], bool] | None:
    """``(sizes in head order, retrieval first)`` when the retrieval and the streaming heads are two non-empty
    contiguous ranges (``[r, r, s]`` or ``[s, r, r]``), else ``None``."""
    switches = sum(a != b for a, b in zip(retrieval, retrieval[1:]))
    if switches != 1:
        return None
    first = retrieval.index(not retrieval[0])
    return [first, len(retrieval) - first], retrieval[0]


def _padded(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, extra: int):
    """``keys``/``values`` ``[b, h, n, d]`` and ``positions`` ``[b, 1, n]`` followed by ``extra`` free slots."""
    keys = torch.nn.functional.pad(keys, (0, 0, 0, extra))
    values = torch.nn.functional.pad(values, (0, 0, 0, extra))
    return keys, values, torch.nn.functional.pad(positions, (0, extra), value=PAD_POSITION)


def _write(keys, values, positions, slot, new_keys, new_values, new_position) -> None:
    """Writes one token ``[b, h, 1, d]`` into slot ``[b, 1, 1]`` of each row, in place."""
    keys.scatter_(2, slot[..., None].expand(-1, keys.shape[1], 1, keys.shape[-1]), new_keys)
    values.scatter_(2, slot[..., None].expand(-1, values.shape[1], 1, values.shape[-1]), new_values)
    positions.scatter_(2, slot, new_position)


# --------------------------------------------------------------------------------------------------------- cache
class DuoAttentionCache(LongMemCache):
    """DuoAttention: retrieval heads keep the full KV cache, streaming heads keep sinks + a recent window.

    Args:
        head_pattern: which KV heads are retrieval heads, ``[num_layers, num_kv_heads]``: a pattern file or folder
            (the official ``full_attention_heads.tsv``, or ``.json`` / ``.safetensors`` from
            :func:`save_head_pattern` / ``recipes/duo_identify_heads.py``), gates (floats in ``[0, 1]``) or a bool
            pattern as a tensor / nested list, or ``True`` / ``False`` for every head retrieval / streaming.
            ``None`` looks for a pattern file in the model's folder.
        sparsity: fraction of STREAMING heads in ``[0, 1)`` when ``head_pattern`` holds gates (the lowest gates
            stream, see :func:`select_retrieval_heads`); ``None`` streams the heads with gates below 0.5. Ignored for
            bool patterns. Paper settings: 0.5 for GQA models (Llama-3), 0.75 for MHA (Llama-2).
        sink_size: initial tokens a streaming head keeps (official eval default 64).
        recent_size: most recent tokens a streaming head keeps (official default 256).
        config: the model config: checks the pattern's shape and lays out sliding-window layers.
        static, max_new_tokens: after the prefill, fixed slots written in place (:class:`StaticDuoAttentionLayer`;
            ``is_compileable``): the retrieval heads reserve ``max_new_tokens`` slots (generating more raises), the
            streaming heads decode into a ring. Same attention as ``static=False`` (float rounding aside);
            full-attention models, the prompt prefilled in one forward.

    Memory: at a context of ``T`` tokens, a layer holds ``Hr * T + Hs * (S + R)`` token slots instead of
    ``(Hr + Hs) * T`` (plus 4 bytes of position per slot and group).

    Example::

        cache = hf_longmem.make_cache("duo_attention", model, head_pattern="full_attention_heads.tsv", sparsity=0.5)
        model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    @classmethod
    def options_for_budget(cls, budget: int) -> dict:
        """Streaming heads hold ``budget`` tokens: an eighth of it (at most 64, the paper's) as sinks, the rest recent.

        Retrieval heads keep every token whatever the budget; ``sparsity`` sets how many heads stream.
        """
        sink = min(64, budget // 8)
        return {"sink_size": sink, "recent_size": max(1, budget - sink)}

    def __init__(
        self,
        head_pattern: HeadPattern = None,
        sparsity: float | None = 0.5,
        sink_size: int = 64,
        recent_size: int = 256,
        config=None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        check_int("sink_size", sink_size, low=0)
        check_int("recent_size", recent_size, low=1)
        pattern = resolve_head_pattern(head_pattern, sparsity, config)
        self.retrieval_pattern = pattern
        self.sparsity, self.sink_size, self.recent_size = sparsity, sink_size, recent_size
        self.static = append_static_options(static, max_new_tokens)

        def factory(layer_idx: int) -> DuoAttentionLayer:
            if not isinstance(pattern, bool) and layer_idx >= pattern.shape[0]:
                raise ValueError(f"`head_pattern` has {pattern.shape[0]} layers, the model has more")
            retrieval = pattern if isinstance(pattern, bool) else pattern[layer_idx]
            if self.static:
                return StaticDuoAttentionLayer(
                    retrieval, sink_size, recent_size, layer_idx, max_new_tokens=max_new_tokens
                )
            return DuoAttentionLayer(retrieval, sink_size, recent_size, layer_idx)

        super().__init__(factory, config=config)
        check_static_layers(self, self.static, StaticDuoAttentionLayer)

    @classmethod
    def from_model(cls, model, **kwargs) -> DuoAttentionCache:
        return cls(config=model.config, **kwargs)

    @property
    def streaming_fraction(self) -> float:
        """Fraction of KV heads that stream (1.0 / 0.0 for a bool ``head_pattern``)."""
        if isinstance(self.retrieval_pattern, bool):
            return 0.0 if self.retrieval_pattern else 1.0
        return float((~self.retrieval_pattern).float().mean())


__all__ = [
    "DuoAttentionCache",
    "DuoAttentionLayer",
    "load_head_pattern",
    "load_head_pattern_metadata",
    "num_streaming_heads",
    "resolve_head_pattern",
    "save_head_pattern",
    "select_retrieval_heads",
]


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "duo_attention",
    DuoAttentionCache,
    needs_attention=True,
    summary="DuoAttention: retrieval heads keep every token, streaming heads sinks + recent window",
)
