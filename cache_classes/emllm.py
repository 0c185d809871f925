"""EM-LLM (Fountas et al., ICLR 2025): InfLLM's memory with events segmented by surprise.

EM-LLM shares InfLLM's layout, positions, attention path and block store (:mod:`.infllm`); what changes is how
memory blocks are formed and retrieved:

* **Surprise.** ``s_t = -log p(x_{t+1} | x_<=t)`` from the model's own logits. A token is an event boundary (a new
  event starts at it) when ``s_t > mean + gamma * std`` of the surprise of the up to ``n_local`` tokens before its
  execution block (the block's own values for the first one). As in the official code, the boundary is placed at
  the token that *predicts* the surprising token, one position before the surprising token itself.
* **Refinement** (``similarity_refinement``, on by default): each surprise boundary keeps its count but moves
  within ``[previous boundary + min_block_size, boundary]`` to the split that maximises the modularity
  (``similarity_metric="modularity"``) or minimises the conductance (``"conductance"``) of the two-community
  partition of the key-similarity graph ``A = sum over layers >= refine_from_layer and KV heads of K K^T`` (keys at
  position 0), restricted to a window of half the event size on each side.
* **Events -> blocks.** Tokens that left the local window are cut at the boundaries into blocks clamped to
  ``[min_block_size, max_block_size]``: longer events are split, shorter ones absorbed into the next; the event in
  progress (after the last boundary) waits in the remainder, seen at the constant distance, until it is closed or
  reaches ``max_block_size`` (official ``update_memory``).
* **Retrieval** (two stages): blocks by descending ``q_mean . r_b`` until a token budget is filled (``n_mem`` plus
  the execution block and initial-token allowance of the official ``global_context_cap``, the crossing block kept
  if that lands closer to the budget), plus a contiguity buffer (``use_contiguity_buffer``, ``contiguity_buffer_size``
  of the budget) of the +-1 neighbour events of the retrieved ones, kept as a queue across steps.

The surprise needs the model's logits over each new input, which ``generate`` does not compute (it keeps only the
last position). :meth:`EMLLMCache.from_model` (used by ``make_cache``) attaches a forward hook to the decoder that
projects its last hidden states with the LM head in chunks of ``exc_block_size`` and forms the events of every layer
after each forward. Events can only form between forwards, so long prompts must be fed in execution blocks (the
official code asserts it): pass ``cache.generate_kwargs`` (``{"prefill_chunk_size": exc_block_size}``) to
``generate`` — ``model.generate(ids, cache=cache, **cache.generate_kwargs)`` — as the harness does. The cache never
changes the model's ``generation_config``. A longer forward still
works (its queries are processed in execution blocks), but the surprise of its tokens is known only when it ends:
tokens that leave the window during it wait in the remainder (seen at the constant distance) up to
``exc_block_size + max_block_size`` tokens, beyond which the oldest form fixed blocks of ``max_block_size`` (as
InfLLM's), with a warning. Before this bound the whole prompt waited there: a 16k-token prompt fed in one forward
had every query of its last chunks attend to ~16k remainder tokens at one distance (passkey 20%, quadratic
prefill, a ``[16k, 16k]`` similarity graph); fed in execution blocks the same prompts score 100%.

Deviations from the official code (em-llm/EM-LLM-model ``context_manager.py``, ``em_llm.py``,
``similarity_refinement``):

* Defaults follow the paper/README variant: refinement and contiguity buffer on (the shipped yamls turn both off).
  ``refine_from_layer=None`` picks ``5/8`` of the layers (20 of 32, the official value for 32-layer models).
* Generated tokens are segmented too (the official generation loop passes no labels, so they never start events).
* Fixed: the official refinement never considers the original boundary itself (its candidate range excludes it);
  here the candidates include it. Conductance uses the standard volume (sum of degrees) of the paper's formula; the
  official code uses the sum of edges inside each side and takes the smaller of the two sides' values.
* Fixed: a contiguity-buffer block that is also retrieved by similarity is attended once (the official code may
  load it twice).
* Batches (the official code is batch 1): every row has its own surprise history, boundary flags, refinement
  (on its own keys), events, retrieval budget and contiguity buffer; left-padded rows hold only their real tokens
  (the window/memory layout of :mod:`.infllm`). A row gives what it gives alone when fed the same real tokens per
  forward: ``generate``'s prefill chunks split a padded prompt at the padded offsets, so a row whose pads are not a
  multiple of ``exc_block_size`` gets a first forward shorter than an execution block (as if the row alone was fed
  that many tokens first). The LM head runs on all rows at once; the per-row segmentation is host logic, a loop
  over rows once per forward. Beam search reorders every per-row structure (layers, store, segmentation).
* No disk offload; memory blocks use the CPU store with a device LRU as InfLLM.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch

from hf_longmem.memory.accounting import OFFLOADED, RESIDENT, MemoryParts, tensor_bytes
from hf_longmem.memory.output_hook import attach_output_hook
from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.memory.rope import RotaryShift
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_choice, check_int, check_real

from .base import LongMemCache
from .hooked import ModelHookedCache
from .infllm import InfLLMLayer, attach_padding_hook, refuse_sliding_layers
from .rotation import rotary_for

METRICS = ("modularity", "conductance")


# ------------------------------------------------------------------------------------------ pure functions
def surprise_boundaries(surprise: torch.Tensor, history: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[n]`` bool: ``surprise > mean + gamma * std`` of ``history`` (of ``surprise`` itself if fewer than 2 values).

    ``std`` is the unbiased estimate (``torch.std``), as the official code.
    """
    reference = history if history.numel() >= 2 else surprise
    if reference.numel() < 2:
        return torch.zeros_like(surprise, dtype=torch.bool)
    return surprise > reference.mean() + gamma * reference.std()


