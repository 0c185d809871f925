"""Compiled vs eager decode step of the static-layout caches (issue 20, "static shapes and compile"), on CPU.

For each method, three caches are prefilled with the same random prompt: the default (dynamic) layout decoded
eagerly, the static layout (``static=True``) decoded eagerly, and the static layout decoded by
``torch.compile(model.forward, fullgraph=True)`` (inductor by default). After one untimed warm-up round (which
compiles), ``--rounds`` rounds visit the three in turn (interleaved, so machine load hits all alike), each timing
``--steps`` greedy decode steps (batch 1). Reported: median ms per token of each, and the compiled step's speed-up
over the dynamic layout's eager step (eager / compiled).

    python benchmarks/compiled_decode.py                       # streaming, h2o, snapkv; 1k prompt, budget 256
    python benchmarks/compiled_decode.py --methods streaming --backend aot_eager --out results.json

The methods that append generated tokens (SnapKV, PyramidKV, KVMerger, ThinK's tail, DuoAttention's retrieval
heads, SirLLM within a turn) attend over their whole static capacity (compressed prompt + ``max_new_tokens`` slots, the unused ones
masked), the dynamic layout over what it holds; ``max_new_tokens`` here is what the run decodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_longmem import make_cache  # noqa: E402

#: method -> options of both layouts, from the arguments (DuoAttention: half of the KV heads of every layer stream
#: ``budget`` tokens, the others keep everything)
METHODS = {
    "streaming": lambda args: dict(budget=args.budget, sink_size=4),
    "h2o": lambda args: dict(budget=args.budget),
    # every layer evicts and merges; the static layout needs the first eviction at the end of the prefill
    "d2o": lambda args: dict(budget=args.budget, uncompressed_layers=[], first_eviction="prefill"),
    "snapkv": lambda args: dict(budget=args.budget, window_size=32),
    "pyramidkv": lambda args: dict(budget=args.budget, window_size=32),
    "kvmerger": lambda args: dict(budget=args.budget, window_size=32),
    "think": lambda args: dict(budget=args.budget, window_size=32),
    "sirllm": lambda args: dict(entropy_size=args.budget - 4, start_size=4),
    "duo_attention": lambda args: dict(
        head_pattern=torch.arange(args.kv_heads).remainder(2).eq(0).expand(args.layers, -1).clone(),
        sink_size=16,
        recent_size=args.budget - 16,
    ),
}
#: Methods that evict while decoding (a ring of ``budget + 1`` slots); the others reserve ``max_new_tokens`` slots.
EVICTING = ("streaming", "h2o")


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.prompt + 4096,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


class Runner:
    """A prefilled cache and the forward that decodes it, one greedy token per step."""

    def __init__(self, model, forward, cache, prompt: torch.Tensor):
        self.forward, self.cache = forward, cache
        with torch.no_grad():
            logits = model(prompt, cache=cache).logits
        self.token = logits[:, -1:].argmax(-1)
        self.position = prompt.shape[1]

    def run(self, steps: int) -> float:
        """Seconds per token over ``steps`` decode steps."""
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                position_ids = torch.tensor([[self.position]])
                logits = self.forward(self.token, cache=self.cache, position_ids=position_ids).logits
                self.token = logits[:, -1:].argmax(-1)
                self.position += 1
        return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["streaming", "h2o", "snapkv"], choices=sorted(METHODS))
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    prompt = torch.randint(3, 1024, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    total_steps = args.steps * (args.rounds + 1)
    results = {}
    for method in args.methods:
        options = METHODS[method](args)
        static = dict(static=True) if method in EVICTING else dict(static=True, max_new_tokens=total_steps)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend=args.backend, fullgraph=True)
        runners = {
            "dynamic_eager": Runner(model, model.forward, make_cache(method, model, **options), prompt),
            "static_eager": Runner(model, model.forward, make_cache(method, model, **options, **static), prompt),
            "static_compiled": Runner(model, compiled, make_cache(method, model, **options, **static), prompt),
        }
        start = time.perf_counter()
        for runner in runners.values():
            runner.run(args.steps)  # warm-up; compiles the compiled one
        warmup = time.perf_counter() - start
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                times[name].append(runner.run(args.steps))
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        results[method] = {
            "ms_per_token": medians,
            "speedup_compiled_vs_dynamic_eager": medians["dynamic_eager"] / medians["static_compiled"],
            "speedup_compiled_vs_static_eager": medians["static_eager"] / medians["static_compiled"],
            "warmup_s": warmup,
        }
        print(
            f"{method:10s} dynamic eager {medians['dynamic_eager']:7.3f} ms  static eager "
            f"{medians['static_eager']:7.3f} ms  static compiled {medians['static_compiled']:7.3f} ms  "
            f"dynamic/compiled {results[method]['speedup_compiled_vs_dynamic_eager']:.2f}x  "
            f"(warm-up incl. compile {warmup:.0f} s)",
            flush=True,
        )
    report = {
        "setting": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
