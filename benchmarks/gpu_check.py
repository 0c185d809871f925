"""End-to-end checks and figures of the Triton paths on a GPU: every cache and memory architecture, compiled.

The kernel tests (``TRITON_INTERPRET=0 pytest tests/kernels`` on a GPU machine) compare each kernel with its torch
reference; this script checks what the kernels are used for, on CUDA:

* ``parity``: every registered cache generates with the Triton kernels (the default on CUDA) and with the torch
  path forced (:func:`hf_longmem.kernels.set_kernel_backend`: per cache, nothing global) on a small random Llama
  in float32, batch 2 with left padding: the greedy tokens must be equal and the logits close. At a budget above
  the sequence each must also give :class:`~transformers.DynamicCache`'s tokens (the "full budget is exact"
  contract, on the GPU path). Options come from the registry (``options_for_budget``) plus the few this check
  needs (:data:`CHECK_OPTIONS`, :data:`FULL_BUDGET_OPTIONS`).
* ``models``: Titans (MAC/MAG/MAL) and MoM with ``memory_backend``/``kernel_backend`` ``"triton"`` vs ``"torch"``:
  logits and the gradients of one training step.
* ``speed``: a random model of Llama-3.2-1B's shape in bfloat16, a ``--context``-token prompt and ``--new-tokens``
  greedy steps per cache (default: every registered one) at a quarter of the context as budget, Triton vs torch
  path in the same process, against transformers' ``DynamicCache``: prefill seconds, median decode step, peak GPU
  memory and the cache's bytes.

    TRITON_INTERPRET=0 python benchmarks/gpu_check.py                                       # GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json      # CPU smoke test

Random weights: the figures are about speed, memory and agreement between the two paths, not about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StoppingCriteria, StoppingCriteriaList

import hf_longmem
from hf_longmem.cache_classes.base import cache_memory_bytes
from hf_longmem.kernels import set_kernel_backend, triton_available

#: Reference of the speed section: transformers' own cache (hf_longmem's ``full`` is the same, so it is left out).
DYNAMIC = "dynamic"


def speed_caches() -> list[str]:
    """The speed section's default: ``dynamic`` and every registered compressing cache (registry order)."""
    return [DYNAMIC, *(name for name in hf_longmem.available_caches() if name != "full")]


