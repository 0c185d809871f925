"""Timed greedy generation through any ``transformers.Cache``, and memory measurement.

:func:`greedy_generate` is the decode loop of the harness. It does what ``model.generate(input_ids, cache=cache,
max_new_tokens=n, do_sample=False)`` does (one prefill forward over the whole prompt, so a compressing cache sees
the prompt at once and compresses it, then one forward per new token, stopping at EOS) and gives the same tokens, but
it times the prefill (time to first token) and the decode separately, can return every step's next-token
distribution, can force the fed tokens (teacher forcing, see :mod:`hf_longmem.evals.fidelity`) and can continue
from a cache that already holds earlier turns (``past_length``).

Timings use :func:`time.perf_counter` with :func:`torch.cuda.synchronize` around each timed region on CUDA.
:class:`PeakMemory` measures the peak memory of a block: ``torch.cuda.max_memory_allocated`` on CUDA, the growth of
the process's peak resident set size on CPU (see its docstring for what that does and does not count).
"""

from __future__ import annotations

import inspect
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from hf_longmem.cache_classes.base import cache_memory_bytes

__all__ = [
    "GenerationOutput",
    "PeakMemory",
    "eos_token_ids",
    "greedy_generate",
    "model_device",
    "prefill",
    "profile_generation",
    "synchronize",
]

#: ``PeakMemory.kind`` values.
CUDA_PEAK = "cuda_max_memory_allocated"
RSS_PEAK_DELTA = "cpu_rss_peak_delta"
MAXRSS_GROWTH = "cpu_maxrss_growth"
UNAVAILABLE = "unavailable"


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's input embeddings (where ``input_ids`` must go)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def synchronize(device: torch.device | str | None) -> None:
    """Waits for queued CUDA work on ``device`` (no-op elsewhere), so that wall-clock timings are real."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Resets the kernel's peak-RSS mark (``VmHWM``) of this process (Linux >= 4.0); ``False`` if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def _maxrss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # kB on Linux, bytes on macOS


class PeakMemory:
    """Context manager that measures the peak memory of the block it wraps.

    After the block, ``peak_bytes`` (int) and ``kind`` (str) say what was measured:

    * ``"cuda_max_memory_allocated"`` (CUDA device): ``torch.cuda.max_memory_allocated`` during the block, after
      ``reset_peak_memory_stats``: weights, KV cache and activations held by the caching allocator at the peak.
    * ``"cpu_rss_peak_delta"`` (Linux): the process's peak resident set size during the block minus its resident
      size when the block started (the kernel's peak mark is reset through ``/proc/self/clear_refs``). Memory that
      the allocator freed earlier and reuses inside the block is not counted, so this is a lower bound of the
      block's working memory (often 0 for tiny models).
    * ``"cpu_maxrss_growth"`` (other POSIX systems): growth of ``ru_maxrss``, the peak RSS of the process's whole
      life; 0 unless the block sets a new lifetime peak. A weak lower bound.
    * ``"unavailable"``: none of the above could be read; ``peak_bytes`` is 0.

    Example::

        with PeakMemory(model.device) as peak:
            model.generate(ids, cache=cache, max_new_tokens=32)
        print(peak.peak_bytes, peak.kind)
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes = 0
        self.kind = UNAVAILABLE
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = CUDA_PEAK
        elif _reset_rss_peak():
            self.kind = RSS_PEAK_DELTA
            self._base = (_proc_status_kb("VmRSS") or 0) * 1024
        else:
            try:
                self._base = _maxrss_bytes()
                self.kind = MAXRSS_GROWTH
            except (OSError, ValueError):
                self.kind = UNAVAILABLE
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.kind == CUDA_PEAK:
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == RSS_PEAK_DELTA:
            self.peak_bytes = max(0, (_proc_status_kb("VmHWM") or 0) * 1024 - self._base)
        elif self.kind == MAXRSS_GROWTH:
            self.peak_bytes = max(0, _maxrss_bytes() - self._base)


def eos_token_ids(
    model: Any = None, tokenizer: Any = None, eos_token_id: int | Iterable[int] | None = None
) -> list[int]:
    """The token ids that end a generation: ``eos_token_id`` if given, else those of the model's generation config,
    its config and the tokenizer together."""
    found: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        for item in [value] if isinstance(value, int) else value:
            if int(item) not in found:
                found.append(int(item))

    if eos_token_id is not None:
        add(eos_token_id)
        return found
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        add(getattr(source, "eos_token_id", None))
    return found


@dataclass
class GenerationOutput:
    """Result of :func:`greedy_generate`.

    Attributes:
        sequences: ``[batch, steps]`` int64 new tokens; after a row's EOS the row holds ``pad_token_id``.
        lengths: new tokens of each row, its EOS included (``len == batch``).
        stopped_at_eos: whether each row ended with an EOS token.
        prefill_s: seconds of the prefill forward and the choice of the first token (time to first token).
        decode_s: seconds of the decode steps that produced the other tokens.
        num_prompt_tokens: columns fed by the prefill (pads included).
        logprobs: ``[batch, steps, vocab]`` float32 log-probabilities of the next token at each generated position
            (row ``t`` is the distribution the ``t``-th new token was chosen from), when requested; else ``None``.
    """

    sequences: torch.Tensor
    lengths: list[int]
    stopped_at_eos: list[bool]
    prefill_s: float
    decode_s: float
    num_prompt_tokens: int
    logprobs: torch.Tensor | None = None

    @property
    def num_decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first token of each row comes from the prefill)."""
        return sum(max(0, n - 1) for n in self.lengths)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode throughput in tokens per second over the whole batch; ``None`` when nothing was decoded."""
        if self.num_decode_tokens == 0 or self.decode_s <= 0:
            return None
        return self.num_decode_tokens / self.decode_s

    def tokens(self, row: int = 0) -> list[int]:
        """The new tokens of ``row`` (EOS included, padding after it excluded)."""
        return self.sequences[row, : self.lengths[row]].tolist()


