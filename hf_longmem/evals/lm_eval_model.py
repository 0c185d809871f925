"""lm-evaluation-harness model ``hf_longmem``: lm-eval's ``HFLM`` with a compressed KV cache on every path.

    pip install "hf-longmem[lm-eval]"
    python -m hf_longmem.evals.lm_eval_cli run --model hf_longmem \\
        --model_args pretrained=PATH,cache=snapkv,budget=512 --device cpu --tasks hellaswag

lm-eval's own ``HFLM`` scores a multiple-choice answer with **one full forward** over context + continuation, so a
compressed cache never touches the log-likelihood tasks ("the KV cache size changed but accuracy did not"). This
class overrides both request paths:

- **log-likelihood** (``loglikelihood``, ``loglikelihood_rolling``, multiple choice): the context is prefilled into a
  fresh cache of the chosen method (which compresses it as it would a prompt; in chunks when the cache asks for it,
  e.g. EM-LLM's execution blocks), the next-token distribution after the context scores the first continuation
  token, and the remaining continuation tokens are fed **through that cache** (they attend the compressed context)
  to score the rest — the computation of :func:`hf_longmem.evals.score_choices`, on lm-eval's token ids. Requests
  sharing a context prefill it once and score each continuation from a copy of the cache.
  With ``cache=full`` this equals lm-eval's one-forward scores (up to float rounding).
- **generation** (``generate_until``): ``model.generate(..., cache=<fresh cache>, **cache.generate_kwargs)``.

Options (``--model_args``): every ``HFLM`` option, plus ``cache`` (a name of
:func:`hf_longmem.available_caches`, default ``full``), ``budget`` and any other cache option prefixed with
``cache_`` (``cache_window_size=32`` passes ``window_size=32``). A bad cache name or option raises ``ValueError``
when the model is built, before any request runs.

Registration: the class is registered with ``lm_eval.api.registry.register_model("hf_longmem")`` when this module is
imported, the way lm-eval documents external models. lm-eval 0.4.13's ``lm_eval`` command only knows its built-in
model table (it has no plugin discovery), so run it through ``python -m hf_longmem.evals.lm_eval_cli`` (the same
command line, with this model registered) or from Python: ``import hf_longmem.evals.lm_eval_model`` then
``lm_eval.simple_evaluate(model="hf_longmem", model_args=...)``.

Deviations: requests are scored one context at a time (no padded batch across requests: every request has its own
compressed cache); the context is truncated from the left to ``max_length`` like ``HFLM`` does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hf_longmem.evals.lm_eval_model needs lm-evaluation-harness: pip install 'hf-longmem[lm-eval]'"
    ) from error
from tqdm.auto import tqdm

from hf_longmem.evals.choices import choice_logprobs
from hf_longmem.evals.profiling import prefill
from hf_longmem.registry import get_cache_spec, make_cache

__all__ = ["LongMemLM"]

_PREFIX = "cache_"


@register_model("hf_longmem")
class LongMemLM(HFLM):
    """``HFLM`` whose log-likelihood and generation requests run through a compressed cache.

    Args:
        cache: registry name of the cache method (default ``"full"``, the uncompressed ``DynamicCache``).
        budget: the cache's ``budget`` option (omitted when ``None``).
        cache_<option>: any other option of the cache.
        **kwargs: ``HFLM`` options (``pretrained``, ``device``, ``batch_size``, ...).
    """

    def __init__(self, *args: Any, cache: str = "full", budget: int | None = None, **kwargs: Any):
        options = {k[len(_PREFIX) :]: kwargs.pop(k) for k in list(kwargs) if k.startswith(_PREFIX)}
        if budget is not None:
            options["budget"] = budget
        get_cache_spec(cache)  # unknown name: ValueError before the model is loaded
        super().__init__(*args, **kwargs)
        if self.backend != "causal":
            raise ValueError("the hf_longmem lm-eval model needs a causal LM (backend='causal')")
        self.cache_name, self.cache_options = cache, options
        self.new_cache()  # validate the options against the loaded model now

    def new_cache(self):
        """A fresh cache of the configured method for the model."""
        return make_cache(self.cache_name, self.model, **self.cache_options)

    # ------------------------------------------------------------------------------------------- log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """``(sum of continuation log-probs, continuation is greedy)`` per request, through a compressed cache
        (:func:`hf_longmem.evals.profiling.prefill` of the context, then
        :func:`hf_longmem.evals.choices.choice_logprobs` of each continuation from the cache, as ``score_choices``)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("a log-likelihood request needs a non-empty context and continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]
            if len(whole) <= len(continuation):
                raise ValueError(f"a continuation of {len(continuation)} tokens leaves no context in {self.max_length}")
            by_context.setdefault(tuple(whole[: len(whole) - len(continuation)]), []).append(index)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood (hf_longmem)")
        for context, indices in by_context.items():
            base = self.new_cache()
            last_logits, _ = prefill(self.model, torch.tensor([context], dtype=torch.long), base)
            for k, index in enumerate(indices):
                cache = base if k == len(indices) - 1 else copy.deepcopy(base)  # the last one may extend the base
                answer = choice_logprobs(self.model, cache, last_logits, len(context), list(requests[index][2]))
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(1)
        bar.close()
        return results

    # ---------------------------------------------------------------------------------------------- generation
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        cache = self.new_cache()
        extra = dict(getattr(cache, "generate_kwargs", None) or {})
        return super()._model_generate(context, max_length, stop, cache=cache, **extra, **generation_kwargs)