def _window(budget: int) -> int:
    return max(4, min(64, budget // 8))


#: What these checks add to the registry's ``options_for_budget(budget)`` (the budget-to-options map of each method),
#: as ``fn(budget, model) -> options``. Applied to every cache that takes the option:
#: * ``window_size``: the observation window scales with the budget (the default, 32, exceeds small budgets).
GENERIC_OPTIONS = {"window_size": lambda budget, model: _window(budget)}
#: Per cache, with the reason.
CHECK_OPTIONS = {
    # a random model has no trained head pattern: random gates, half the KV heads streaming
    "duo_attention": lambda budget, model: {"head_pattern": _random_gates(model), "sparsity": 0.5},
    # ThinK after SnapKV, half the key channels pruned (the figures of docs/gpu.md)
    "think": lambda budget, model: {"base": "snapkv", "key_channel_ratio": 0.5},
}
#: Per cache, what makes a budget above the sequence hold every token (the "full budget is exact" check) where the
#: budget alone does not, with the reason.
FULL_BUDGET_OPTIONS = {
    # ThinK prunes int(head_dim * ratio) channels whatever the budget: half a channel prunes none
    "think": lambda budget, model: {"key_channel_ratio": 0.5 / _head_dim(model)},
    # every head a retrieval head (keeps every token)
    "duo_attention": lambda budget, model: {"head_pattern": True, "sparsity": None},
    # retrieved blocks attend at a constant distance, not at their own positions: only a local window that holds
    # every token is exact
    "infllm": lambda budget, model: {"n_local": budget},
    "emllm": lambda budget, model: {"n_local": budget},
}


def _random_gates(model) -> torch.Tensor:
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    return torch.tensor(np.random.default_rng(0).random((layers, kv_heads)))


def _head_dim(model) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def cache_options(name: str, budget: int, model) -> dict[str, Any]:
    """Options of cache ``name`` attending to about ``budget`` tokens per step: the registry's
    ``options_for_budget``, then the :data:`GENERIC_OPTIONS` the method takes, then its :data:`CHECK_OPTIONS`."""
    from hf_longmem.evals.runner import cache_accepts

    options = dict(hf_longmem.get_cache_spec(name).options_for_budget(budget))
    if options:  # a method with a budget
        options.update({k: fn(budget, model) for k, fn in GENERIC_OPTIONS.items() if cache_accepts(name, k)})
    if name in CHECK_OPTIONS:
        options.update(CHECK_OPTIONS[name](budget, model))
    return options


def random_llama(device, dtype, *, hidden, layers, heads, kv_heads, intermediate, vocab, max_positions, std=None):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's init on the CPU takes a while
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if std is not None:  # peaked attention, so greedy tokens depend on every kept token
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, std)
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def greedy(model, ids, cache, new_tokens, mask=None):
    out = model.generate(
        ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **getattr(cache, "generate_kwargs", {}),  # EM-LLM: prompts fed in execution blocks
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits).float()


def parity(device, smoke: bool, emit) -> None:
    """Triton vs torch kernels, and full budget vs DynamicCache, for every cache on a float32 model."""
    size = (
        dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)
        if smoke
        else dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1024, vocab=512)
    )
    model = random_llama(device, torch.float32, max_positions=4096, std=0.2 * (64 / size["hidden"]) ** 0.5, **size)
    length, pad, new = (48, 6, 3) if smoke else (700, 60, 8)
    full_ids = torch.randint(3, size["vocab"], (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    full_mask = torch.ones_like(full_ids)
    full_ids[1, :pad], full_mask[1, :pad] = 0, 0
    budget = 24 if smoke else 256
    with torch.no_grad():
        dense_tokens, dense_logits = greedy(model, full_ids, DynamicCache(config=model.config), new, full_mask)
    for name in hf_longmem.available_caches():
        row: dict[str, Any] = {"section": "parity", "cache": name}
        try:
            options = cache_options(name, budget, model)
            if name in ("infllm", "emllm"):  # equal-length rows only: the unpadded row
                row["rows"] = 1
                ids, mask, dense = full_ids[:1], full_mask[:1], (dense_tokens[:1], dense_logits[:, :1])
            else:
                ids, mask, dense = full_ids, full_mask, (dense_tokens, dense_logits)
            with torch.no_grad():
                cache = set_kernel_backend(hf_longmem.make_cache(name, model, **options), "torch")
                ref_tokens, ref_logits = greedy(model, ids, cache, new, mask)
                cache = set_kernel_backend(hf_longmem.make_cache(name, model, **options), "triton")  # CPU: interpreter
                tokens, logits = greedy(model, ids, cache, new, mask)
            row.update(
                tokens_equal=bool(torch.equal(tokens, ref_tokens)),
                max_logit_diff=float((logits - ref_logits).abs().max()),
            )
            full = full_budget_options(name, length + new, model)
            with torch.no_grad():
                tokens, logits = greedy(model, ids, hf_longmem.make_cache(name, model, **full), new, mask)
            row.update(
                full_budget_tokens_equal=bool(torch.equal(tokens, dense[0])),
                full_budget_max_logit_diff=float((logits - dense[1]).abs().max()),
            )
        except Exception as error:  # one broken method must not hide the others' results
            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc(limit=6)
        emit(row)


def full_budget_options(name: str, total: int, model) -> dict:
    """Options under which cache ``name`` keeps every one of ``total`` tokens."""
    options = cache_options(name, total + 8, model)
    if name in FULL_BUDGET_OPTIONS:
        options.update(FULL_BUDGET_OPTIONS[name](total + 8, model))
    return options


def models(device, smoke: bool, emit) -> None:
    """Titans and MoM: Triton vs torch memory kernels, logits and one step's gradients."""
    from hf_longmem.modeling.mom import MomConfig, MomForCausalLM
    from hf_longmem.modeling.titans import TitansConfig, TitansForCausalLM

    length = 40 if smoke else 512
    titans = dict(
        vocab_size=97,
        hidden_size=32 if smoke else 256,
        intermediate_size=64 if smoke else 512,
        num_hidden_layers=2,
        num_attention_heads=2 if smoke else 4,
        sliding_window=8 if smoke else 64,
        segment_size=16 if smoke else 128,
        memory_chunk_size=8 if smoke else 32,
        memory_heads=2 if smoke else 4,
        num_persistent_tokens=2,
    )
    mom = dict(
        vocab_size=97,
        hidden_size=32 if smoke else 256,
        num_hidden_layers=2,
        num_heads=2 if smoke else 4,
        head_dim=8 if smoke else 64,
        num_memories=4,
        topk=2,
        shared_mem=True,
        intermediate_size=64 if smoke else 512,
        chunk_size=8 if smoke else 64,
        pad_token_id=0,
    )
    builds = [
        (f"titans_{v}", TitansConfig, TitansForCausalLM, "memory_backend", {**titans, "variant": v})
        for v in ("mac", "mag", "mal")
    ]
    builds.append(("mom", MomConfig, MomForCausalLM, "kernel_backend", mom))
    ids = torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(2)).to(device)
    for name, config_cls, model_cls, option, kwargs in builds:
        row: dict[str, Any] = {"section": "models", "model": name}
        try:
            outputs = {}
            for backend in ("torch", "triton"):
                torch.manual_seed(0)
                model = model_cls(config_cls(**kwargs, **{option: backend})).to(device)
                loss = model(ids, labels=ids).loss
                loss.backward()
                loss = loss.detach()
                grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
                with torch.no_grad():
                    logits = model(ids).logits.float()
                    tokens = model.generate(ids[:, :32], max_new_tokens=8, do_sample=False, pad_token_id=0)
                outputs[backend] = (logits, grads, tokens, float(loss))
            (ref_logits, ref_grads, ref_tokens, ref_loss), (logits, grads, tokens, loss) = (
                outputs["torch"],
                outputs["triton"],
            )
            row.update(
                max_logit_diff=float((logits - ref_logits).abs().max()),
                loss_torch=ref_loss,
                loss_triton=loss,
                grad_rel_diff=float((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-12)),
                generate_tokens_equal=bool(torch.equal(tokens, ref_tokens)),
            )
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc(limit=6)
        emit(row)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock(StoppingCriteria):
    """Wall time at every generation step (after a device sync): step 0 ends the prefill and first token."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, ids, make_cache, new_tokens, device) -> tuple[float, list[float], Any]:
    """(prefill seconds, decode step milliseconds, cache) of one greedy generation."""
    clock = StepClock(device)
    cache = make_cache()
    _sync(device)
    start = time.perf_counter()
    model.generate(
        ids,
        cache=cache,
        max_new_tokens=new_tokens + 1,
        do_sample=False,
        pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([clock]),
        **getattr(cache, "generate_kwargs", {}),  # EM-LLM: prompts fed in execution blocks
    )
    steps = [1e3 * (b - a) for a, b in zip(clock.times, clock.times[1:])]
    return clock.times[0] - start, steps, cache


def speed(device, smoke: bool, context: int, new_tokens: int, caches: list[str], emit) -> None:
    """Prefill time, median decode step, peak memory and cache bytes per cache, Triton vs torch kernels, bfloat16.

    Each (cache, backend) generates twice and the second, warm run is reported (the first compiles kernels and
    grows the allocator); ``dynamic`` is transformers' own ``DynamicCache``, the reference for every row.
    """
    size = (
        dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)
        if smoke
        else dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000)
    )
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = random_llama(device, dtype, max_positions=max(131072, context * 2), **size)
    ids = torch.randint(3, size["vocab"], (1, context), generator=torch.Generator().manual_seed(3)).to(device)
    budget = context // 4
    for name in caches:
        uncompressed = name in (DYNAMIC, "full")
        backends = ("torch",) if uncompressed else ("triton", "torch")
        for backend in backends:
            if backend == "triton" and (device.type != "cuda" or not triton_available()):
                continue
            row: dict[str, Any] = {
                "section": "speed",
                "cache": name,
                "backend": backend,
                "context": context,
                "budget": None if uncompressed else budget,
                "new_tokens": new_tokens,
            }
            try:
                if name == DYNAMIC:

                    def make(model=model):
                        return DynamicCache(config=model.config)
                else:
                    options = cache_options(name, budget, model)

                    def make(name=name, options=options, backend=backend):
                        return set_kernel_backend(hf_longmem.make_cache(name, model, **options), backend)

                with torch.no_grad():
                    timed_generate(model, ids, make, new_tokens, device)  # warm-up: compiles, grows the allocator
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    prefill, steps, cache = timed_generate(model, ids, make, new_tokens, device)
                row.update(
                    prefill_s=round(prefill, 4),
                    decode_ms_median=round(statistics.median(steps), 3),
                    decode_ms_max=round(max(steps), 3),
                    cache_bytes=int(
                        cache.memory_bytes() if hasattr(cache, "memory_bytes") else cache_memory_bytes(cache)
                    ),
                    peak_gpu_bytes_over_weights=(torch.cuda.max_memory_allocated() - base)
                    if device.type == "cuda"
                    else None,
                )
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc(limit=6)
            emit(row)


def profile(device, smoke: bool, context: int, caches: list[str], emit) -> None:
    """Top operators (self device time and self CPU time) of 8 decode steps per (cache, backend): where the time of
    a decode step goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    size = (
        dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)
        if smoke
        else dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000)
    )
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = random_llama(device, dtype, max_positions=max(131072, context * 2), **size)
    ids = torch.randint(3, size["vocab"], (1, context), generator=torch.Generator().manual_seed(3)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in caches:
        for backend in ("triton", "torch") if device.type == "cuda" else ("torch",):
            row: dict[str, Any] = {"section": "profile", "cache": name, "backend": backend, "context": context}
            try:
                options = cache_options(name, context // 4, model)
                with torch.no_grad():
                    for _ in range(2):  # second pass: warm
                        cache = set_kernel_backend(hf_longmem.make_cache(name, model, **options), backend)
                        out = model(ids, cache=cache)
                        token = out.logits[:, -1:].argmax(-1)
                        _sync(device)
                    with torch_profile(activities=activities) as prof:
                        for _ in range(8):
                            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                        _sync(device)
                row["table"] = prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)
                print(f"== profile {name} {backend}\n{row['table']}", flush=True)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc(limit=6)
            emit(row)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections", nargs="+", default=["parity", "models", "speed"], choices=["parity", "models", "speed", "profile"]
    )
    parser.add_argument("--context", type=int, default=16384, help="prompt tokens of the speed section")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps of the speed section")
    parser.add_argument(
        "--caches", nargs="+", default=None, help="caches of the speed section (default: dynamic + every registered)"
    )
    parser.add_argument("--profile-caches", nargs="+", default=["snapkv"], help="caches of the profile section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():  # as tests/conftest.py: no autotune timing
        from triton.runtime.autotuner import Autotuner

        Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    caches = args.caches or speed_caches()

    def emit(row: dict) -> None:  # written after every row: a timeout keeps what was done
        print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "table")}), flush=True)
        report["rows"].append(row)
        args.out.write_text(json.dumps(report, indent=1))

    for section in args.sections:
        if section == "parity":
            parity(device, args.smoke, emit)
        elif section == "models":
            models(device, args.smoke, emit)
        elif section == "profile":
            profile(
                device, args.smoke, min(args.context, 512) if args.smoke else args.context, args.profile_caches, emit
            )
        else:
            context = min(args.context, 512) if args.smoke else args.context
            new_tokens = min(args.new_tokens, 4) if args.smoke else args.new_tokens
            speed(device, args.smoke, context, new_tokens, caches, emit)
    return report


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