class _Forward:
    """One forward through ``cache`` returning the float32 logits of the last position, ``[batch, vocab]``.

    Uses the forward's cache argument (``cache`` in transformers 5, ``past_key_values`` in older remote code) and
    ``logits_to_keep=1`` when the model takes it (no LM head over the whole prompt).
    """

    def __init__(self, model: torch.nn.Module, cache: Cache):
        params = inspect.signature(model.forward).parameters
        self.model, self.cache = model, cache
        self.cache_arg = "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache, "use_cache": True, "position_ids": positions}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1, :].float()


def _chunk_size(model: torch.nn.Module, prefill_chunk_size: int | None, cache=None) -> int | None:
    """``prefill_chunk_size``, else the cache's (``cache.generate_kwargs``, e.g. EM-LLM's execution blocks), else the
    model's ``generation_config.prefill_chunk_size`` (checked)."""
    if prefill_chunk_size is None:
        prefill_chunk_size = (getattr(cache, "generate_kwargs", None) or {}).get("prefill_chunk_size")
    if prefill_chunk_size is None:
        prefill_chunk_size = getattr(getattr(model, "generation_config", None), "prefill_chunk_size", None)
    if prefill_chunk_size is not None and (
        isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1
    ):
        raise ValueError(f"`prefill_chunk_size` must be a positive int or None, got {prefill_chunk_size!r}")
    return prefill_chunk_size


