"""InfLLM (Xiao et al., 2024): training-free long context with a block memory retrieved by representative keys.

Per layer the context is ``[n_init initial tokens | memory blocks of block_size | local window of n_local]``:

* **Local window**: each query attends to itself and the ``n_local - 1`` tokens before it, at their true relative
  positions (the keys HF caches are post-RoPE, so this is ordinary attention over the window).
* **Memory** (regime (c) of the positions notes): the initial tokens, the retrieved blocks and the tokens that left
  the window but do not fill a block yet (the "remainder") are all seen at ONE constant distance: memory keys are
  stored unrotated (rotated back to position 0, ``RotaryShift.rotate(keys, -position)``) and the query is rotated
  to position ``n_local - 1``. A query sees exactly the tokens that are not in its own window (complementary masks).
* **Merge**: the local and memory parts are computed separately with their log-sum-exp and merged exactly
  (:func:`~hf_longmem.kernels.merge_attention`), which equals one softmax over both.
* **Retrieval**: the memory part's query is the chunk-mean query (rotated as above, all heads concatenated); each
  block's representative is the mean of its ``repr_topk`` keys that received the most local-window attention while
  they were in the window (per query head, as the official code). The ``topk`` best blocks (all blocks when there
  are at most ``topk``) are chosen per chunk and per decoding step, shared by the heads of the layer
  (:func:`~hf_longmem.kernels.block_topk.block_topk`). With ``perhead=True`` (the official ``perhead`` option of
  ``ContextManager``) every query head instead retrieves its own ``topk`` blocks by its own score
  ``q_h . r_{b,h}``; the union of a row's blocks is gathered once and each head attends to its own blocks (plus the
  shared initial tokens and remainder). On the embedded 4-layer model this matters: the passkey is copied by one
  head of layer 1 (forcing the needle block into that head alone restores 100% at 2048 tokens) while the summed
  score of the other heads ranks the needle block last at some decoding steps.
* **Memory formation**: after each chunk, tokens that left the window first fill the ``n_init`` initial tokens,
  then form blocks of ``block_size`` that go to a :class:`~hf_longmem.memory.block_store.BlockStore` (CPU with a
  device LRU of ``max_cached_blocks`` per row on CUDA; prefetched on a side stream while the local part runs).
* **Resident memory**: the device holds the window (plus the remainder, less than a block), the initial tokens,
  the LRU and, by default (official), every block's representative, which grows with the context. With
  ``offload_representatives=True`` the representatives stay with the offloaded blocks and are scored there (only
  the chunk's mean query goes to the host, only the chosen ids come back): the resident bytes are then constant
  in the context length. The outputs are the same on CPU (the same float32 dot products); on CUDA the device path
  scores with the Triton kernel and the host path with a torch einsum, so blocks whose scores tie to rounding may
  be picked differently.
  :meth:`InfLLMCache.memory_parts` names each part and where it lives.
* **Chunking**: a forward of ``q`` tokens (``generate`` hands the whole prompt to one forward) is processed in
  execution blocks of ``exc_block_size`` queries inside :meth:`InfLLMLayer.attend`, updating the memory between
  chunks, so a long prompt never needs a ``[q, q]`` attention matrix. Splitting the prompt in the caller
  (``generate(..., prefill_chunk_size=exc_block_size)``) gives the same result.

``get_seq_length()`` counts the tokens seen. With ``n_local`` at least the sequence length nothing leaves the
window and the cache equals ``DynamicCache`` (up to float rounding of the attention kernels).

Deviations from the official code (thunlp/InfLLM ``context_manager.py``):

* HF caches see post-RoPE keys/queries, so memory keys are unrotated by a rotation of ``-position`` and the memory
  query rotated by ``n_local - 1 - position`` (exact up to float rounding; the official code keeps pre-RoPE states).
  The model's own RoPE is used; the official configs override the RoPE base (``base: 1e6``/``5e5``).
* Fixed: within a chunk the official memory mask uses an offset that lets every query of the chunk see the whole
  remainder, so the remainder tokens that are also in an early query's window are counted twice (once at their true
  position, once at the constant distance). Here each query sees the remainder tokens outside its own window only.
* Block scores and representatives are computed in float32 (the official code uses the model dtype).
* Batches (the official code is effectively batch 1): every row keeps its own initial tokens, blocks,
  representatives, window and retrievals, and left-padded batches are supported: pads are never stored nor
  attended, and a forward's execution blocks are counted from each row's first real token, so a row gives what
  it gives alone when fed the same real tokens per forward (one prefill forward, as ``generate`` does by default,
  and decoding). Rows differ in length: the window and initial tokens are right-aligned ``[b, ..., R]`` tensors
  whose empty slots carry ``PAD_POSITION``, masks are built from positions, and the memory part is laid out per
  row with one stable sort (:meth:`InfLLMLayer._memory_states_per_row`); blocks are formed per group of rows with
  the same block sizes. Beam search reorders every per-row structure, block store included. Pads are told from the
  model's 2-D attention mask by a decoder pre-hook (:func:`attach_padding_hook`, attached by ``from_model``), since
  a forward made only of pads carries position ids that read as a real token.
* Only the default ``cache_strategy="lru"`` is implemented (not ``"lru-s"``), and no faiss index.
* Model attention features (:mod:`hf_longmem.memory.attention_features`): the logit softcap (Gemma-2) applies to
  local and memory logits, attention sinks (GPT-OSS) join the merged softmax; a layer whose attention has a sliding
  window, or attention dropout in training, is refused at its first attention call (the window + memory replace the
  model's attention span; the parts are merged by log-sum-exp, not one probability matrix).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import CacheLayerMixin

from hf_longmem.attention import LAYER_KWARG
from hf_longmem.kernels.decode_attention import decode_attention, merge_attention
from hf_longmem.kernels.decode_attention.reference import grouped_logits, grouped_values, softcap_logits
from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes
from hf_longmem.memory.attention_features import AttentionFeatures
from hf_longmem.memory.block_store import BlockStore
from hf_longmem.memory.padding import PAD_POSITION, advance_seen, zero_seen
from hf_longmem.memory.rope import LayerRotation, RotaryShift
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_int

from .base import LongMemCache
from .hooked import ModelHookedCache
from .rotation import rotary_for

NEEDS_ATTENTION_MESSAGE = (
    "{name} needs hf_longmem attention to see the queries: build the cache with "
    "hf_longmem.make_cache(name, model, ...) or call hf_longmem.enable_longmem_attention(model) first"
)


def refuse_sliding_layers(cls_name: str, layers, config) -> None:
    """``ValueError`` if a layer of ours sits where ``config`` has sliding-window attention (the window + memory
    replace the model's attention span, so the window cannot be honoured)."""
    if config is None:
        return  # layers are built on first use; the attention call refuses a window then
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types, _ = get_layer_types_and_kwargs(text_config)
    ours = [isinstance(layer, InfLLMLayer) for layer in layers]
    sliding = [i for i, (mine, kind) in enumerate(zip(ours, layer_types)) if mine and kind == "sliding_attention"]
    if sliding:
        raise ValueError(
            f"unsupported model: {cls_name} does not apply a sliding window (layers {sliding} of this "
            f"{getattr(text_config, 'model_type', 'model')} use sliding-window attention)"
        )


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The module of ``model`` that runs the decoder layers with the cache: ``get_decoder()`` when that module takes a
    cache argument, else ``base_model``, else ``model`` itself (on ModernBERT-decoder ``get_decoder()`` is the LM
    head's ``Linear``, where a hook would never see a forward that uses the cache)."""
    get_decoder = getattr(model, "get_decoder", None)
    for candidate in (get_decoder() if callable(get_decoder) else None, getattr(model, "base_model", None), model):
        if isinstance(candidate, torch.nn.Module):
            params = inspect.signature(candidate.forward).parameters
            if "cache" in params or "past_key_values" in params:
                return candidate
    return model


def attach_padding_hook(model, cache) -> RemovableHandle:
    """A forward pre-hook on ``model``'s decoder that tells ``cache`` which new tokens of each forward are pads.

    Position ids alone cannot always tell: transformers fills the positions of pads with 0, so a forward made only of
    pads for some row (``generate``'s prefill chunks of a row padded by more than a chunk) reads as one real token at
    position 0. The decoder receives the 2-D ``attention_mask``; the hook keeps ``(tokens seen, real [b, q] bool)``
    on ``cache._forward_padding`` (``real`` is ``None`` when no new token is a pad), which :class:`InfLLMLayer` uses
    for the forward that follows. Held weakly: removed when the cache is collected.
    """
    decoder = decoder_stack(model)
    cache_ref = weakref.ref(cache)

    def hook(module, args, kwargs):
        observed = cache_ref()
        if observed is None or kwargs.get("cache", kwargs.get("past_key_values")) is not observed:
            return None
        mask = kwargs.get("attention_mask")
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        real = None
        if (
            isinstance(mask, torch.Tensor)
            and mask.ndim == 2
            and inputs is not None
            and mask.shape[-1] >= inputs.shape[1]
        ):
            new = mask[:, -inputs.shape[1] :] != 0  # [b, q]
            real = None if bool(new.all()) else new
        observed._forward_padding = (observed.get_seq_length(), real)
        return None

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    weakref.finalize(cache, handle.remove)
    return handle


def block_representatives(keys: torch.Tensor, scores: torch.Tensor, sizes: list[int], repr_topk: int) -> torch.Tensor:
    """Representative key of each block: the mean of its ``repr_topk`` best-scored keys, per query head.

    Args:
        keys: ``[b, kv_heads, T, d]`` keys of consecutive blocks (``T = sum(sizes)``), unrotated.
        scores: ``[b, q_heads, T]`` local-window attention each token received (per query head).
        sizes: block sizes in order; a block smaller than ``repr_topk`` averages all its keys.
        repr_topk: keys per representative.

    Returns:
        ``[b, len(sizes), q_heads, d]`` in the keys' dtype (computed in float32).
    """
    if len(set(sizes)) == 1:  # blocks of one size (InfLLM's): every slot is inside its block, no ragged index
        return _equal_block_representatives(keys, scores, len(sizes), sizes[0], repr_topk)
    return _ragged_block_representatives(keys, scores, sizes, repr_topk)


def _ragged_block_representatives(
    keys: torch.Tensor, scores: torch.Tensor, sizes: list[int], repr_topk: int
) -> torch.Tensor:
    """:func:`block_representatives` of blocks of any sizes (a ``[blocks, largest]`` index, slots past a block's
    size masked)."""
    batch, kv_heads, total, dim = keys.shape
    q_heads = scores.shape[1]
    group = q_heads // kv_heads
    device = keys.device
    size_t = torch.tensor(sizes, device=device)
    starts = torch.cumsum(size_t, 0) - size_t
    width = max(sizes)
    offsets = torch.arange(width, device=device)
    inside = offsets[None, :] < size_t[:, None]  # [blocks, width]
    token = (starts[:, None] + offsets[None, :]).clamp(max=total - 1)  # [blocks, width]
    block_scores = scores.float()[:, :, token].masked_fill(~inside, float("-inf"))  # [b, H, blocks, width]
    take = min(repr_topk, width)
    best = block_scores.topk(take, dim=-1).indices  # [b, H, blocks, take]
    chosen_ok = inside[torch.arange(len(sizes), device=device)[:, None], best]  # [b, H, blocks, take]
    chosen = token[torch.arange(len(sizes), device=device)[:, None], best]  # token ids
    flat = chosen.reshape(batch, kv_heads, group, -1)  # head h = kv_head * group + j (repeat_kv order)
    expanded = keys.unsqueeze(2).expand(batch, kv_heads, group, total, dim)
    picked = expanded.gather(3, flat[..., None].expand(-1, -1, -1, -1, dim)).float()
    picked = picked.reshape(batch, q_heads, len(sizes), take, dim)
    weight = chosen_ok.float()[..., None]
    reprs = (picked * weight).sum(-2) / weight.sum(-2).clamp(min=1.0)  # [b, H, blocks, d]
    return reprs.permute(0, 2, 1, 3).to(keys.dtype)


def _equal_block_representatives(
    keys: torch.Tensor, scores: torch.Tensor, blocks: int, size: int, repr_topk: int
) -> torch.Tensor:
    """:func:`block_representatives` of ``blocks`` blocks of ``size`` tokens each, as views of the token axis: the same
    top-k (the same scores in the same order), the same keys averaged in the same order (sum, then divided by the
    count: the general path's weights are all 1), in about a third of the ops (InfLLM forms blocks while decoding)."""
    batch, kv_heads, _, dim = keys.shape
    q_heads = scores.shape[1]
    group = q_heads // kv_heads
    take = min(repr_topk, size)
    best = scores.float().reshape(batch, q_heads, blocks, size).topk(take, dim=-1).indices  # [b, H, blocks, take]
    index = best.view(batch, kv_heads, group, blocks, take, 1).expand(-1, -1, -1, -1, -1, dim)
    grouped = keys.reshape(batch, kv_heads, 1, blocks, size, dim).expand(-1, -1, group, -1, -1, -1)
    picked = grouped.gather(4, index).float()  # [b, Hkv, g, blocks, take, d], head h = kv_head * group + j
    reprs = picked.sum(-2) / float(take)
    return reprs.view(batch, q_heads, blocks, dim).permute(0, 2, 1, 3).to(keys.dtype)


class _PerHeadSelection(list):
    """``selected[row][head]`` block ids, carrying the same ids as ``tensor`` ``[b, H, k]`` int64 (``-1`` padded)."""

    def __init__(self, rows: list, index: torch.Tensor):
        super().__init__(rows)
        self.tensor = index


def _is_per_head(selected: list) -> bool:
    """Whether a selection is ``[row][head] -> ids`` (``perhead``) rather than ``[row] -> ids``."""
    return any(isinstance(entry, list) for row in selected for entry in row)


def _row_union(selected: list) -> list[list[int]]:
    """Per row, the sorted block ids that any head of the row selected (a shared selection is returned as is)."""
    if not _is_per_head(selected):
        return selected
    return [sorted({block for ids in heads for block in ids}) for heads in selected]


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` that returns a single tensor as is (one op less per decoding step)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _cat_valid(parts: list[tuple[int, torch.Tensor | None]], units: int, device) -> torch.Tensor | None:
    """``[units, sum of slots]`` bool of consecutive parts ``(slots, [units, slots] bool or None = all real)``;
    ``None`` when every slot is real (the attention then builds no mask)."""
    if all(mask is None for _, mask in parts):
        return None
    return _cat(
        [
            mask if mask is not None else torch.ones(units, slots, dtype=torch.bool, device=device)
            for slots, mask in parts
        ],
        -1,
    )


def _right_align(keep: torch.Tensor) -> torch.Tensor:
    """Slots to gather so that the kept slots of every unit are right-aligned, in order.

    Args:
        keep: ``[units, n]`` bool.

    Returns:
        ``index [units, m]`` int64 (``m`` = the most slots any unit keeps): the dropped slots of a unit that keeps
        fewer come first (gather ``keep`` with it to know which), then its kept slots in their original order.
    """
    width = int(keep.sum(1).max()) if keep.numel() else 0
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # dropped (0) first, stable
    return order[:, keep.shape[1] - width :]


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [units, h, n, ...]`` (or ``[units, n]``) gathered on the slot axis with ``index [units, m]``."""
    if tensor.dim() == 2:
        return tensor.gather(1, index)
    shape = list(tensor.shape)
    shape[2] = index.shape[1]
    expanded = index.view(index.shape[0], 1, index.shape[1], *([1] * (tensor.dim() - 3))).expand(shape)
    return tensor.gather(2, expanded)


class InfLLMLayer(MemoryReport, CacheLayerMixin):
    """One attention layer of an :class:`InfLLMCache`.

    State (per row of the batch; rows may hold different numbers of tokens in every part):

    * ``keys``/``values``: ``[b, kv_heads, R, d]`` post-RoPE states of the most recent tokens not yet in
      memory (the local window plus the remainder), right-aligned: row ``r`` holds ``R_r <= R`` tokens in its last
      ``R_r`` slots, the slots before are empty (``positions == PAD_POSITION``); ``positions`` ``[b, R]`` their
      positions and ``local_scores`` ``[b, q_heads, R]`` float32 the window attention each received
      (representative scores);
    * ``init_keys``/``init_values``: ``[b, kv_heads, I, d]`` the initial tokens, unrotated, right-aligned likewise
      with ``init_valid`` ``[b, I]`` bool (``None`` when every row holds ``I``);
    * ``store``: the memory blocks (unrotated keys) and their representatives, per row.

    Left-padded batches: pads are never stored nor attended. A forward's real tokens of each row are processed in
    execution blocks counted from the row's first real token of the forward (the forward is rearranged with every
    row's real tokens first, then pads), so a row forms its initial tokens, blocks and retrievals exactly as it does
    alone when it is fed the same real tokens per forward (``generate``'s one prefill forward and its decoding
    steps). Masks are built from the stored positions; nothing loops over tokens or heads.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    #: ``None`` dispatches kernels by device (Triton on CUDA); tests force a backend.
    kernel_backend: str | None = None
    #: decoding steps of alike rows in one softmax (:meth:`_decode_step`); tests turn it off to compare
    joint_decode: bool = True

    def __init__(
        self,
        rotary: RotaryShift,
        n_init: int,
        n_local: int,
        block_size: int,
        topk: int,
        repr_topk: int,
        max_cached_blocks: int,
        exc_block_size: int,
        offload: bool | None = None,
        pin_memory: bool | None = None,
        perhead: bool = False,
        offload_representatives: bool = False,
    ):
        super().__init__()
        self.rotary = rotary
        self.n_init, self.n_local, self.block_size = n_init, n_local, block_size
        self.topk, self.repr_topk, self.max_cached_blocks = topk, repr_topk, max_cached_blocks
        self.exc_block_size = exc_block_size
        self.perhead = bool(perhead)
        self.offload, self.pin_memory = offload, pin_memory
        self.offload_representatives = bool(offload_representatives)
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.local_scores: torch.Tensor | None = None
        self.init_keys: torch.Tensor | None = None
        self.init_values: torch.Tensor | None = None
        self.real_seen: torch.Tensor | None = None
        self.init_valid: torch.Tensor | None = None
        self.store: BlockStore | None = None
        self._pending = None
        self._state_pads = False
        #: ``[b, Hkv, u, d]`` the oldest ``u`` recent keys unrotated (rows equal), ahead of need: see `_unrotated_prefix`
        self._unrotated: torch.Tensor | None = None
        #: ``(selection, (keys, values))``: the blocks retrieved at the latest decoding step, see `_retrieved_blocks`
        self._retrieved: tuple | None = None
        #: the cache whose ``_forward_padding`` (:func:`attach_padding_hook`) tells pads from tokens, held weakly
        self.padding_source: weakref.ref | None = (
            None  # whether some row of keys/values holds fewer tokens than the others
        )

    # ----------------------------------------------------------------------------------------------- contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(batch, kv_heads, 0, dim)
        self.values = value_states.new_zeros(batch, kv_heads, 0, value_states.shape[-1])
        self.init_keys, self.init_values = self.keys.clone(), self.values.clone()
        self.init_valid = None
        self._state_pads = False
        self._unrotated = self._retrieved = None
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.local_scores = None  # [b, q_heads, R], created at the first attend (needs the query heads)
        self.real_seen = zero_seen(batch, self.device)
        self.store = BlockStore(
            self.device, self.max_cached_blocks, self.offload, self.pin_memory, self.offload_representatives
        )
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Takes the new ``[b, kv_heads, q, d]`` states; :meth:`attend` (called next by hf_longmem attention) uses them."""
        name = type(self).__name__
        if self._pending is not None:
            raise RuntimeError(NEEDS_ATTENTION_MESSAGE.format(name=name))
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            raise RuntimeError(
                f"{name}: this model does not pass its attention kwargs to Cache.update (unsupported model)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, num_new, _ = key_states.shape
        position_ids = attn_kwargs.get("position_ids")
        real = self._told_real(batch, num_new)
        if real is not None:  # pads known from the mask: pads at 1 (as generate), never mistaken for a token
            if position_ids is None:  # the real tokens continue each row's count
                position_ids = self.real_seen[:, None] + real.long().cumsum(1) - 1
            # the model's own positions for real tokens (checked against each row's count below)
            position_ids = torch.where(real, position_ids.to(real.device).expand(batch, num_new), 1)
        positions, padded, real_seen = advance_seen(position_ids, self.real_seen, num_new, batch)
        self.check_batch(batch, padded)
        self.real_seen = real_seen
        self.cumulative_length += num_new
        self._pending = (key_states, value_states, positions, padded)
        attn_kwargs[LAYER_KWARG] = self
        return key_states, value_states

    def _told_real(self, batch: int, num_new: int) -> torch.Tensor | None:
        """``[b, q]`` bool real new tokens from the model's mask (:func:`attach_padding_hook`), when this forward has
        pads and the hook saw it; ``None`` otherwise (the position ids decide)."""
        cache = self.padding_source() if self.padding_source is not None else None
        told = getattr(cache, "_forward_padding", None)
        if told is None or told[0] != self.cumulative_length or told[1] is None or told[1].shape != (batch, num_new):
            return None
        return told[1].to(self.device)

    def check_batch(self, batch: int, padded: bool = False) -> None:
        """Hook for methods with batch limits (EM-LLM); ``padded``: some new token is a pad."""

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_stored_length(self) -> int:
        """Tokens held: recent + initial + memory blocks (the most of any row)."""
        if not self.is_initialized:
            return 0
        recent = (self.positions != PAD_POSITION).sum(1)
        initial = (
            self.init_valid.sum(1) if self.init_valid is not None else torch.full_like(recent, self.init_keys.shape[-2])
        )
        memory = [sum(self.store.block_sizes(row)) for row in range(self.store.batch_size)] or [0] * recent.shape[0]
        return int((recent + initial + torch.tensor(memory, device=recent.device)).max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # attend() builds its own masks; a [q, q] causal mask is all transformers needs to build
        return query_length, self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    # ------------------------------------------------------------------------------------------- attention
    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """Attention of ``query`` ``[b, q_heads, q, d]`` (post-RoPE) over window + memory, chunk by chunk.

        Returns ``([b, q, q_heads, d], None)`` as transformers attention functions do.
        """
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}.attend called without a preceding update()")
        new_keys, new_values, positions, padded = self._pending
        self._pending = None
        features = AttentionFeatures.of_call(module, query, scaling, dropout, kwargs)
        # the window + memory replace the model's attention span, and probabilities are merged by log-sum-exp
        features.refuse(type(self).__name__, module, sliding_window=True, dropout=True)
        if self.local_scores is None:
            self.local_scores = torch.zeros(query.shape[0], query.shape[1], 0, device=self.device)
        real_counts = None
        if padded:  # every row's real tokens first (in order), then its pads: execution blocks count real tokens
            is_real = positions != PAD_POSITION
            order = torch.sort((~is_real).to(torch.int8), dim=1, stable=True).indices  # [b, q]
            query, new_keys, new_values = _take(query, order), _take(new_keys, order), _take(new_values, order)
            positions = positions.gather(1, order)
            real_counts = is_real.sum(1).tolist()
        num_q = query.shape[-2]
        if num_q <= self.exc_block_size:  # one execution block (every decoding step): no slicing
            output = self._attend_chunk(
                query, new_keys, new_values, positions, features, real_counts is not None and min(real_counts) < num_q
            )
        else:
            outputs = []
            for start in range(0, num_q, self.exc_block_size):  # execution blocks of queries
                stop = min(start + self.exc_block_size, num_q)
                chunk_pads = real_counts is not None and min(real_counts) < stop
                outputs.append(
                    self._attend_chunk(
                        query[:, :, start:stop],
                        new_keys[:, :, start:stop],
                        new_values[:, :, start:stop],
                        positions[:, start:stop],
                        features,
                        chunk_pads,
                    )
                )
            output = torch.cat(outputs, dim=2)
        if padded:  # back to the forward's order (pad queries get zeros)
            output = torch.empty_like(output).scatter_(2, order[:, None, :, None].expand_as(output), output)
        return output.transpose(1, 2).contiguous(), None

    def _attend_chunk(
        self, query, keys, values, positions, features: AttentionFeatures, chunk_pads: bool = False
    ) -> torch.Tensor:
        """One execution block: ``query [b, H, c, d]``, new ``keys``/``values`` ``[b, Hkv, c, d]``, ``positions [b, c]``.

        With ``chunk_pads`` some rows have fewer than ``c`` real queries: their real ones come first, then pads
        (``PAD_POSITION``), which are not stored, see nothing and get zeros. The model's logit softcap applies to the local and memory logits alike (before the masks), its attention
        sinks join the merged softmax (:meth:`AttentionFeatures.add_sinks`), as in its eager attention.

        Returns ``[b, H, c, dv]``.
        """
        scale, softcap = features.scaling, features.softcap
        batch, q_heads, num_q, _ = query.shape
        kv_heads = keys.shape[1]
        group = q_heads // kv_heads
        # memory query: rotated to position n_local - 1 (memory keys sit at 0); retrieval starts early so the
        # host->device copies of the chosen blocks overlap the local attention
        has_memory = (
            self.store.batch_size > 0 or self.init_keys.shape[-2] > 0 or self.keys.shape[-2] + num_q > self.n_local
        )
        query_real = (positions != PAD_POSITION) if chunk_pads else None  # [b, c]
        memory_query = self.rotate_to_window_end(query, positions) if has_memory else None
        selected = self.select_blocks(memory_query, query_real) if has_memory else None
        if selected is not None:
            self.store.prefetch(_row_union(selected))
        if (
            self.joint_decode
            and num_q == 1
            and not (chunk_pads or self._state_pads or self.init_valid is not None)
            and features.sinks is None
            and not (selected is not None and _is_per_head(selected))
        ):
            blocks = self._retrieved_blocks(selected)
            if blocks is not None:  # None: the rows' blocks differ in length (masks by position, below)
                return self._decode_step(query, keys, values, positions, memory_query, blocks, scale, softcap)

        self.keys = torch.cat((self.keys, keys), dim=-2)
        self.values = torch.cat((self.values, values), dim=-2)
        self.positions = torch.cat((self.positions, positions), dim=-1)
        self.local_scores = torch.cat((self.local_scores, self.local_scores.new_zeros(batch, q_heads, num_q)), dim=-1)
        if chunk_pads:  # the pads of the chunk are not stored: right-align every row's tokens again
            self._keep_recent(self.positions != PAD_POSITION)
        general = chunk_pads or self._state_pads or self.init_valid is not None  # rows differ: masks by position
        recent = self.keys.shape[-2]

        # local part: the window of each query (itself + n_local - 1 before), true relative positions
        span = min(recent, self.n_local - 1 + num_q)  # every row's window tokens are among its last slots
        first = recent - span
        window = span - num_q
        local_keys, local_values = self.keys[:, :, first:], self.values[:, :, first:]
        if general:
            key_pos = self.positions[:, None, first:]  # [b, 1, span]
            query_pos = positions[:, :, None]  # [b, c, 1]
            allowed = (key_pos != PAD_POSITION) & (key_pos <= query_pos) & (key_pos > query_pos - self.n_local)
            allowed = allowed[:, None, None]  # [b, 1, 1, c, span]
        elif num_q == 1:  # a decoding step: its window is the last span <= n_local slots, all of them real
            allowed = None
        else:
            q_index = torch.arange(num_q, device=query.device)[:, None]
            k_index = torch.arange(span, device=query.device)[None, :]
            allowed = (k_index <= window + q_index) & (k_index > window + q_index - self.n_local)  # [c, w + c]
        probs = grouped_logits(query, local_keys, scale, softcap)  # [b, Hkv, g, c, w + c], capped before the mask
        if allowed is not None:
            probs = probs.masked_fill_(~allowed, float("-inf"))
        local_lse = torch.logsumexp(probs, dim=-1)  # finite for a real query (it sees itself); -inf for a pad
        safe_lse = local_lse.nan_to_num(neginf=0.0) if chunk_pads else local_lse
        probs = probs.sub_(safe_lse[..., None]).exp_()  # in place: one [c, w + c] buffer per head
        out = grouped_values(probs, local_values)
        out = out.reshape(batch, q_heads, num_q, -1).to(query.dtype)
        lse = local_lse.reshape(batch, q_heads, num_q)

        # memory part: [retrieved blocks | initial tokens | pad | remainder beyond the window], constant distance
        if not has_memory:
            memory = None
        elif general:
            memory = self._memory_states_per_row(selected, query_real, num_q)
        else:
            memory = self._memory_states(selected, num_q)
        if memory is not None:
            mem_keys, mem_values, mem_valid = memory
            per_head = mem_keys.shape[0] != batch  # one unit per (row, query head): [b * H, 1, n, d]
            mem_query = memory_query.reshape(batch * q_heads, 1, num_q, -1) if per_head else memory_query
            mem_out, mem_lse = decode_attention(
                mem_query,
                mem_keys,
                mem_values,
                scale,
                valid=mem_valid,
                causal_new=True,
                backend=self.kernel_backend,
                softcap=softcap,
            )
            if per_head:
                mem_out, mem_lse = mem_out.view(batch, q_heads, num_q, -1), mem_lse.view(batch, q_heads, num_q)
            out, lse = merge_attention(out, lse, mem_out, mem_lse)
        out, lse = features.add_sinks(out, lse)

        # representative scores: window attention under the joint softmax (as the official single softmax):
        # p_joint = p_local * exp(lse_local - lse_joint), summed over the chunk's queries
        joint_lse = lse.view(batch, kv_heads, group, num_q)
        weight = torch.exp(local_lse - (joint_lse.nan_to_num(neginf=0.0) if chunk_pads else joint_lse))
        # sum over the chunk's queries of probs * weight: one batched matmul (einsum's plan, fewer ops)
        received = torch.bmm(weight.reshape(batch * q_heads, 1, num_q), probs.view(batch * q_heads, num_q, span))
        self.local_scores[:, :, first:] += received.view(batch, q_heads, span)
        self.after_chunk()
        return out

    def _decode_step(self, query, keys, values, positions, memory_query, blocks, scale, softcap) -> torch.Tensor:
        """A decoding step (one query per row) when the rows are alike (no pad, initial tokens complete, the same
        number of retrieved tokens in every row, no attention sinks): window and memory in ONE softmax.

        The general path attends the window and the memory separately, merges them by log-sum-exp and weighs the
        window probabilities by ``exp(lse_local - lse_joint)`` for the representative scores. One softmax over
        ``[memory | window]`` is the same mathematics (equal to float32 rounding, tested) and gives the joint
        window probabilities directly. The memory is ``[retrieved blocks | initial tokens | remainder]`` (the
        blocks kept between steps, :meth:`_retrieved_blocks`), and the remainder's values are stored right before
        the window's: keys and values are one ``cat`` each. Every memory slot is visible to a decoding query (no pad
        slot, no mask).

        Args:
            query: ``[b, H, 1, d]``; ``keys``/``values``: the new ``[b, Hkv, 1, d]``; ``positions`` ``[b, 1]``.
            memory_query: ``query`` rotated to position ``n_local - 1`` (``None`` without memory).
            blocks: ``(keys, values)`` ``[b, Hkv, L, d]`` of the retrieved blocks (``None``s without).

        Returns:
            ``[b, H, 1, dv]``.
        """
        batch, q_heads, _, dim = query.shape
        kv_heads = keys.shape[1]
        group, units = q_heads // kv_heads, batch * kv_heads
        self.keys = torch.cat((self.keys, keys), dim=-2)
        self.values = torch.cat((self.values, values), dim=-2)
        self.positions = torch.cat((self.positions, positions), dim=-1)
        recent = self.keys.shape[-2]
        span = min(recent, self.n_local)
        remainder = recent - span  # the window is the last `span` slots; the slots before are the remainder
        window_keys = self.keys[:, :, remainder:].float().reshape(units, span, dim)
        logits = torch.bmm(query.float().reshape(units, group, dim), window_keys.transpose(1, 2))  # [u, g, span]
        block_keys, block_values = blocks
        memory_keys = [block_keys] if block_keys is not None else []
        memory_values = [block_values] if block_values is not None else []
        if self.init_keys.shape[-2]:
            memory_keys.append(self.init_keys)
            memory_values.append(self.init_values)
        if remainder:
            memory_keys.append(self._unrotated_prefix(remainder))
        if memory_keys:  # [memory | window] logits
            memory_keys = _cat(memory_keys, -2).float()
            memory_logits = torch.bmm(
                memory_query.float().reshape(units, group, dim),
                memory_keys.reshape(units, memory_keys.shape[-2], dim).transpose(1, 2),
            )
            logits = torch.cat((memory_logits, logits), dim=-1)
        probs = softcap_logits(logits * scale, softcap).softmax(dim=-1)  # [u, g, memory + span]
        all_values = _cat([*memory_values, self.values], -2)  # the remainder's values precede the window's
        out = torch.bmm(probs, all_values.float().reshape(units, all_values.shape[-2], -1))  # [u, g, dv]
        # representative scores: the window's probabilities under the joint softmax (a new slot for the new token)
        self.local_scores = torch.nn.functional.pad(self.local_scores, (0, 1))
        self.local_scores[:, :, remainder:].add_(probs[..., -span:].view(batch, q_heads, span))
        self.after_chunk()
        return out.view(batch, q_heads, 1, -1).to(query.dtype)

    def _retrieved_blocks(self, selected):
        """``(keys, values)`` ``[b, Hkv, L, d]`` of the retrieved blocks for :meth:`_decode_step` (``(None, None)``
        without a selection), or ``None`` when the rows' blocks differ in length (the general path masks them).

        Kept while the selection stays the same (blocks are only appended, never changed; reordering the rows drops
        it), so that such a step reuses them instead of gathering and concatenating the blocks again. Not kept when
        a selection exceeds the offloaded store's device LRU (those blocks are streamed per step)."""
        if selected is None:
            return None, None
        key = tuple(tuple(ids) for ids in selected)
        kept = self._retrieved
        if kept is not None and kept[0] == key:
            return kept[1]
        if len({sum(self.store._sizes[row][block] for block in ids) for row, ids in enumerate(selected)}) > 1:
            return None
        block_keys, block_values, _ = self.store.gather(selected)
        streamed = self.store.offload and max(map(len, selected)) > self.max_cached_blocks
        self._retrieved = None if streamed else (key, (block_keys, block_values))
        return block_keys, block_values

    def _memory_states(self, selected, num_q: int):
        """Keys/values/valid of the memory part, or ``None`` when it is empty.

        Layout ``[retrieved blocks | initial tokens | pad | remainder]``, ``[b, Hkv, n, d]`` with valid ``[b, n]``
        (``None`` when every slot is real: no mask to build, as at most decoding steps);
        with a per-head selection (``perhead``) every query head is a unit of its own: ``[b * H, 1, n, d]`` and
        ``[b * H, n]`` (unit ``r * H + h`` reads KV head ``h // group`` of row ``r``).

        The remainder (recent tokens older than the last query's window) is last, so that ``causal_new`` gives
        query ``i`` exactly the remainder tokens outside its own window; a pad of ``max(0, c - r)`` masked slots
        in front of it keeps blocks and initial tokens visible to every query.
        """
        batch = self.keys.shape[0]
        device = self.device
        remainder = max(0, self.keys.shape[-2] - self.n_local)
        keys, values, valid = [], [], []  # valid: (slots, [u, slots] bool or None when all of them are real)
        per_head = selected is not None and _is_per_head(selected)
        if selected is not None:
            block_keys, block_values, block_valid = (
                self._gather_per_head(selected) if per_head else self.store.gather(selected)
            )
            keys.append(block_keys)
            values.append(block_values)
            valid.append((block_keys.shape[-2], block_valid))
        tail_keys, tail_values, tail_valid = [], [], []
        if self.init_keys.shape[-2]:
            tail_keys.append(self.init_keys)
            tail_values.append(self.init_values)
            tail_valid.append((self.init_keys.shape[-2], None))
        if not keys and not tail_keys and remainder == 0:
            return None
        pad = max(0, num_q - remainder)
        if pad:
            tail_keys.append(self.keys.new_zeros(batch, self.keys.shape[1], pad, self.keys.shape[-1]))
            tail_values.append(self.values.new_zeros(batch, self.values.shape[1], pad, self.values.shape[-1]))
            tail_valid.append((pad, torch.zeros(batch, pad, dtype=torch.bool, device=device)))
        if remainder:
            tail_keys.append(self._unrotated_prefix(remainder))
            tail_values.append(self.values[:, :, :remainder])
            tail_valid.append((remainder, None))
        tail_k, tail_v = _cat(tail_keys, -2), _cat(tail_values, -2)
        tail_ok = _cat_valid(tail_valid, batch, device)
        if per_head:  # the shared tail, repeated for every query head of its KV head
            q_heads = self.local_scores.shape[1]
            group = q_heads // tail_k.shape[1]
            tail_k = tail_k.repeat_interleave(group, dim=1).reshape(batch * q_heads, 1, *tail_k.shape[-2:])
            tail_v = tail_v.repeat_interleave(group, dim=1).reshape(batch * q_heads, 1, *tail_v.shape[-2:])
            tail_ok = tail_ok.repeat_interleave(q_heads, dim=0) if tail_ok is not None else None
        keys.append(tail_k)
        values.append(tail_v)
        valid.append((tail_k.shape[-2], tail_ok))
        return _cat(keys, -2), _cat(values, -2), _cat_valid(valid, keys[0].shape[0], device)

    def _memory_states_per_row(self, selected, query_real: torch.Tensor | None, num_q: int):
        """:meth:`_memory_states` when rows differ (left padding): each row's own initial tokens, remainder and real
        query count.

        Row ``r`` with ``n_r`` real queries (first in the chunk) and ``m_r`` remainder tokens is laid out
        ``[blocks | initial | max(0, n_r - m_r) empty | remainder | c - n_r empty]``, right-aligned; ``causal_new``
        (query ``i`` sees the last ``c`` slots up to ``i``) then hides from query ``i`` exactly the last
        ``n_r - 1 - i`` remainder tokens (those inside its window), as in the equal-rows layout. Built with one
        stable sort per call (no loop over rows, heads or tokens).

        Returns ``keys``/``values`` ``[u, h, n, d]`` and ``valid [u, n]`` (``u = b``, ``h = kv_heads``; with a per-head
        selection ``u = b * H``, ``h = 1``).
        """
        batch, kv_heads, recent, dim = self.keys.shape
        device = self.device
        n_real = query_real.sum(1) if query_real is not None else torch.full((batch,), num_q, device=device)
        slots = torch.arange(num_q, device=device)[None, :]
        rem_len = max(0, recent - self.n_local)  # every row's remainder lies in these first slots
        rem_pos = self.positions[:, :rem_len]
        rem_keep = rem_pos != PAD_POSITION
        rem_count = rem_keep.sum(1)
        zeros_k = self.keys.new_zeros(batch, kv_heads, num_q, dim)
        zeros_v = self.values.new_zeros(batch, kv_heads, num_q, self.values.shape[-1])
        never = torch.zeros(batch, num_q, dtype=torch.bool, device=device)
        init_keep = self._init_mask()
        # (keys, values, keep, valid) of the row-level parts after the blocks
        parts = [
            (self.init_keys, self.init_values, init_keep, init_keep),
            (zeros_k, zeros_v, slots < (n_real - rem_count).clamp(min=0)[:, None], never),
            (
                self.unrotate(self.keys[:, :, :rem_len], rem_pos.clamp(min=0)),
                self.values[:, :, :rem_len],
                rem_keep,
                rem_keep,
            ),
            (zeros_k, zeros_v, slots < (num_q - n_real)[:, None], never),
        ]
        per_head = selected is not None and _is_per_head(selected)
        q_heads = self.local_scores.shape[1]
        group = q_heads // kv_heads
        if per_head:  # the row-level parts, repeated for every query head of their KV head
            parts = [
                (
                    k.repeat_interleave(group, dim=1).reshape(batch * q_heads, 1, *k.shape[-2:]),
                    v.repeat_interleave(group, dim=1).reshape(batch * q_heads, 1, *v.shape[-2:]),
                    keep.repeat_interleave(q_heads, dim=0),
                    ok.repeat_interleave(q_heads, dim=0),
                )
                for k, v, keep, ok in parts
            ]
        if selected is not None:
            block_keys, block_values, block_valid = (
                self._gather_per_head(selected) if per_head else self.store.gather(selected)
            )
            if block_valid is None:
                block_valid = torch.ones(block_keys.shape[0], block_keys.shape[-2], dtype=torch.bool, device=device)
            parts.insert(0, (block_keys, block_values, block_valid, block_valid))
        keys = torch.cat([part[0] for part in parts], dim=-2)
        values = torch.cat([part[1] for part in parts], dim=-2)
        keep = torch.cat([part[2] for part in parts], dim=-1)
        valid = torch.cat([part[3] for part in parts], dim=-1)
        index = _right_align(keep)
        return _take(keys, index), _take(values, index), valid.gather(1, index) & keep.gather(1, index)

    def _gather_per_head(self, selected: list[list[list[int]]]):
        """``selected[row][head]`` block ids -> ``keys [b * H, 1, L, d]``, ``values``, ``valid [b * H, L]``.

        The union of a row's blocks is gathered once from the store; each query head then takes its own blocks
        (in ascending id order) from its KV head. Slot ``j * S + t`` of a head (``S`` = the largest block) is token
        ``t`` of its ``j``-th block, marked invalid past that block's size or past the head's selection. The token
        index is built with tensor ops (no Python loop over heads or tokens: this runs at every decoding step).
        """
        index = getattr(selected, "tensor", None)  # [b, H, k] int64, -1 padded (from select_blocks)
        if index is None:
            width = max(1, max(len(ids) for heads in selected for ids in heads))
            index = torch.tensor(
                [[list(ids) + [-1] * (width - len(ids)) for ids in heads] for heads in selected], dtype=torch.long
            )
        index = index.to(self.device)
        batch, q_heads, _ = index.shape
        union_ids = _row_union(selected)  # sorted, per row, from the host lists (no device sync per row)
        keys, values, _ = self.store.gather(union_ids)  # [b, Hkv, U, d]
        kv_heads, dim = keys.shape[1], keys.shape[-1]
        group = q_heads // kv_heads
        span = self.store.max_block_size()
        slots, oks = [], []
        for row, ids_of_row in enumerate(union_ids):  # loop over rows only
            union = torch.tensor(ids_of_row, dtype=torch.long, device=self.device)
            sizes = self.store.block_sizes_tensor(row)  # [n]
            if sizes.numel() == 0:  # a row without blocks yet (left padding): every slot of it is invalid
                sizes = torch.zeros(1, dtype=torch.long, device=self.device)
            union_sizes = sizes[union]
            where = torch.full_like(sizes, -1)
            where[union] = torch.cumsum(union_sizes, 0) - union_sizes  # block id -> its offset in the gather
            ids = index[row]  # [H, k]
            chosen = ids >= 0
            safe = ids.clamp(min=0)
            offsets = torch.arange(span, device=self.device)
            ok = chosen[..., None] & (offsets < sizes[safe][..., None])  # [H, k, S]
            slot = (where[safe][..., None] + offsets).masked_fill(~ok, 0)
            slots.append(slot.reshape(q_heads, -1))
            oks.append(ok.reshape(q_heads, -1))
        slot, ok = torch.cat(slots), torch.cat(oks)  # [b * H, k * S]
        kv_of_head = torch.arange(q_heads, device=self.device) // group
        per_head_keys = keys[:, kv_of_head].reshape(batch * q_heads, *keys.shape[-2:])
        per_head_values = values[:, kv_of_head].reshape(batch * q_heads, *values.shape[-2:])
        take_keys = per_head_keys.gather(1, slot[..., None].expand(-1, -1, dim))
        take_values = per_head_values.gather(1, slot[..., None].expand(-1, -1, values.shape[-1]))
        return take_keys[:, None], take_values[:, None], ok

    def _unrotated_prefix(self, count: int) -> torch.Tensor:
        """The oldest ``count`` recent keys unrotated, ``[b, Hkv, count, d]``, when every row holds the same slots.

        The remainder is attended at every decoding step and grows by one token per step: its keys are unrotated
        ``block_size`` tokens ahead of need (the oldest recent keys, window included) and kept, so that most steps
        slice them instead of re-rotating the whole remainder (the same values: a rotation is per token).
        """
        cached = self._unrotated
        if cached is None or cached.shape[-2] < count:
            cover = min(self.keys.shape[-2], count + self.block_size)
            cached = self._unrotated = self.unrotate(self.keys[:, :, :cover], self.positions[:, :cover])
        return cached if cached.shape[-2] == count else cached[:, :, :count]

    def rotate_to_window_end(self, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``query [b, H, c, d]`` at ``positions [b, c]`` rotated to position ``n_local - 1`` (the memory query; the
        layers of a forward share the rotation tables, :meth:`~hf_longmem.memory.rope.LayerRotation.rotate_to`)."""
        if not isinstance(self.rotary, LayerRotation):  # a duck-typed rotation: the plain call
            return self.rotary.rotate(query, (self.n_local - 1) - positions, query=True)
        bound = max(self.n_local, self.cumulative_length) + 1
        return self.rotary.rotate_to(query, positions, self.n_local - 1, query=True, max_delta=bound)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys [b, Hkv, n, d]`` at ``positions [b, n]`` -> keys at position 0."""
        return self.rotate(keys, -positions)

    def rotate(self, states: torch.Tensor, delta: torch.Tensor, query: bool = False) -> torch.Tensor:
        """``states`` rotated by ``delta`` with the layer's RoPE, telling it the bound on ``|delta|`` known here
        (every position is a real one ``< cumulative_length`` or ``PAD_POSITION``), so that it can read its tables
        from a cache (:meth:`~hf_longmem.memory.rope.LayerRotation.rotate`)."""
        if not isinstance(self.rotary, LayerRotation):  # a duck-typed rotation: the plain call
            return self.rotary.rotate(states, delta, query=query)
        bound = max(self.n_local, self.cumulative_length) + 1
        return self.rotary.rotate(states, delta, query=query, max_delta=bound)

    # ------------------------------------------------------------------------------------ retrieval, memory
    def select_blocks(self, memory_query: torch.Tensor, query_real: torch.Tensor | None = None) -> list | None:
        """Blocks for this chunk: all blocks if at most ``topk``, else the ``topk`` best (ascending ids).

        Returns ``selected[row]`` block ids shared by the layer's heads (the official default), or with
        ``perhead`` ``selected[row][head]`` chosen by each query head's own score ``q_h . r_{b,h}``.

        Args:
            memory_query: ``[b, H, c, d]`` chunk queries rotated to position ``n_local - 1``.
            query_real: ``[b, c]`` bool, False for pad queries (left padding: excluded from the mean query);
                ``None``: every query is real.
        """
        counts = self.store.num_blocks() if self.store.batch_size else []
        if not counts or max(counts) == 0:
            return None
        if max(counts) <= self.topk:
            return [list(range(count)) for count in counts]
        query_mean = self.mean_query(memory_query, query_real)  # [b, H, d]
        if not self.perhead:  # scored where the representatives live (the store's topk)
            index = self.store.topk(query_mean, self.topk, backend=self.kernel_backend)
            return [sorted(i for i in row if i >= 0) for row in index.tolist()]  # ascending ids, sorted on the host
        index = self.store.topk(query_mean, self.topk, per_head=True, backend=self.kernel_backend)  # [b, H, k]
        index = index.sort(dim=-1).values  # -1 (fewer blocks than topk) first
        units = index.tolist()
        return _PerHeadSelection([[[i for i in ids if i >= 0] for ids in heads] for heads in units], index)

    @staticmethod
    def mean_query(memory_query: torch.Tensor, query_real: torch.Tensor | None) -> torch.Tensor:
        """``[b, H, d]`` float32 mean of ``memory_query [b, H, c, d]`` over each row's real queries."""
        if query_real is None:
            # one query (decoding): itself (the mean of one value is that value), one view instead of a reduction
            if memory_query.shape[2] == 1:
                return memory_query.float().reshape(*memory_query.shape[:2], -1)
            return memory_query.float().mean(dim=2)
        weight = query_real.float()[:, None, :, None]
        return (memory_query.float() * weight).sum(2) / weight.sum(2).clamp(min=1.0)

    def recent_counts(self) -> list[int]:
        """Recent tokens (window + remainder) each row holds (no device sync when the rows are equal)."""
        if not self._state_pads:
            return [self.keys.shape[-2]] * self.keys.shape[0]
        return (self.positions != PAD_POSITION).sum(1).tolist()

    def init_counts(self) -> list[int]:
        """Initial tokens each row holds."""
        if self.init_valid is None:
            return [self.init_keys.shape[-2]] * self.init_keys.shape[0]
        return self.init_valid.sum(1).tolist()

    def first_slot(self, row: int) -> int:
        """Slot of ``row``'s oldest recent token (its recent tokens are right-aligned in ``keys``)."""
        return self.keys.shape[-2] - self.recent_counts()[row]

    def after_chunk(self) -> None:
        """Moves tokens that left the window to the initial tokens, then to blocks of ``block_size`` (per row)."""
        self.fill_initial()
        blocks = [(count - self.n_local) // self.block_size for count in self.recent_counts()]
        if max(blocks) > 0:
            self.form_row_blocks([[self.block_size] * max(0, count) for count in blocks])

    def fill_initial(self) -> None:
        """The oldest tokens beyond the window fill the ``n_init`` initial tokens first (per row)."""
        if not self._state_pads and self.init_valid is None:  # equal rows: slices
            take = min(self.n_init - self.init_keys.shape[-2], self.keys.shape[-2] - self.n_local)
            if take <= 0:
                return
            unrotated = self.unrotate(self.keys[:, :, :take], self.positions[:, :take])
            self.init_keys = torch.cat((self.init_keys, unrotated), -2)
            self.init_values = torch.cat((self.init_values, self.values[:, :, :take]), dim=-2)
            self._keep_recent(None, drop=take)
            return
        if self.init_valid is None and self.init_keys.shape[-2] == self.n_init:
            return  # every row's initial tokens are complete
        real = self.positions != PAD_POSITION  # [b, R]
        held_mask = self._init_mask()  # [b, I]
        take = torch.minimum(self.n_init - held_mask.sum(1), real.sum(1) - self.n_local).clamp(min=0)  # [b]
        if int(take.max()) == 0:
            return
        move = real & (real.cumsum(1) <= take[:, None])  # each row's oldest `take` tokens
        width = int(move.any(0).nonzero().max()) + 1
        moved = self.unrotate(self.keys[:, :, :width], self.positions[:, :width].clamp(min=0))
        keep = torch.cat((held_mask, move[:, :width]), 1)
        index = _right_align(keep)
        self.init_keys = _take(torch.cat((self.init_keys, moved), -2), index)
        self.init_values = _take(torch.cat((self.init_values, self.values[:, :, :width]), -2), index)
        valid = keep.gather(1, index)
        self.init_valid = None if bool(valid.all()) else valid
        self._keep_recent(real & ~move)

    def _init_mask(self) -> torch.Tensor:
        """``[b, I]`` bool: the initial-token slots each row holds."""
        if self.init_valid is not None:
            return self.init_valid
        return torch.ones(self.init_keys.shape[0], self.init_keys.shape[-2], dtype=torch.bool, device=self.device)

    def form_row_blocks(self, sizes: list[list[int]]) -> None:
        """Row ``r``'s oldest ``sum(sizes[r])`` recent tokens become memory blocks of ``sizes[r]`` (in order).

        Rows with the same sizes are formed together (one group when the rows are equal): a loop over the distinct
        size lists, at block-formation time only.
        """
        batch, _, recent, _ = self.keys.shape
        self.store.ensure_rows(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, row_sizes in enumerate(sizes):
            if row_sizes:
                groups.setdefault(tuple(row_sizes), []).append(row)
        every_row = len(groups) == 1 and len(next(iter(groups.values()))) == batch and not self._state_pads
        if not every_row:  # rows differ: the slots of each row's blocks, by tensor ops
            counts = torch.tensor(self.recent_counts(), device=self.device)
            totals = torch.tensor([sum(row_sizes) for row_sizes in sizes], device=self.device)
        for group_sizes, rows in groups.items():  # loop over distinct size lists (block formation only)
            total = sum(group_sizes)
            if every_row:  # equal rows: the oldest slots, their keys unrotated already (decoding)
                keys = self._unrotated_prefix(total)
                values, scores = self.values[:, :, :total], self.local_scores[:, :, :total]
            else:
                rows_t = torch.tensor(rows, device=self.device)
                index = (recent - counts[rows_t])[:, None] + torch.arange(total, device=self.device)  # oldest slots
                keys = self.unrotate(_take(self.keys[rows_t], index), self.positions[rows_t].gather(1, index))
                values = _take(self.values[rows_t], index)
                scores = _take(self.local_scores[rows_t], index)
            reprs = block_representatives(keys, scores, list(group_sizes), self.repr_topk)
            self.store.add_blocks(keys, values, list(group_sizes), reprs, rows=rows)
        if every_row:
            self._keep_recent(None, drop=sum(sizes[0]))
            return
        slot = torch.arange(recent, device=self.device)[None, :]
        start = (recent - counts)[:, None]
        self._keep_recent((self.positions != PAD_POSITION) & ~((slot >= start) & (slot < start + totals[:, None])))

    def _keep_recent(self, keep: torch.Tensor | None, drop: int = 0) -> None:
        """Keeps the recent slots ``keep [b, R]`` (right-aligned again), or drops the ``drop`` oldest of equal rows."""
        names = ("keys", "values", "positions", "local_scores")
        if keep is None:
            for name in names:
                tensor = getattr(self, name)
                setattr(self, name, tensor[:, drop:] if tensor.dim() == 2 else tensor[:, :, drop:])
            if self._unrotated is not None:
                self._unrotated = self._unrotated[:, :, drop:] if self._unrotated.shape[-2] > drop else None
            return
        self._unrotated = None
        index = _right_align(keep)
        valid = keep.gather(1, index)
        for name in names:
            setattr(self, name, _take(getattr(self, name), index))
        self.positions = self.positions.masked_fill(~valid, PAD_POSITION)
        self._state_pads = not bool(valid.all())

    # ------------------------------------------------------------------------------------- batch and bytes
    def _map_rows(self, fn, index) -> None:
        self._unrotated = self._retrieved = None
        if not self.is_initialized:
            return
        for name in (
            "keys",
            "values",
            "positions",
            "local_scores",
            "init_keys",
            "init_values",
            "init_valid",
            "real_seen",
        ):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.store.reorder(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self.device)
        self._map_rows(lambda t: t.index_select(0, index), index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            index = torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats)
            self._map_rows(lambda t: t.index_select(0, index), index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            index = torch.arange(self.keys.shape[0], device=self.device)[indices]
            self._map_rows(lambda t: t.index_select(0, index), index)

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.local_scores = None
        self.init_keys = self.init_values = self.real_seen = self.init_valid = None
        self._state_pads = False
        self._unrotated = self._retrieved = None
        if self.store is not None:
            self.store.clear()
        self.store = None
        self._pending = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} moves tokens to memory and cannot be cropped; copy the cache (copy.deepcopy) to roll back"
        )

    def memory_parts(self) -> MemoryParts:
        """``{part: (where, bytes)}``, ``where`` ``"resident"`` (compute device) or ``"offloaded"`` (CPU home).

        ``window``: the recent tokens (window + remainder) with their positions and scores; ``initial``: the initial
        tokens; ``retrieved``: the blocks gathered at the latest decoding step, kept for the next one (at most
        ``topk`` blocks, see :meth:`_retrieved_blocks`); ``blocks``, ``lru``, ``representatives``: the store's
        (:meth:`BlockStore.memory_parts`).
        """
        if not self.is_initialized:
            return {}
        window = (self.keys, self.values, self.positions, self.local_scores, self.real_seen, self._unrotated)
        initial = (self.init_keys, self.init_values, self.init_valid)
        retrieved = self._retrieved[1] if self._retrieved is not None else ()
        parts = {
            "window": (RESIDENT, tensor_bytes(*window)),
            "initial": (RESIDENT, tensor_bytes(*initial)),
            "retrieved": (RESIDENT, tensor_bytes(*retrieved)),
        }
        parts.update(self.store.memory_parts())
        return parts


class InfLLMCache(ModelHookedCache, LongMemCache):
    """InfLLM: initial tokens + retrieved memory blocks (constant distance) + local window, per layer.

    Args:
        n_init: initial tokens kept for every query (official 128).
        n_local: local window, the query included (official 4096).
        block_size: tokens per memory block (official 128).
        topk: blocks retrieved per chunk / decoding step (official 16).
        repr_topk: keys averaged into a block's representative (official 4).
        max_cached_blocks: blocks per row resident on the device when offloading (official ``max_cached_block``
            32), at least ``topk``.
        exc_block_size: queries per execution block (official 512), at most ``n_local``.
        offload: keep memory blocks in CPU memory with a device LRU; ``None``: when the model runs on CUDA.
        pin_memory: pin the CPU blocks; ``None``: when offloading from CUDA.
        perhead: each query head retrieves its own ``topk`` blocks by its own score ``q_h . r_{b,h}`` (the official
            ``perhead`` option); ``False`` (official default): one choice per layer, scored with the heads summed.
        offload_representatives: keep the block representatives with the offloaded blocks (CPU) and score them
            there, so that the device-resident bytes do not grow with the context; ``False`` (official): on the
            device. Same outputs either way.
        config: the model config (layer layout and RoPE).
        rotary: the model's RoPE (``from_model``/``make_cache`` read it from the model).

    Build it with ``make_cache("infllm", model, ...)``, which also switches the model to hf_longmem attention.

    Examples::

        >>> cache = make_cache("infllm", model, n_local=2048, topk=8)  # doctest: +SKIP
        >>> model.generate(ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
    """

    hook_attributes = ("_padding_hook",)

    #: Why this cache holds as much as the full cache or more (shown next to benchmark rows where it does).
    memory_note = (
        "keeps every past token (offloaded blocks in CPU memory count too); the budget bounds what attention reads"
    )
    #: What the budget bounds: the bytes on the compute device with offloading on (architecture matrix, check (b)).
    memory_saving = "resident"

    def __init__(
        self,
        n_init: int = 128,
        n_local: int = 4096,
        block_size: int = 128,
        topk: int = 16,
        repr_topk: int = 4,
        max_cached_blocks: int = 32,
        exc_block_size: int = 512,
        offload: bool | None = None,
        pin_memory: bool | None = None,
        perhead: bool = False,
        offload_representatives: bool = False,
        config=None,
        rotary: RotaryShift | None = None,
    ):
        check_int("n_init", n_init, low=0)
        check_int("n_local", n_local, low=1)
        check_int("block_size", block_size, low=1)
        check_int("topk", topk, low=1)
        check_int("repr_topk", repr_topk, low=1)
        check_int("max_cached_blocks", max_cached_blocks, low=1)
        check_int("exc_block_size", exc_block_size, low=1)
        if repr_topk > block_size:
            raise ValueError(f"`repr_topk` ({repr_topk}) must be at most `block_size` ({block_size})")
        if max_cached_blocks < topk:
            raise ValueError(f"`max_cached_blocks` ({max_cached_blocks}) must be at least `topk` ({topk})")
        if exc_block_size > n_local:
            raise ValueError(f"`exc_block_size` ({exc_block_size}) must be at most `n_local` ({n_local})")
        self.n_init, self.n_local, self.block_size, self.topk = n_init, n_local, block_size, topk
        self.repr_topk, self.max_cached_blocks, self.exc_block_size = repr_topk, max_cached_blocks, exc_block_size
        self.offload, self.pin_memory, self.perhead = offload, pin_memory, bool(perhead)
        self.offload_representatives = bool(offload_representatives)
        self.rotary = rotary_for(type(self).__name__, config, rotary)
        options = dict(
            n_init=n_init,
            n_local=n_local,
            block_size=block_size,
            topk=topk,
            repr_topk=repr_topk,
            max_cached_blocks=max_cached_blocks,
            exc_block_size=exc_block_size,
            offload=offload,
            pin_memory=pin_memory,
            perhead=self.perhead,
            offload_representatives=self.offload_representatives,
        )
        self._layer_options = options
        self._padding_hook = None  # attach_padding_hook, by attach()
        super().__init__(self._new_layer, config=config)
        refuse_sliding_layers(type(self).__name__, self.layers, config)

    @classmethod
    def options_for_budget(cls, budget: int) -> dict:
        """Options attending to about ``budget`` tokens per step: ``n_init + topk * block_size + n_local``.

        The split follows the official configuration (``budget = 6272`` gives exactly 128 initial tokens, 16 blocks
        of 128 and a 4096-token window); every past token is still held (the memory blocks, offloaded on CUDA).
        """
        budget = max(3, int(budget))
        n_init = min(128, budget // 16)
        block_size = min(128, max(1, budget // 16))
        topk = max(1, (budget // 3) // block_size)
        n_local = max(1, budget - n_init - topk * block_size)
        return {
            "n_init": n_init,
            "n_local": n_local,
            "block_size": block_size,
            "topk": topk,
            "repr_topk": min(4, block_size),
            "max_cached_blocks": max(32, topk),
            "exc_block_size": min(512, n_local),
        }

    def _new_layer(self, layer_idx: int) -> InfLLMLayer:
        """A layer reading this cache's ``_forward_padding`` (see :func:`attach_padding_hook`); a bound method, not a
        closure, so that a deep copy builds its later layers for itself (``cache_classes/hooked.py``)."""
        layer = InfLLMLayer(self.rotary.for_layer(layer_idx), **self._layer_options)
        layer.padding_source = weakref.ref(self)
        return layer

    @classmethod
    def from_model(cls, model, **kwargs) -> InfLLMCache:
        """Builds the cache for ``model`` and attaches :func:`attach_padding_hook` (pads told from the mask)."""
        if "rotary" not in kwargs:
            kwargs["rotary"] = rotary_for(cls.__name__, model=model)
        cache = cls(config=model.config, **kwargs)
        cache.attach(model)
        return cache

    def attach(self, model) -> None:
        """Tells pads from tokens by the model's 2-D mask in every forward that uses this cache."""
        if self._padding_hook is not None:
            self._padding_hook.remove()
        self._padding_hook = attach_padding_hook(model, self)
        self.remember_model(model)


__all__ = ["InfLLMCache", "InfLLMLayer", "block_representatives"]


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "infllm",
    InfLLMCache,
    needs_attention=True,
    summary="InfLLM: initial tokens + top-k memory blocks by representative keys (constant distance) + local window, CPU offload",
)
