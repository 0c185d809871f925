#!/usr/bin/env python
"""Activation memory of one training step (forward + backward) of a tiny Llama at long length, per option.

    python benchmarks/long_sequence_memory.py --length 8192 --cap-mib 1024 --out benchmarks/results/long_sequence.json

Modes: ``plain``, ``checkpointing`` (``activation_checkpointing_enable``), ``offload``
(:class:`hf_longmem.training.ActivationOffload`), ``chunked_ce`` (:func:`hf_longmem.training.chunked_causal_lm_loss`)
and ``all``. Each mode runs in its own process so that its peak RSS (``ru_maxrss``) is its own. Measured per mode:

- ``saved_mib``: bytes autograd saves for backward during forward + loss (distinct storages, parameters excluded),
  counted with ``torch.autograd.graph.saved_tensors_hooks`` (:class:`hf_longmem.training.SavedTensorBytes`). In
  ``offload`` / ``all`` the offload hooks are the active ones: their count of saved bytes is reported, and on an
  accelerator all of it would leave device memory (``device_saved_mib`` = 0); on this CPU run host is the device,
  so offload moves nothing and peak RSS cannot drop.
- ``peak_rss_mib``: the process's peak resident memory minus its resident memory before the step.
- ``grad_max_diff``: largest absolute gradient difference to ``plain`` (same seed, same ids).

``--cap-mib``: a fixed budget for activations on the compute device (saved-for-backward bytes); the script then
doubles the length from ``--cap-start`` until ``plain`` exceeds the cap and reports whether ``checkpointing+chunked_ce``
(measured here, no offload) fits at that length (forward + loss only: saved bytes are known before backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_longmem.training import (
    ActivationOffload,
    SavedTensorBytes,
    chunked_causal_lm_loss,
    enable_activation_checkpointing,
    lm_head_bypassed,
)

MODES = ("plain", "checkpointing", "offload", "chunked_ce", "checkpointing+chunked_ce", "all")
MIB = 2**20


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 16,
        num_key_value_heads=args.hidden // 16,
        head_dim=16,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def forward_loss(model: LlamaForCausalLM, ids: torch.Tensor, mode: str, chunk: int) -> tuple[torch.Tensor, float]:
    """The loss of ``mode`` and the MiB saved for backward."""
    params = list(model.parameters())
    offload = mode in ("offload", "all")
    chunked = mode in ("chunked_ce", "checkpointing+chunked_ce", "all")
    counter = ActivationOffload(pin_memory=False, keep=params) if offload else SavedTensorBytes(exclude=params)
    with counter:
        if chunked:
            with lm_head_bypassed(model) as head:
                hidden = model(input_ids=ids).logits
                loss = chunked_causal_lm_loss(hidden, head.weight, ids, chunk, head.bias)
        else:
            loss = model(input_ids=ids, labels=ids).loss
    return loss, (counter.kept_bytes + counter.moved_bytes if offload else counter.bytes) / MIB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_mode(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = build_model(args)
    if args.mode in ("checkpointing", "checkpointing+chunked_ce", "all"):
        enable_activation_checkpointing(model)
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(1))
    if args.forward_only:
        _, saved = forward_loss(model, ids, args.mode, args.chunk)
        return {"mode": args.mode, "length": args.length, "saved_mib": round(saved, 1)}
    before = current_rss()
    start = time.perf_counter()
    loss, saved = forward_loss(model, ids, args.mode, args.chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save(grads, args.grads)
    return {
        "mode": args.mode,
        "length": args.length,
        "loss": loss.item(),
        "saved_mib": round(saved, 1),
        "device_saved_mib": 0.0 if args.mode in ("offload", "all") else round(saved, 1),
        "peak_rss_mib": round((peak - before) / MIB, 1),
        "seconds": round(seconds, 2),
    }


def child(args: argparse.Namespace, mode: str, length: int, forward_only: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", "--mode", mode, "--length", str(length)]
    for name in ("vocab", "hidden", "layers", "chunk", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    command += ["--grads", str(Path(args.workdir) / f"{mode}.pt")] + (["--forward-only"] if forward_only else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | saved for backward (MiB) | of it on the device with an accelerator (MiB) | peak RSS over start (MiB) "
        "| step time (s) | max grad diff vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['saved_mib']} | {r['device_saved_mib']} | {r['peak_rss_mib']} | {r['seconds']} "
            f"| {r['grad_max_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024, help="chunked_ce positions per chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--cap-mib", type=float, default=0.0, help="activation budget (0: skip the cap search)")
    parser.add_argument("--cap-start", type=int, default=1024, help="first length of the cap search")
    parser.add_argument("--max-length", type=int, default=1 << 16)
    parser.add_argument("--workdir", default="/tmp/long_sequence_memory")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args)))
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = [child(args, mode, args.length) for mode in args.modes]
    reference = torch.load(Path(args.workdir) / f"{args.modes[0]}.pt", weights_only=True)
    for row in rows:
        grads = torch.load(Path(args.workdir) / f"{row['mode']}.pt", weights_only=True)
        row["grad_max_diff"] = (grads - reference).abs().max().item()
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "mode", "grads")}, "rows": rows}
    print(markdown(rows))
    if args.cap_mib:
        length, search = args.cap_start, []
        while length <= args.max_length:
            plain, optimised = (
                child(args, mode, length, forward_only=True) for mode in ("plain", "checkpointing+chunked_ce")
            )
            search.append(
                {
                    "length": length,
                    "plain_saved_mib": plain["saved_mib"],
                    "checkpointing+chunked_ce_saved_mib": optimised["saved_mib"],
                    "plain_fits": plain["saved_mib"] <= args.cap_mib,
                    "optimised_fits": optimised["saved_mib"] <= args.cap_mib,
                }
            )
            print(json.dumps(search[-1]))
            if plain["saved_mib"] > args.cap_mib:
                break
            length *= 2
        result["cap"] = {"cap_mib": args.cap_mib, "search": search}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
