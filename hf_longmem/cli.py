"""The ``hf-longmem`` command: benchmark caches, generate through a cache, list caches, print result tables, edit,
evaluate long-term memory policies (``agent-eval``).

Everything runs offline (``HF_HUB_OFFLINE=1``); models load from local folders only (``local_files_only=True``).
Without ``--model`` the embedded tiny model (``hf_longmem.load_default_model``) is used. Errors in the arguments
(missing model folder, unknown cache, bad option value) print one ``hf-longmem: error: ...`` line and exit with
status 2.
"""

from __future__ import annotations

import os

for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

__all__ = ["build_parser", "main"]

PROG = "hf-longmem"
# The default run answers "which cache keeps accuracy at which memory" on what the embedded model can do: RULER's
# multi-key needle (4 needles, one asked; the full cache answers 92% at 1k in the model card), at its training length
# (1024: where budgets separate the caches) and at twice that (2048: the full cache fails, retrieval caches can help).
# Pass keys are left out of the default: at 25% budget nearly every cache keeps them, so they separate nothing.
DEFAULT_TASKS = ("multikey_needle",)
DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_BUDGET_RATIO = 0.25
DEFAULT_NUM_SAMPLES = 20
DEFAULT_MAX_NEW_TOKENS = 64


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------------------------


def _csv(kind: type, name: str):
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list, got {text!r}")
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parse_option(text: str) -> tuple[str | None, str, Any]:
    """``"KEY=VALUE"`` or ``"CACHE.KEY=VALUE"`` -> ``(cache or None, key, value)``; the value is read as JSON
    when it parses (``256``, ``0.5``, ``true``, ``null``), else kept as a string (``shift``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CLIError(f"options must look like KEY=VALUE or NAME.KEY=VALUE, got {text!r}")
    cache, _, key = key.rpartition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return cache or None, key, value


_EPILOG_BENCH = """\
examples:
  hf-longmem bench                                   # embedded model, every cache, default lengths
  hf-longmem bench --caches full,streaming --budget 128 --lengths 512,1024 --num-samples 8
  hf-longmem bench --budget-ratio 0.1 --cache-option streaming.sink_size=8 --fidelity --out res.json --plot res.png
  hf-longmem bench --model ./my-llama --device cuda --dtype bfloat16 --tasks passkey --lengths 4096,8192