def event_sizes(boundaries: torch.Tensor, min_size: int, max_size: int) -> list[int]:
    """Blocks cut from tokens that left the window (official ``update_memory``).

    Args:
        boundaries: ``[L]`` bool, True where an event starts.
        min_size, max_size: block size limits; shorter events are absorbed into the next, longer ones split.

    Returns:
        Sizes of the blocks to form from the first tokens, in order. The last event (after the last boundary) is
        left out (it may still grow) unless it exceeds ``max_size``.
    """
    length = boundaries.numel()
    if length == 0:
        return []
    cuts = torch.nonzero(boundaries).flatten().tolist()
    if not cuts:
        cuts = list(range(0, length, max_size)) if length > max_size else [length]
    edges = sorted(set([0] + cuts + [length]))
    segments = [b - a for a, b in zip(edges[:-1], edges[1:])]
    sizes, carried = [], 0
    for index, segment in enumerate(segments):  # a loop over events (several tokens each)
        carried += segment
        while carried >= max_size:
            sizes.append(max_size)
            carried -= max_size
        if carried < min(min_size, length):
            continue
        if carried > 0 and index != len(segments) - 1:
            sizes.append(carried)
        carried = 0
    return sizes


def _prefix2d(matrix: torch.Tensor) -> torch.Tensor:
    """``P[a, b] = sum(matrix[:a, :b])`` with a zero first row/column: ``[T + 1, T + 1]``."""
    padded = torch.nn.functional.pad(matrix, (1, 0, 1, 0))
    return padded.cumsum(0).cumsum(1)


def modularity_scores(adjacency: torch.Tensor) -> torch.Tensor:
    """Modularity of every two-community split ``{0..t-1}, {t..T-1}`` of a graph, for ``t = 0..T``.

    ``Q(t) = 1/(4m) sum_{i,j same side} (A_ij - k_i k_j / 2m)`` with ``m = sum(A) / 2`` (official ``modularity``),
    all splits from one 2-D prefix sum (``O(T^2)`` instead of ``O(T^3)``).

    Args:
        adjacency: ``[T, T]`` (symmetric) similarity graph.

    Returns:
        ``[T + 1]`` float64.
    """
    adjacency = adjacency.double()
    total = adjacency.sum()
    if total == 0:
        return torch.zeros(adjacency.shape[0] + 1, dtype=torch.float64, device=adjacency.device)
    m = total / 2
    degree_i, degree_j = adjacency.sum(dim=-2), adjacency.sum(dim=-1)
    prefix = _prefix2d(adjacency - torch.outer(degree_i, degree_j) / (2 * m))
    t = torch.arange(adjacency.shape[0] + 1, device=adjacency.device)
    end = adjacency.shape[0]
    inside = prefix[t, t] + (prefix[end, end] - prefix[t, end] - prefix[end, t] + prefix[t, t])
    return inside / (4 * m)


def conductance_scores(adjacency: torch.Tensor) -> torch.Tensor:
    """Conductance ``cut(S, S') / min(vol S, vol S')`` of every split ``S = {0..t-1}``, ``t = 0..T``.

    ``vol`` is the sum of degrees; an empty side gives ``inf`` (never the minimum).

    Returns:
        ``[T + 1]`` float64.
    """
    adjacency = adjacency.double()
    end = adjacency.shape[0]
    prefix = _prefix2d(adjacency)
    t = torch.arange(end + 1, device=adjacency.device)
    cut = prefix[t, end] - prefix[t, t]
    volume = torch.nn.functional.pad(adjacency.sum(-1).cumsum(0), (1, 0))
    smaller = torch.minimum(volume, volume[-1] - volume)
    return torch.where(smaller != 0, cut / torch.where(smaller != 0, smaller, 1.0), torch.inf)