def _prefill_in_chunks(
    step: _Forward,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_length: int,
    chunk_size: int | None,
) -> torch.Tensor:
    """Feeds the prompt ``[batch, n]`` in chunks of ``chunk_size`` tokens (``None``: one forward), as ``generate``'s
    chunked prefill does (the mask grows with the chunks); returns the last position's logits ``[batch, vocab]``."""
    num_prompt = input_ids.shape[1]
    chunk = num_prompt if chunk_size is None else chunk_size
    last = ((num_prompt - 1) // chunk) * chunk  # start of the last chunk
    for begin in range(0, last, chunk):  # every chunk but the last only fills the cache
        mask = None if attention_mask is None else attention_mask[:, : past_length + begin + chunk]
        step(input_ids[:, begin : begin + chunk], positions[:, begin : begin + chunk], mask)
    return step(input_ids[:, last:], positions[:, last:], attention_mask)


@torch.inference_mode()
def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache, *, past_length: int = 0
) -> tuple[torch.Tensor, float]:
    """Feeds ``input_ids`` (``[1, n]``) through ``cache`` without generating (in chunks when the cache's
    ``generate_kwargs`` or the model's ``generation_config`` set ``prefill_chunk_size``, as :func:`greedy_generate`
    does).

    Args:
        model: the causal LM.
        input_ids: ``[1, n]`` tokens (no padding).
        cache: the cache to fill; it has seen ``past_length`` tokens before.
        past_length: tokens the cache has already seen (positions continue from there).

    Returns:
        ``(logits, seconds)``: ``[1, vocab]`` float32 next-token logits after the last token, and the wall time.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must be a non-empty [1, n] tensor, got shape {tuple(input_ids.shape)}")
    device = model_device(model)
    positions = torch.arange(past_length, past_length + input_ids.shape[1], device=device)[None]
    synchronize(device)
    start = time.perf_counter()
    step, chunk = _Forward(model, cache), _chunk_size(model, None, cache)
    logits = _prefill_in_chunks(step, input_ids.to(device), positions, None, past_length, chunk)
    synchronize(device)
    return logits, time.perf_counter() - start


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    past_length: int = 0,
    forced_tokens: torch.Tensor | None = None,
    return_logprobs: bool = False,
    prefill_chunk_size: int | None = None,
) -> GenerationOutput:
    """Greedy decoding through ``cache``: the prefill over ``input_ids``, then one forward per new token.

    Equivalent to ``model.generate(input_ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)`` for
    an empty cache, with separate prefill and decode timings. The last generated token is not fed back (as in
    ``generate``), so after the call the cache holds the prompt and all new tokens but the last.

    Args:
        model: a causal LM whose forward takes ``cache=`` (or ``past_key_values=``).
        input_ids: ``[batch, n]`` int64 prompt (left-padded when ``batch > 1``).
        cache: the cache to fill; it may already hold ``past_length`` tokens (multi-turn).
        max_new_tokens: most tokens to generate per row (``>= 1``).
        eos_token_id: ids that end a row (default: from the model's configs); a row stops after emitting one.
        pad_token_id: id fed for rows that have finished (default: the config's, else the first EOS id, else 0).
        attention_mask: ``[batch, past_length + n]`` 1 for real tokens, 0 for left pads; needed only with padding.
        past_length: tokens the cache has already seen (positions continue from there).
        forced_tokens: ``[batch, T]`` int64 tokens to feed instead of the greedy choices (teacher forcing; exactly
            ``T`` positions are produced and EOS does not stop the loop). ``sequences`` still holds the greedy
            choices, so ``sequences == forced_tokens`` measures agreement.
        return_logprobs: also return the next-token log-probabilities of every generated position.
        prefill_chunk_size: feed the prompt in chunks of this many tokens, as ``generate`` does (``None``: the
            cache's ``generate_kwargs`` value, e.g. EM-LLM's execution blocks, else the model's
            ``generation_config.prefill_chunk_size``; unset: one forward).

    Returns:
        A :class:`GenerationOutput`.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must be a non-empty [batch, n] tensor, got shape {tuple(input_ids.shape)}")
    if forced_tokens is not None:
        if forced_tokens.ndim != 2 or forced_tokens.shape[0] != input_ids.shape[0] or forced_tokens.shape[1] == 0:
            raise ValueError(
                f"`forced_tokens` must be a non-empty [batch={input_ids.shape[0]}, T] tensor, got {tuple(forced_tokens.shape)}"
            )
        max_new_tokens = forced_tokens.shape[1]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if past_length < 0:
        raise ValueError(f"`past_length` must be >= 0, got {past_length}")
    prefill_chunk_size = _chunk_size(model, prefill_chunk_size, cache)
    device = model_device(model)
    batch, num_prompt = input_ids.shape
    input_ids = input_ids.to(device)
    eos = torch.tensor(eos_token_ids(model, eos_token_id=eos_token_id), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if attention_mask.shape != (batch, past_length + num_prompt):
            raise ValueError(
                f"`attention_mask` must have shape [batch, past_length + n] = {(batch, past_length + num_prompt)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -num_prompt:]
    else:
        positions = torch.arange(past_length, past_length + num_prompt, device=device).expand(batch, -1)
    step = _Forward(model, cache)
    chosen: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        nonlocal finished
        if return_logprobs:
            logprobs.append(torch.log_softmax(logits, dim=-1))
        token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        lengths.add_((~finished).long())
        chosen.append(token)
        if forced_tokens is None:
            finished = finished | torch.isin(token, eos)
        return token

    synchronize(device)
    start = time.perf_counter()
    token = choose(_prefill_in_chunks(step, input_ids, positions, attention_mask, past_length, prefill_chunk_size))
    synchronize(device)
    prefill_end = time.perf_counter()
    last_position = positions[:, -1:]
    for index in range(1, max_new_tokens):
        if forced_tokens is None and bool(finished.all()):
            break
        fed = token if forced_tokens is None else forced_tokens[:, index - 1].to(device)
        last_position = last_position + 1
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=-1)
        token = choose(step(fed[:, None], last_position, attention_mask))
    synchronize(device)
    end = time.perf_counter()
    sequences = torch.stack(chosen, dim=1)
    stopped = [bool(n > 0 and s[n - 1] in eos.tolist()) for s, n in zip(sequences.tolist(), lengths.tolist())]
    return GenerationOutput(
        sequences=sequences,
        lengths=lengths.tolist(),
        stopped_at_eos=stopped if forced_tokens is None else [False] * batch,
        prefill_s=prefill_end - start,
        decode_s=end - prefill_end,
        num_prompt_tokens=num_prompt,
        logprobs=torch.stack(logprobs, dim=1) if return_logprobs else None,
    )


def profile_generation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
) -> dict[str, Any]:
    """Profiles one greedy generation of ``input_ids`` (``[1, n]`` or ``[n]``) through a fresh ``cache``.

    Returns:
        ``{"prefill_s": float, "decode_s": float, "num_new_tokens": int, "decode_tokens_per_s": float | None,
        "kv_bytes": int (bytes the cache holds after the run), "peak_memory_bytes": int, "peak_memory_kind": str,
        "tokens": list[int]}``.
    """
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    with PeakMemory(model_device(model)) as peak:
        out = greedy_generate(model, input_ids, cache, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    return {
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "num_new_tokens": out.lengths[0],
        "decode_tokens_per_s": out.decode_tokens_per_s,
        "kv_bytes": cache_memory_bytes(cache),
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "tokens": out.tokens(0),
    }