--budget/--budget-ratio give every selected cache that has a token budget about that many tokens per layer; each
method maps it onto its own options (e.g. SirLLM's entropy_size, see `hf-longmem caches`), caches without one (full)
run as they are. --cache-option values go to every selected cache that accepts them and override the budget's; an
option that no selected cache accepts is an error.
"""

_EPILOG_GENERATE = """\
examples:
  hf-longmem generate --cache streaming --cache-option budget=128 --prompt-file prompt.txt
  echo "... The pass key is" | hf-longmem generate --cache snapkv --prompt-file - --max-new-tokens 8
"""


AGENT_EVAL_EPILOG = """\
examples:
  hf-longmem agent-eval --synthetic --update-fraction 0.2 --k 1 --abstain-below 8.3 --output top1.json
  hf-longmem agent-eval --synthetic --update-fraction 0.2 --policy rmm --output rmm.json
  hf-longmem agent-eval --synthetic --kv --output kv.json          # memories read as stored KV states
  hf-longmem agent-eval --data longmemeval_s.json --model ./llama --reader default --k 5 --output s.json

The table shows QA accuracy (%) per question type, recall_any@1 and the prompt tokens; the JSON file holds every
question's prediction, retrieved sessions and metrics.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-longmem`` (subcommands ``bench``, ``generate``, ``caches``, ``report``, ``edit``,
    ``agent-eval``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="hf_longmem: memory methods (compressed KV caches, ...) for Hugging Face transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `hf-longmem COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model", metavar="PATH", help="local Hugging Face causal LM folder (default: the embedded tiny model)"
        )
        p.add_argument(
            "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)"
        )
        p.add_argument(
            "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weight dtype (default: as saved)"
        )
        p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own modeling code")
        p.add_argument(
            "--threads",
            type=_positive_int,
            default=None,
            help="torch CPU threads (default: 1 for the embedded tiny model on CPU, whose matmuls are too small "
            "to gain from more threads while idle OpenMP threads spin on a busy machine; torch's default otherwise)",
        )

    bench = sub.add_parser(
        "bench",
        help="accuracy vs KV bytes vs latency of caches on synthetic long-context tasks",
        description="Benchmark KV caches on synthetic long-context tasks: accuracy, KV bytes, prefill time, "
        "decode speed, peak memory and (with --fidelity) agreement with the full cache.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_BENCH,
    )
    add_model_args(bench)
    bench.add_argument(
        "--tasks",
        type=_csv(str, "--tasks"),
        default=list(DEFAULT_TASKS),
        help=f"comma-separated task generators (default: {','.join(DEFAULT_TASKS)})",
    )
    bench.add_argument(
        "--lengths",
        type=_csv(int, "--lengths"),
        default=list(DEFAULT_LENGTHS),
        help=f"comma-separated context lengths in tokens (default: {','.join(map(str, DEFAULT_LENGTHS))})",
    )
    bench.add_argument(
        "--caches",
        type=_csv(str, "--caches"),
        default=None,
        help="comma-separated cache names (default: every cache of `hf-longmem caches`)",
    )
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget",
        type=_positive_int,
        default=None,
        help="tokens kept per layer by every cache that has a budget (see below)",
    )
    budget.add_argument(
        "--budget-ratio",
        type=_ratio,
        default=None,
        help=f"budget as a fraction of each context length (default: {DEFAULT_BUDGET_RATIO})",
    )
    bench.add_argument(
        "--cache-option",
        action="append",
        default=[],
        metavar="[CACHE.]KEY=VALUE",
        help="extra cache option (repeatable); CACHE. limits it to one cache",
    )
    bench.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="TASK.KEY=VALUE",
        help="task generator option (repeatable), e.g. multikey_needle.num_needles=2",
    )
    bench.add_argument(
        "--num-samples",
        type=_positive_int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"samples per task and length (default: {DEFAULT_NUM_SAMPLES}; the table shows the 95%% interval)",
    )
    bench.add_argument("--seed", type=int, default=0, help="task generator seed (default: 0)")
    bench.add_argument(
        "--mode",
        choices=["auto", "single", "rollback", "append"],
        default="auto",
        help="how turns are answered (default: single for one-question tasks, rollback otherwise)",
    )
    bench.add_argument("--batch-size", type=_positive_int, default=1, help="prompts per forward in single mode")
    bench.add_argument("--fidelity", action="store_true", help="also measure top-1 agreement and KL vs the full cache")
    bench.add_argument("--out", metavar="FILE", help="write the results JSON here")
    bench.add_argument("--records", action="store_true", help="keep the per-turn records in the results JSON")
    bench.add_argument("--plot", metavar="FILE", help="write an accuracy vs KV bytes plot here (needs matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="hide progress bars")

    generate = sub.add_parser(
        "generate",
        help="greedy generation of a prompt through a cache",
        description="Generate greedily from a prompt file through one cache; prints the generated text "
        "(timings and KV bytes go to stderr).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_GENERATE,
    )
    add_model_args(generate)
    generate.add_argument("--cache", default="full", help="cache name (default: full)")
    generate.add_argument(
        "--cache-option", action="append", default=[], metavar="KEY=VALUE", help="cache option (repeatable)"
    )
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-file", metavar="FILE", help="file holding the prompt ('-' for stdin)")
    prompt.add_argument("--prompt", help="the prompt text itself")
    generate.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS})",
    )

    sub.add_parser(
        "caches",
        help="list the available caches and their options",
        description="List the registered cache methods, their summaries and options.",
    )

    report = sub.add_parser(
        "report",
        help="print the table of a results file (and plot it)",
        description="Print the table of a results JSON written by `hf-longmem bench --out`.",
    )
    report.add_argument("results", metavar="RESULTS_JSON")
    report.add_argument("--plot", metavar="FILE", help="also write an accuracy vs KV bytes plot")
    report.add_argument(
        "--lines", choices=["length", "task"], default="length", help="one plot line per length or task"
    )

    from hf_longmem.editing.command import EPILOG as EDIT_EPILOG
    from hf_longmem.editing.command import add_edit_arguments

    edit = sub.add_parser(
        "edit",
        help="write WISE knowledge edits from a file and save the side memories",
        description="Edit facts into a model with WISE side memories and save them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EDIT_EPILOG,
    )
    add_model_args(edit)
    add_edit_arguments(edit)

    agent_eval = sub.add_parser(
        "agent-eval",
        help="run a long-term memory policy over a chat-history dataset",
        description="Replay a LongMemEval-style dataset (synthetic, or a local JSON file) through a memory policy "
        "and score retrieval (recall@k, NDCG@k) and QA accuracy per question type.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AGENT_EVAL_EPILOG,
    )
    add_model_args(agent_eval)
    add_agent_eval_arguments(agent_eval)
    return parser