def refine_boundaries(
    boundaries: list[int],
    adjacency: torch.Tensor,
    min_size: int,
    metric: str = "modularity",
    first_movable: int = 0,
) -> list[int]:
    """Moves each boundary to the best graph split near it, keeping their number (official ``segmentation.py``).

    Boundary ``b`` (after the refined previous one ``p``, initially 0) moves to the ``t`` in
    ``[max(p, first_movable) + min_size, b]`` that maximises modularity (minimises conductance) of the split at
    ``t`` of the window ``[p - h, b + h)``, ``h = (b - p) // 2``. A boundary with no room stays.

    Args:
        boundaries: increasing token indices into ``adjacency`` (events start there).
        adjacency: ``[T, T]`` key-similarity graph of the tokens.
        min_size: the smallest event.
        metric: ``"modularity"`` or ``"conductance"``.
        first_movable: no boundary moves before this index (tokens before it belong to closed events).

    Returns:
        The refined boundaries (same count, increasing).
    """
    if metric not in METRICS:
        raise ValueError(f"`similarity_metric` must be one of {METRICS}, got {metric!r}")
    score_fn = modularity_scores if metric == "modularity" else conductance_scores
    refined, previous = [], 0
    size = adjacency.shape[0]
    for boundary in boundaries:  # one window per boundary (an event of several tokens)
        low = max(previous, first_movable) + min_size
        if boundary - previous > min_size and low <= boundary:
            half = (boundary - previous) // 2
            start, stop = max(0, previous - half), min(size, boundary + half)
            scores = score_fn(adjacency[start:stop, start:stop])[low - start : boundary - start + 1]
            best = int(scores.argmax() if metric == "modularity" else scores.argmin())
            refined.append(low + best)
        else:
            refined.append(boundary)
        previous = refined[-1]
    return refined


# ------------------------------------------------------------------------------------------------- layer
class EMLLMLayer(InfLLMLayer):
    """One attention layer of an :class:`EMLLMCache` (InfLLM's layer with event blocks and budget retrieval)."""

    def __init__(self, owner: EMLLMCache, rotary: RotaryShift, layer_idx: int, **options):
        super().__init__(rotary, **options)
        self._owner = weakref.ref(owner)
        self.padding_source = self._owner  # pads told from the model's mask (attach_padding_hook in attach)
        self.layer_idx = layer_idx
        self.contiguity: list[list[int]] = []  # per row, the contiguity buffer (block ids, a queue across steps)

    @property
    def owner(self) -> EMLLMCache:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("EMLLMLayer outlived its EMLLMCache")
        return owner

    def update(self, key_states, value_states, *args, **kwargs):
        """InfLLM's update; also tells the cache which new tokens are real (for the surprise of each row)."""
        result = super().update(key_states, value_states, *args, **kwargs)
        positions, padded = self._pending[2], self._pending[3]
        if padded and key_states.shape[-2] == self.exc_block_size:
            # chunked prefill (generate's prefill_chunk_size = exc_block_size): a row whose padding is not a whole
            # number of chunks gets its real tokens in other groups than alone, hence other events: refuse it
            pads = positions == PAD_POSITION
            pads = pads[:, 0] if pads.dim() == 3 else pads
            if bool((pads.any(-1) & (~pads).any(-1)).any()):
                raise ValueError(
                    "EMLLMCache: a left-padded row whose padding is not a multiple of prefill_chunk_size "
                    f"({self.exc_block_size}) is segmented into other events than the row alone; pad the batch to a "
                    "multiple of it (tokenizer(..., pad_to_multiple_of=...)) or run such rows one at a time"
                )
        self.owner._forward_real = (positions != PAD_POSITION) if padded else None
        return result

    def check_batch(self, batch: int, padded: bool = False) -> None:
        if self.owner._hook is None and not self.owner.manual_surprise:
            raise RuntimeError(
                "EMLLMCache needs the model's logits to segment events: build it with "
                "hf_longmem.make_cache('emllm', model, ...) or EMLLMCache.from_model(model)"
            )

    def after_chunk(self) -> None:
        """Initial tokens; events form after the forward, once their surprise is known (:meth:`EMLLMCache.observe`).

        Inside a forward longer than an execution block the remainder is bounded: beyond
        ``exc_block_size + max_block_size`` tokens past the window (more than a forward of one execution block can
        leave: the event in progress plus the block), its oldest tokens form fixed blocks of ``max_block_size``.
        Every layer sees the same token counts, so every layer forms the same blocks.
        """
        self.fill_initial()
        owner = self.owner
        sizes = []
        for count in self.recent_counts():  # per row (a row of a padded batch may hold fewer tokens)
            beyond = count - self.n_local
            blocks = (beyond - self.exc_block_size) // owner.max_block_size
            sizes.append([owner.max_block_size] * blocks if beyond > self.exc_block_size + owner.max_block_size else [])
        if not any(sizes):
            return
        if not owner._warned_long_forward:
            owner._warned_long_forward = True
            warnings.warn(
                "EMLLMCache got a forward longer than exc_block_size: events need the surprise of each execution "
                "block before the next one, so tokens that left the window during this forward form fixed blocks of "
                "max_block_size. Feed prompts in execution blocks (model.generate(..., cache=cache, **cache.generate_kwargs), "
                "i.e. prefill_chunk_size=exc_block_size) to segment them into events.",
                stacklevel=2,
            )
        self.form_row_blocks(sizes)

    def select_blocks(
        self, memory_query: torch.Tensor, query_real: torch.Tensor | None = None
    ) -> list[list[int]] | None:
        """Per row: similarity blocks until the token budget is filled, plus the contiguity buffer (ascending ids).

        Each row has its own blocks, budget (its remainder and initial tokens), contiguity buffer and mean query
        (over its real queries, ``query_real [b, c]``); the representatives of all rows are scored in one
        :meth:`~hf_longmem.memory.block_store.BlockStore.topk` call, the budget walk is host logic per row.
        """
        counts = self.store.num_blocks() if self.store.batch_size else []
        if not counts or max(counts) == 0:
            return None
        owner = self.owner
        batch, _, num_q, _ = memory_query.shape
        while len(self.contiguity) < batch:
            self.contiguity.append([])
        recent, initial = self.recent_counts(), self.init_counts()
        queries = query_real.sum(1).tolist() if query_real is not None else [num_q] * batch
        plans: list = []
        for row in range(batch):  # host logic per row (sizes are host lists)
            count = counts[row]
            if count == 0:
                plans.append(None)
                continue
            remainder = max(0, recent[row] + queries[row] - self.n_local)
            budget = owner.n_init + self.exc_block_size + owner.n_mem - remainder - initial[row]
            contiguity_cap = 0
            if owner.use_contiguity_buffer:
                ratio = owner.contiguity_buffer_size
                contiguity_cap = int(ratio * budget + 1) if ratio < 1 else int(ratio)
            cap = budget - contiguity_cap
            sizes = self.store.block_sizes(row)  # host list: the selection below is host logic (no tensor ops)
            if sum(sizes) <= cap:
                plans.append(count)
                continue
            plans.append((cap, contiguity_cap, sizes, min(count, max(cap, 0) // max(min(sizes), 1) + 1)))
        ranked = [plan for plan in plans if isinstance(plan, tuple)]
        orders = None
        if ranked:
            query_mean = self.mean_query(memory_query, query_real)  # [b, H, d]
            k_most = max(plan[3] for plan in ranked)
            orders = self.store.topk(query_mean, k_most, backend=self.kernel_backend).tolist()  # one host copy
        selected: list[list[int]] = []
        for row, plan in enumerate(plans):
            if plan is None or isinstance(plan, int):
                selected.append([] if plan is None else list(range(plan)))
                continue
            cap, contiguity_cap, sizes, k = plan
            order = orders[row][:k]
            chosen = [sizes[block] for block in order]
            total = list(itertools.accumulate(chosen))
            full = sum(1 for tokens in total if tokens < cap)
            if full < k and abs(cap - (total[full] - chosen[full])) > abs(total[full] - cap):
                full += 1  # the block crossing the budget, when that lands closer to it (official)
            similar = order[:full]
            if owner.use_contiguity_buffer:
                self._update_contiguity(similar, contiguity_cap, row)
                taken = set(similar)
                similar = [b for b in self.contiguity[row] if b not in taken] + similar
            selected.append(sorted(similar))
        return selected if any(selected) else None

    def _update_contiguity(self, similar: list[int], cap: int, row: int = 0) -> None:
        """The +-1 neighbours of ``row``'s retrieved blocks, queued across steps (official
        ``_update_contiguity_buffer``)."""
        sizes = self.store.block_sizes(row)
        count, taken = len(sizes), set(similar)
        new, filled, total = [], False, 0
        for block in similar:  # loop over retrieved blocks
            for neighbour in (block + 1, block - 1):
                if neighbour in taken or neighbour in new or not 0 <= neighbour < count:
                    continue
                new.append(neighbour)
                before, total = total, total + sizes[neighbour]
                if total >= cap:
                    if abs(cap - before) <= abs(total - cap):
                        new.pop()
                        total = before
                    filled = True
                    break
            if filled:
                break
        new.reverse()
        if not new:
            return
        buffer = self.contiguity[row]
        if not buffer or filled:
            buffer = new
        elif sum(sizes[b] for b in buffer if b < count) + total < cap:
            buffer = buffer + new
        else:
            past, buffer = list(reversed(buffer)), new
            for block in past:
                if block in new or block in taken or not 0 <= block < count:
                    continue
                buffer.insert(0, block)
                before, total = total, total + sizes[block]
                if total >= cap:
                    if abs(cap - before) <= abs(total - cap):
                        buffer.pop(0)
                    break
        self.contiguity[row] = buffer

    def _map_rows(self, fn, index) -> None:
        super()._map_rows(fn, index)
        if self.contiguity:  # per-row contiguity buffers follow their rows
            self.contiguity = [list(self.contiguity[i]) for i in index.tolist()]

    def reset(self) -> None:
        super().reset()
        self.contiguity = []


# ------------------------------------------------------------------------------------------------- cache
def _observe(cache: EMLLMCache, input_ids: torch.Tensor, hidden: torch.Tensor, lm_head) -> None:
    cache.observe(input_ids, hidden, lm_head)


class EMLLMCache(ModelHookedCache, LongMemCache):
    """EM-LLM: InfLLM's memory with surprise-segmented, graph-refined events and two-stage retrieval.

    Args:
        n_init: initial tokens (official 128).
        n_local: local window, the query included (official 4096).
        n_mem: retrieved-token budget (official 4096 for Llama-3, 2048 for Mistral).
        min_block_size, max_block_size: event size limits (official 8 and 128).
        repr_topk: keys averaged into an event's representative (official 4).
        max_cached_blocks: events per row resident on the device when offloading (official 520).
        exc_block_size: queries per execution block (official 512), at most ``n_local``.
        surprise_gamma: threshold ``mean + gamma * std`` (official ``surprisal_threshold_gamma`` 1.0).
        similarity_refinement: refine surprise boundaries on the key-similarity graph (default True).
        similarity_metric: ``"modularity"`` (official default) or ``"conductance"``.
        refine_from_layer: first layer whose keys build the similarity graph (``None``: ``5/8`` of the layers).
        use_contiguity_buffer: add the +-1 neighbour events of the retrieved ones (default True).
        contiguity_buffer_size: share of the budget for them (``< 1``) or a token count (official 0.3).
        offload, pin_memory, offload_representatives: as :class:`~hf_longmem.cache_classes.infllm.InfLLMCache`.
        config: the model config (layer layout and RoPE).
        rotary: the model's RoPE (``from_model`` reads it).
        manual_surprise: feed surprise yourself with :meth:`record_surprise` instead of the model hook (tests,
            custom segmentations).

    Build it with ``make_cache("emllm", model, ...)`` (or :meth:`from_model`), which attaches the surprise hook, and
    generate with ``model.generate(ids, cache=cache, **cache.generate_kwargs)`` (prompts fed in execution blocks).
    """

    hook_attributes = ("_hook", "_padding_hook")

    #: Why this cache holds as much as the full cache or more (shown next to benchmark rows where it does).
    memory_note = (
        "keeps every past token (offloaded blocks in CPU memory count too); the budget bounds what attention reads"
    )
    #: What the budget bounds: the bytes on the compute device with offloading on (architecture matrix, check (b)).
    memory_saving = "resident"
    #: Left padding is exact in whole execution blocks (chunked prefill): the option that sets the multiple.
    padding_multiple_option = "exc_block_size"

    @property
    def generate_kwargs(self) -> dict:
        """``{"prefill_chunk_size": exc_block_size}``: ``generate`` feeds prompts in execution blocks, so that events
        form from each block's surprise before the next block (see the module notes)."""
        return {"prefill_chunk_size": self.exc_block_size}

    def __init__(
        self,
        n_init: int = 128,
        n_local: int = 4096,
        n_mem: int = 4096,
        min_block_size: int = 8,
        max_block_size: int = 128,
        repr_topk: int = 4,
        max_cached_blocks: int = 520,
        exc_block_size: int = 512,
        surprise_gamma: float = 1.0,
        similarity_refinement: bool = True,
        similarity_metric: str = "modularity",
        refine_from_layer: int | None = None,
        use_contiguity_buffer: bool = True,
        contiguity_buffer_size: float = 0.3,
        offload: bool | None = None,
        pin_memory: bool | None = None,
        offload_representatives: bool = False,
        config=None,
        rotary: RotaryShift | None = None,
        manual_surprise: bool = False,
    ):
        check_int("n_init", n_init, low=0)
        check_int("n_local", n_local, low=1)
        check_int("n_mem", n_mem, low=1)
        check_int("min_block_size", min_block_size, low=1)
        check_int("max_block_size", max_block_size, low=1)
        check_int("repr_topk", repr_topk, low=1)
        check_int("max_cached_blocks", max_cached_blocks, low=1)
        check_int("exc_block_size", exc_block_size, low=1)
        if min_block_size > max_block_size:
            raise ValueError(f"`min_block_size` ({min_block_size}) must be at most `max_block_size` ({max_block_size})")
        if exc_block_size > n_local:
            raise ValueError(f"`exc_block_size` ({exc_block_size}) must be at most `n_local` ({n_local})")
        check_real("surprise_gamma", surprise_gamma)
        check_choice("similarity_metric", similarity_metric, METRICS)
        check_real(
            "contiguity_buffer_size", contiguity_buffer_size, low=0.0, strict_low=True, hint="share or token count"
        )
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if refine_from_layer is not None:
            check_int("refine_from_layer", refine_from_layer, low=0)
            if num_layers is not None and refine_from_layer >= num_layers:
                raise ValueError(f"`refine_from_layer` ({refine_from_layer}) must be below the {num_layers} layers")
        self.n_init, self.n_local, self.n_mem = n_init, n_local, n_mem
        self.min_block_size, self.max_block_size = min_block_size, max_block_size
        self.exc_block_size, self.surprise_gamma = exc_block_size, float(surprise_gamma)
        self.similarity_refinement, self.similarity_metric = bool(similarity_refinement), similarity_metric
        self.refine_from_layer = refine_from_layer
        self.use_contiguity_buffer, self.contiguity_buffer_size = bool(use_contiguity_buffer), contiguity_buffer_size
        self.manual_surprise = manual_surprise
        self.rotary = rotary_for(type(self).__name__, config, rotary)
        self._hook = None
        self._padding_hook = None  # attach_padding_hook: pads told from the model's 2-D mask
        self._init_surprise_state()
        options = dict(
            n_init=n_init,
            n_local=n_local,
            block_size=max_block_size,
            topk=1,
            repr_topk=repr_topk,
            max_cached_blocks=max_cached_blocks,
            exc_block_size=exc_block_size,
            offload=offload,
            pin_memory=pin_memory,
            offload_representatives=bool(offload_representatives),
        )
        self._layer_options = options
        super().__init__(self._new_layer, config=config)
        refuse_sliding_layers(type(self).__name__, self.layers, config)

    def _new_layer(self, layer_idx: int) -> EMLLMLayer:
        # a bound method, not a closure: a deep copy builds its later layers for itself (cache_classes/hooked.py)
        return EMLLMLayer(self, self.rotary.for_layer(layer_idx), layer_idx, **self._layer_options)

    def _init_surprise_state(self) -> None:
        # per row of the batch (lists sized at the first forward, see _ensure_rows)
        self._known: list[int] = []  # real tokens whose surprise is known (positions 0.._known-1)
        self._history: list[torch.Tensor] = []  # surprise of the last <= n_local known tokens (threshold statistics)
        self._flags: list[torch.Tensor] = []  # boundary flags of known tokens from _flags_start on
        self._flags_start: list[int] = []
        self._last_logits: list[torch.Tensor | None] = []  # [vocab] of the row's last token (its next id unknown)
        self._forward_real: torch.Tensor | None = None  # [b, q] real tokens of the current forward (None: all)
        self._warned_long_forward = False

    def _ensure_rows(self, batch: int) -> None:
        """Per-row segmentation state for ``batch`` rows (created at the first forward)."""
        if len(self._known) == batch:
            return
        if any(self._known):
            raise ValueError(f"EMLLMCache holds {len(self._known)} rows, got a forward of {batch}")
        self._known = [0] * batch
        self._history = [torch.zeros(0) for _ in range(batch)]
        self._flags = [torch.zeros(0, dtype=torch.bool) for _ in range(batch)]
        self._flags_start = [0] * batch
        self._last_logits = [None] * batch

    @classmethod
    def options_for_budget(cls, budget: int) -> dict:
        """Options attending to about ``budget`` tokens per step: ``n_init + n_mem + n_local``.

        The split follows the official Llama-3 configuration (``budget = 8320`` gives 128 initial tokens,
        ``n_mem = n_local = 4096`` and events of 8 to 128 tokens); every past token is still held.
        """
        budget = max(3, int(budget))
        n_init = min(128, budget // 16)
        n_mem = max(1, (budget - n_init) // 2)
        n_local = max(1, budget - n_init - n_mem)
        max_block = min(128, max(2, n_mem // 8))
        return {
            "n_init": n_init,
            "n_local": n_local,
            "n_mem": n_mem,
            "min_block_size": max(1, min(8, max_block // 16)),
            "max_block_size": max_block,
            "exc_block_size": min(512, n_local),
        }

    # ----------------------------------------------------------------------------------------------- model hook
    @classmethod
    def from_model(cls, model, **kwargs) -> EMLLMCache:
        """Builds the cache for ``model`` and attaches the surprise hook."""
        if "rotary" not in kwargs:
            kwargs["rotary"] = rotary_for(cls.__name__, model=model)
        cache = cls(config=model.config, **kwargs)
        cache.attach(model)
        return cache

    def attach(self, model) -> None:
        """Scores every forward of ``model`` that uses this cache (hook on the decoder's last hidden states)."""
        self.close()
        self._hook = attach_output_hook(model, self, _observe, "EM-LLM")
        self._padding_hook = attach_padding_hook(model, self)
        self.remember_model(model)

    def close(self) -> None:
        """Removes the surprise and padding hooks from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._padding_hook is not None:
            self._padding_hook.remove()
            self._padding_hook = None

    def observe(self, input_ids: torch.Tensor, hidden: torch.Tensor, lm_head) -> None:
        """Surprise of each row's tokens whose next token is now known, from ``hidden`` ``[b, q, hidden]``, then
        events.

        The LM head runs on all rows at once (chunks of ``exc_block_size`` queries); a row's real tokens are the
        last ones of the forward (left padding), its pads are not scored. The threshold statistics, refinement and
        event cuts are per row (host logic, a loop over rows once per forward).
        """
        batch, num_new = input_ids.shape
        self._ensure_rows(batch)
        real = self._forward_real
        self._forward_real = None
        counts = real.sum(1).tolist() if real is not None and real.shape == input_ids.shape else [num_new] * batch
        ids = input_ids.to(hidden.device)
        if num_new == 1 and min(counts) == 1:  # decoding: only the previous token's surprise becomes known
            last = lm_head(hidden).float()[:, 0]  # [b, vocab]
            for row in range(batch):  # per-row segmentation (host logic, once per forward)
                previous = self._last_logits[row]
                if previous is None:  # the row's first token: nothing known yet
                    surprise = hidden.new_zeros(0, dtype=torch.float32)
                else:  # -log p(token | previous), as below
                    surprise = torch.logsumexp(previous, -1, keepdim=True) - previous.gather(0, ids[row])
                self._last_logits[row] = last[row]
                self.record_surprise(surprise, row=row, form=False)
            self.form_events()
            return
        parts = []
        for start in range(0, num_new - 1, self.exc_block_size):  # LM head in chunks of queries, every row
            stop = min(start + self.exc_block_size, num_new - 1)
            logits = lm_head(hidden[:, start:stop]).float()  # [b, c, vocab]
            picked = logits.gather(-1, ids[:, start + 1 : stop + 1, None]).squeeze(-1)
            parts.append(torch.logsumexp(logits, dim=-1) - picked)
        surprise = torch.cat(parts, dim=1) if parts else hidden.new_zeros(batch, 0, dtype=torch.float32)  # [b, q - 1]
        last = lm_head(hidden[:, -1:]).float()[:, 0]  # [b, vocab]
        for row in range(batch):  # per-row segmentation (host logic, once per forward)
            count = counts[row]
            if count == 0:
                continue
            values = []
            previous = self._last_logits[row]
            if previous is not None:  # the row's last token, now that its next token is known
                values.append((torch.logsumexp(previous, -1) - previous[ids[row, num_new - count]]).reshape(1))
            values.append(surprise[row, num_new - count :])
            self._last_logits[row] = last[row]
            self.record_surprise(torch.cat(values), row=row, form=False)
        self.form_events()

    # ----------------------------------------------------------------------------------------- segmentation
    def record_surprise(self, surprise: torch.Tensor, row: int = 0, form: bool = True) -> None:
        """Surprise ``[n]`` of ``row``'s next ``n`` tokens (positions ``known..known+n-1``): boundaries, then events
        (of every row, unless ``form=False``)."""
        layers = self._em_layers()
        self._ensure_rows(layers[0].keys.shape[0] if layers else max(1, len(self._known)))
        surprise = surprise.detach().float().flatten().cpu()
        start = self._known[row]
        flags = []
        for begin in range(0, surprise.numel(), self.exc_block_size):  # statistics per execution block
            whole = begin == 0 and surprise.numel() <= self.exc_block_size  # one block (decoding): no slice
            group = surprise if whole else surprise[begin : begin + self.exc_block_size]
            flags.append(surprise_boundaries(group, self._history[row], self.surprise_gamma))
            history = torch.cat((self._history[row], group))
            self._history[row] = history if history.numel() <= self.n_local else history[-self.n_local :]
        new_flags = (flags[0] if len(flags) == 1 else torch.cat(flags)) if flags else torch.zeros(0, dtype=torch.bool)
        self._known[row] += surprise.numel()
        self._flags[row] = torch.cat((self._flags[row], new_flags))
        if self.similarity_refinement and bool(new_flags.any()):
            self._refine(start, row)
        if form:
            self.form_events()

    def _em_layers(self) -> list[EMLLMLayer]:
        return [layer for layer in self.layers if isinstance(layer, EMLLMLayer) and layer.is_initialized]

    def _refine(self, first_new: int, row: int = 0) -> None:
        """Refines ``row``'s boundaries of the tokens from ``first_new`` on, in the context of the event they
        continue."""
        layers = self._em_layers()
        if not layers:
            return
        offset, flags, end = self._flags_start[row], self._flags[row], self._known[row]
        recent_start = int(layers[0].positions[row, layers[0].first_slot(row)])
        first = max(first_new, recent_start)  # tokens before it already went to blocks (a long forward)
        low = max(recent_start, offset, first - self.max_block_size)
        earlier = torch.nonzero(flags[low - offset : first - offset]).flatten()
        context = low + int(earlier[-1]) if earlier.numel() else low  # start of the event in progress
        boundaries = torch.nonzero(flags[first - offset : end - offset]).flatten() + (first - context)
        kept, previous = [], 0
        for boundary in boundaries.tolist():  # drop boundaries closer than min_block_size (official)
            if boundary - previous >= self.min_block_size:
                kept.append(boundary)
                previous = boundary
        flags[first_new - offset : end - offset] = False
        if not kept:
            return
        adjacency = self.similarity_graph(context, end, row)
        refined = refine_boundaries(
            kept, adjacency, self.min_block_size, self.similarity_metric, first_movable=first - context
        )
        flags[torch.tensor(refined, dtype=torch.long) + (context - offset)] = True

    def similarity_graph(self, start: int, stop: int, row: int = 0) -> torch.Tensor:
        """``[T, T]`` float32 ``sum_{layers >= refine_from_layer} sum_{kv heads} K K^T`` of ``row``'s positions
        ``[start, stop)``.

        Keys are taken at position 0 (unrotated), as the official code's pre-RoPE keys.
        """
        layers = self._em_layers()
        first = self.refine_from_layer
        if first is None:
            first = (len(self.layers) * 5) // 8
        chosen = [layer for layer in layers if layer.layer_idx >= first] or layers[-1:]
        adjacency = None
        for layer in chosen:  # loop over layers
            first_slot = layer.first_slot(row)
            offset = int(layer.positions[row, first_slot])
            begin, end = first_slot + start - offset, first_slot + stop - offset
            keys = layer.keys[row : row + 1, :, begin:end]
            keys = layer.unrotate(keys, layer.positions[row : row + 1, begin:end]).float()[0]
            part = torch.einsum("htd,hsd->ts", keys, keys)
            adjacency = part if adjacency is None else adjacency + part
        return adjacency.cpu()

    def form_events(self) -> None:
        """Cuts the tokens that left every layer's window into event blocks, per row (shared by all layers)."""
        layers = self._em_layers()
        if not layers:
            return
        layer = layers[0]
        batch = layer.keys.shape[0]
        self._ensure_rows(batch)
        counts = layer.recent_counts()
        all_sizes: list[list[int]] = []
        for row in range(batch):  # host logic per row (the boundary flags are host tensors)
            recent = counts[row]
            if recent == 0:
                all_sizes.append([])
                continue
            recent_start = int(layer.positions[row, layer.keys.shape[-2] - recent])
            if recent_start > self._flags_start[row]:  # tokens that went to the initial tokens
                self._flags[row] = self._flags[row][recent_start - self._flags_start[row] :]
                self._flags_start[row] = recent_start
            region = recent - self.n_local
            if region < self.min_block_size:
                all_sizes.append([])
                continue
            region = min(region, self._known[row] - recent_start)  # boundaries are decided for these
            all_sizes.append(event_sizes(self._flags[row][:region], self.min_block_size, self.max_block_size))
        if not any(all_sizes):
            return
        for em_layer in layers:  # loop over layers
            em_layer.form_row_blocks(all_sizes)
        for row, sizes in enumerate(all_sizes):
            formed = sum(sizes)
            self._flags[row] = self._flags[row][formed:]
            self._flags_start[row] += formed

    # ------------------------------------------------------------------------------------------ cache API
    def reset(self):
        super().reset()
        self._init_surprise_state()

    def extra_memory_parts(self) -> MemoryParts:
        """``segmentation`` (surprise history and pending boundary flags, kept in CPU memory: offloaded when the model
        runs on an accelerator) and ``last_logits`` (the last token's logits, on the compute device), besides the
        layers' parts (:meth:`InfLLMLayer.memory_parts`)."""
        parts: MemoryParts = {}
        device = next((layer.device for layer in self.layers if getattr(layer, "device", None) is not None), None)
        on_accelerator = device is not None and device.type != "cpu"
        for name, tensors in (
            ("segmentation", (*self._history, *self._flags)),
            ("last_logits", tuple(self._last_logits)),
        ):
            host = all(t is None or t.device.type == "cpu" for t in tensors)
            parts[name] = (OFFLOADED if host and on_accelerator else RESIDENT, tensor_bytes(*tensors))
        return parts

    # -------------------------------------------------------------------------- rows (beams, batch selection)
    def _reindex_rows(self, index: list[int]) -> None:
        """Rows ``index`` become the rows of the per-row segmentation state (copies: boundary flags are edited in
        place by the refinement, so beams that share a past must not share a tensor)."""
        if not self._known:
            return
        self._known = [self._known[i] for i in index]
        self._history = [self._history[i].clone() for i in index]
        self._flags = [self._flags[i].clone() for i in index]
        self._flags_start = [self._flags_start[i] for i in index]
        self._last_logits = [self._last_logits[i] for i in index]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._reindex_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._reindex_rows([row for row in range(len(self._known)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._reindex_rows(torch.arange(len(self._known))[indices.cpu()].tolist())


__all__ = [
    "EMLLMCache",
    "EMLLMLayer",
    "conductance_scores",
    "event_sizes",
    "modularity_scores",
    "refine_boundaries",
    "surprise_boundaries",
]


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "emllm",
    EMLLMCache,
    needs_attention=True,
    summary="EM-LLM: InfLLM memory with surprise-segmented, graph-refined events, similarity + contiguity retrieval",
)