def add_agent_eval_arguments(parser: argparse.ArgumentParser, *, table: bool = False) -> None:
    """The options of ``hf-longmem agent-eval`` (also ``python -m hf_longmem.agents.evaluate``, which adds
    ``--table``); defined here so that ``--help`` needs no torch."""
    source = parser.add_mutually_exclusive_group(required=True)
    if table:
        source.add_argument("--table", nargs="+", metavar="JSON", help="print a markdown table of result files")
    source.add_argument("--synthetic", action="store_true", help="generate synthetic_chat_history (offline)")
    source.add_argument("--data", metavar="JSON", help="a local LongMemEval JSON file (longmemeval_s.json, ...)")
    parser.add_argument("--num-sessions", type=_positive_int, default=32, help="synthetic: sessions (default 32)")
    parser.add_argument("--num-questions", type=_positive_int, default=50, help="synthetic: questions (default 50)")
    parser.add_argument(
        "--update-fraction", type=float, default=0.0, help="synthetic: share of facts re-assigned later (default 0)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["retrieval", "full_history"], default="retrieval")
    parser.add_argument("--policy", choices=["retrieval", "memorybank", "rmm"], default="retrieval")
    parser.add_argument("--forget", action="store_true", help="memorybank: forget (archive) before each retrieval")
    parser.add_argument("--rmm-greedy", action="store_true", help="rmm: rerank without Gumbel exploration")
    parser.add_argument(
        "--rmm-prior-weight", type=float, default=1.0, help="rmm: weight of the retriever's score (0: the paper's)"
    )
    parser.add_argument("--reconcile", choices=["supersede", "add-only"], default="supersede")
    parser.add_argument("--embedder", choices=["bm25", "hashing"], default="bm25")
    parser.add_argument("--granularity", choices=["turn", "session"], default="turn")
    parser.add_argument("--k", type=_positive_int, default=1, help="memories retrieved per question (default 1)")
    parser.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
    parser.add_argument("--abstain-below", type=float, default=None, help="abstain when the best score is below")
    parser.add_argument(
        "--reader",
        choices=["passkey", "default"],
        default="passkey",
        help="passkey: the embedded model's needle intro, the memories, then its pass-key query (PASSKEY_READER); "
        "default: MemoryAgent's prompt",
    )
    parser.add_argument("--kv", action="store_true", help="answer from the memories' stored KV states")
    parser.add_argument(
        "--kv-context", action="store_true", help="--kv, with each memory encoded after the prompt's prefix"
    )
    parser.add_argument("--output", default=None, metavar="JSON", help="write the JSON results here (atomic)")


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------------


def _go_offline() -> None:
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # in case huggingface_hub was imported before this module
    except (ImportError, AttributeError):
        pass


def _resolve_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a torch device") from None
    if resolved.type == "meta":
        raise CLIError("--device meta holds no data and cannot run a model; use cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device!r}: CUDA is not available on this machine")
    return resolved


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer, model_name)`` from ``--model`` (a local folder) or the embedded model."""
    import torch

    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model is None and device.type == "cpu":
        torch.set_num_threads(1)  # see --threads: the tiny model's matmuls do not gain from more threads
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model is None:
        from hf_longmem import load_default_model

        try:
            model, tokenizer = load_default_model(device=device, dtype=dtype)
        except FileNotFoundError as error:
            raise CLIError(str(error)) from None
        return model, tokenizer, "hf_longmem/tiny-longmem (embedded)"
    path = Path(args.model).expanduser()
    if not path.is_dir():
        raise CLIError(f"--model path {str(path)!r} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model path {str(path)!r} has no config.json (not a Hugging Face model folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": args.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **kwargs)
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load a causal LM and tokenizer from {str(path)!r}: {error}") from None
    model.to(device).eval()
    return model, tokenizer, str(args.model)


def _check_cache_names(names: Sequence[str]) -> None:
    from hf_longmem import available_caches

    unknown = [n for n in names if n not in available_caches()]
    if unknown:
        raise CLIError(f"unknown cache(s) {', '.join(map(repr, unknown))}; available: {', '.join(available_caches())}")


def _cache_options(names: Sequence[str], raw: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per cache name, the ``--cache-option`` values that it accepts (an option no targeted cache takes is an error)."""
    from hf_longmem.evals.runner import cache_accepts

    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for target, key, value in (parse_option(text) for text in raw):
        if target is not None and target not in names:
            raise CLIError(
                f"--cache-option {target}.{key}: cache {target!r} is not among the selected caches {list(names)}"
            )
        takers = [n for n in names if (target is None or n == target) and cache_accepts(n, key)]
        if not takers:
            where = f"cache {target!r}" if target else f"any selected cache ({', '.join(names)})"
            raise CLIError(f"option {key!r} is not accepted by {where}; see `hf-longmem caches`")
        for name in takers:
            options[name][key] = value
    return options


def _budget_options(name: str, budget: int) -> dict[str, Any]:
    """The options that give cache ``name`` a budget of ``budget`` tokens per layer (``{}``: it has no budget): the
    registry's ``options_for_budget``, the one mapping every harness uses."""
    from hf_longmem import get_cache_spec

    return dict(get_cache_spec(name).options_for_budget(budget))


def _has_budget(name: str) -> bool:
    try:
        return bool(_budget_options(name, 256))
    except ValueError:
        return True  # it has a budget, just not this one


def _task_options(tasks: Sequence[str], raw: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--task-option TASK.KEY=VALUE`` -> options per selected task, checked against the generator's signature."""
    from hf_longmem.evals.tasks import TASKS

    options: dict[str, dict[str, Any]] = {task: {} for task in tasks}
    for text in raw:
        task, key, value = parse_option(text)
        if task is None or task not in options:
            raise CLIError(
                f"--task-option {text!r} must name one of the selected tasks {list(tasks)} as TASK.KEY=VALUE"
            )
        options[task][key] = value
    for task, opts in options.items():
        if task in TASKS and opts:
            try:
                inspect.signature(TASKS[task]).bind(None, 1, 1, 0, **opts)
            except TypeError as error:
                raise CLIError(f"bad --task-option for {task!r}: {error}") from None
    return options


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from hf_longmem import available_caches, make_cache
    from hf_longmem.evals.report import collect_meta, format_table, plot
    from hf_longmem.evals.runner import run_benchmark
    from hf_longmem.evals.tasks import TASKS

    unknown_tasks = [t for t in args.tasks if t not in TASKS]
    if unknown_tasks:
        raise CLIError(f"unknown task(s) {', '.join(map(repr, unknown_tasks))}; available: {', '.join(TASKS)}")
    task_options = _task_options(args.tasks, args.task_option)
    _check_output(args.out, "--out")
    if args.plot:
        _check_plot_path(args.plot)
    bad_lengths = [n for n in args.lengths if n < 1]
    if bad_lengths:
        raise CLIError(f"--lengths must be positive, got {bad_lengths}")
    names = args.caches if args.caches is not None else available_caches()
    _check_cache_names(names)
    if len(set(names)) != len(names):
        raise CLIError(f"--caches lists a cache twice: {names}")
    fixed = _cache_options(names, args.cache_option)
    budgeted = [name for name in names if _has_budget(name)]
    if (args.budget is not None or args.budget_ratio is not None) and not budgeted:
        flag = "--budget" if args.budget is not None else "--budget-ratio"
        raise CLIError(f"{flag}: no selected cache ({', '.join(names)}) has a token budget; see `hf-longmem caches`")
    ratio = args.budget_ratio if args.budget is None else None
    if ratio is None and args.budget is None:
        ratio = DEFAULT_BUDGET_RATIO

    def options_for(name: str):
        # The budget maps onto each method's own options (registry `options_for_budget`); --cache-option wins.
        if name not in budgeted:
            return dict(fixed[name])
        if args.budget is not None:
            return lambda length: {**_budget_options(name, args.budget), **fixed[name]}
        return lambda length: {**_budget_options(name, max(1, round(ratio * length))), **fixed[name]}

    caches = {name: (name, options_for(name)) for name in names}
    model, tokenizer, model_name = load_model(args)
    for name, (_, options) in list(caches.items()):  # bad option values fail here, before any work
        for length in args.lengths:
            opts: Any = "?"
            try:
                opts = options(length) if callable(options) else options
                make_cache(name, model, **opts)
            except (ValueError, TypeError) as error:
                if args.caches is not None or fixed[name]:
                    raise CLIError(f"bad options {opts} for cache {name!r} at length {length}: {error}") from None
                # Implicit "every cache", no option given for it: one that cannot run on this model is skipped.
                print(
                    f"{PROG}: warning: skipping cache {name!r} (options {opts}, length {length}): {error}",
                    file=sys.stderr,
                )
                del caches[name]
                break
    if not caches:
        raise CLIError("no cache can run with these options; pick some with --caches")
    from hf_longmem.evals.tasks import generate_task

    for task, opts in task_options.items():  # bad option values or a too short length fail here, before any work
        try:
            generate_task(task, tokenizer, min(args.lengths), 1, args.seed, **opts)
        except ValueError as error:
            raise CLIError(f"task {task!r} at length {min(args.lengths)}: {error}") from None
    records: list[dict[str, Any]] | None = [] if args.records else None
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()

    def meta(**extra):
        return collect_meta(
            model_name=model_name,
            device=str(model.device),
            seed=args.seed,
            tasks=task_options,
            lengths=args.lengths,
            budget=args.budget,
            budget_ratio=ratio,
            num_samples=args.num_samples,
            fidelity=args.fidelity,
            wall_time_s=round(time.perf_counter() - start, 3),
            **extra,
        )

    try:
        run_benchmark(
            model,
            tokenizer,
            task_options,
            args.lengths,
            caches,
            num_samples=args.num_samples,
            seed=args.seed,
            fidelity=args.fidelity,
            mode=None if args.mode == "auto" else args.mode,
            batch_size=args.batch_size,
            model_name=model_name,
            records=records,
            progress=not args.no_progress,
            completed_rows=rows,
        )
    except BaseException as error:  # interrupted or failed: the finished rows are kept, then the error goes on
        interrupted = isinstance(error, KeyboardInterrupt)
        if not (interrupted or rows):
            raise  # nothing to keep: the error alone (e.g. a bad option refused before any work)
        target = args.out or f"hf-longmem-bench-{time.strftime('%Y%m%d-%H%M%S')}.partial.json"
        failure = {"interrupted": True} if interrupted else {"failed": f"{type(error).__name__}: {error}"}
        where = _save_rows(target, rows, meta(**failure), records) if rows else None
        kept = f"{len(rows)} finished rows saved to {where}" if where else "no row had finished"
        print(f"\n{PROG}: {'interrupted' if interrupted else 'failed'}; {kept}", file=sys.stderr)
        if interrupted:
            return 130
        raise
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {elapsed:.1f} s; model: {model_name}; device: {model.device}")
    if args.out:
        print(f"results: {_save_rows(args.out, rows, meta(), records)}")
    if args.plot:
        try:
            print(f"plot: {plot(rows, args.plot)}")
        except OSError as error:
            raise CLIError(f"--plot {args.plot!r} could not be written ({error}); the rows are printed above") from None
    return 0


def _save_rows(path: str, rows, meta, records) -> Path:
    """Saves the results at ``path``; if that fails after the run, next to it in the temp folder (never lost)."""
    from hf_longmem.evals.report import save_results

    try:
        return save_results(path, rows, meta, records)
    except (OSError, ValueError) as error:
        import tempfile

        fallback = Path(tempfile.gettempdir()) / f"{Path(path).name or 'results.json'}.{os.getpid()}.json"
        saved = save_results(fallback, rows, meta, records)
        print(f"{PROG}: warning: could not write {path!r} ({error}); results saved to {saved}", file=sys.stderr)
        return saved


def _check_output(path: str | None, flag: str) -> None:
    """A results file can be written at ``path`` (checked before any work)."""
    if not path:
        return
    from hf_longmem.files import check_writable

    try:
        check_writable(path, flag)
    except ValueError as error:
        raise CLIError(str(error)) from None


def _check_plot_path(path: str) -> None:
    """matplotlib is installed, knows the image format of ``path``'s suffix, and the file can be written."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise CLIError(
            f"--plot {path!r}: unknown image format {suffix or '(no suffix)'!r}; use one of {', '.join(sorted(formats))}"
        )
    _check_output(path, "--plot")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'hf-longmem[plot]'") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hf_longmem import cache_memory_bytes, make_cache
    from hf_longmem.evals.profiling import greedy_generate

    _check_cache_names([args.cache])
    options = _cache_options([args.cache], args.cache_option)[args.cache]
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if path.is_dir():
            raise CLIError(f"--prompt-file {str(path)!r} is a folder, not a text file")
        if not path.is_file():
            raise CLIError(f"--prompt-file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CLIError(
                f"--prompt-file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
    if not text:
        raise CLIError("the prompt is empty")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to the generation and one stats line
    model, tokenizer, _ = load_model(args)
    try:
        cache = make_cache(args.cache, model, **options)
    except (ValueError, TypeError) as error:
        raise CLIError(f"bad options {options} for cache {args.cache!r}: {error}") from None
    ids = torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)
    out = greedy_generate(model, ids, cache, max_new_tokens=args.max_new_tokens)
    tokens = out.tokens(0)
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    speed = out.decode_tokens_per_s
    print(
        f"[{args.cache}] prompt {ids.shape[1]} tokens, {len(tokens)} new; prefill {out.prefill_s * 1000:.1f} ms; "
        f"decode {'-' if speed is None else f'{speed:.1f}'} tok/s; KV {cache_memory_bytes(cache)} bytes",
        file=sys.stderr,
    )
    return 0


_SCALAR_TYPES = {"int", "float", "str", "bool", "None"}


def _is_cli_option(param: inspect.Parameter) -> bool:
    """Options settable from the command line: scalar-typed (or scalar default) keyword parameters, not ``config``
    nor Python objects such as a rotary-embedding helper."""
    if param.name in ("self", "config") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        return False
    if isinstance(param.default, (bool, int, float, str)):
        return True
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return True
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return all(part.strip() in _SCALAR_TYPES for part in text.split("|"))


def cmd_caches(args: argparse.Namespace) -> int:
    from hf_longmem import available_caches, get_cache_spec

    for name in available_caches():
        spec = get_cache_spec(name)
        print(f"{name}: {spec.summary or spec.cls.__name__}")
        params = inspect.signature(spec.cls.__init__).parameters.values()
        options = [p for p in params if _is_cli_option(p)]
        for p in options:
            default = "" if p.default is inspect.Parameter.empty else f" (default: {p.default!r})"
            print(f"    {p.name}{default}")
        try:
            mapped = _budget_options(name, 256)
        except ValueError:
            mapped = {}
        if mapped:
            print(f"    --budget 256 sets: {', '.join(f'{k}={v}' for k, v in mapped.items())}")
        if not options:
            print("    (no options)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hf_longmem.evals.report import format_table, load_results, plot

    try:
        results = load_results(args.results)
    except ValueError as error:
        raise CLIError(str(error)) from None
    meta = results.get("meta") or {}
    if meta.get("model") or meta.get("date"):
        print(f"model: {meta.get('model')}  date: {meta.get('date')}")
    print(format_table(results["rows"]))
    if args.plot:
        _require_matplotlib()
        try:
            print(f"plot: {plot(results['rows'], args.plot, lines=args.lines)}")
        except ValueError as error:
            raise CLIError(str(error)) from None
    return 0


def cmd_agent_eval(args: argparse.Namespace) -> int:
    _check_output(args.output, "--output")
    for name in ("update_fraction",):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise CLIError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if (args.kv or args.kv_context) and args.mode != "retrieval":
        raise CLIError("--kv answers from retrieved memories: use it with --mode retrieval")
    items = None
    if args.data is not None:
        from hf_longmem.agents.longmemeval import load_longmemeval

        try:
            items = load_longmemeval(args.data)
        except (ValueError, OSError) as error:
            raise CLIError(f"--data: {error}") from None
    model, tokenizer, _ = load_model(args)
    from hf_longmem.agents.evaluate import run_agent_eval

    try:
        run_agent_eval(args, model, tokenizer, items)
    except ValueError as error:
        raise CLIError(str(error)) from None
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from hf_longmem.editing.command import run_edit

    return run_edit(args, load_model, CLIError)


COMMANDS = {
    "bench": cmd_bench,
    "generate": cmd_generate,
    "caches": cmd_caches,
    "report": cmd_report,
    "edit": cmd_edit,
    "agent-eval": cmd_agent_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-longmem``; returns the exit status (0 ok, 2 usage error)."""
    _go_offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CLIError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
