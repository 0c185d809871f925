"""Replays LongMemEval-style items through a :class:`MemoryAgent` (or whole-history prompting) and scores retrieval
and QA separately.

Items that share a haystack (as the synthetic ones do) are ingested once. Run from the command line::

    python -m hf_longmem.agents.evaluate --synthetic --num-sessions 32 --update-fraction 0.2 --mode retrieval \
        --reconcile supersede --k 1 --output runs/agents_retrieval.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from hf_longmem.evals.tasks import NEEDLE_INTRO, PASSKEY_QUERY
from hf_longmem.files import atomic_write_text
from hf_longmem.validation import check_choice, check_int

from .agent import MemoryAgent
from .embedders import BM25Embedder, Embedder, HashingEmbedder
from .llm import TransformersLLM
from .longmemeval import ingest_haystack, is_abstention, load_longmemeval, parse_date
from .memorybank import MemoryBankPolicy
from .metrics import answer_is_correct, qa_accuracy_by_type, retrieval_metrics, session_ranking
from .policy import MemoryPolicy, RetrievalPolicy
from .rmm import RMMPolicy
from .store import MemoryStore
from .synthetic import fact_subject, synthetic_chat_history

__all__ = ["PASSKEY_READER", "POLICIES", "evaluate_agent", "policy_factory", "results_table", "run_agent_eval"]

#: Policies ``agent-eval`` can run over a dataset (the others need an LLM that writes summaries or notes).
POLICIES = ("retrieval", "memorybank", "rmm")

#: A reader prompt fitted to the embedded tiny model (trained up to 1024 tokens on pass keys, RULER needles, variable
#: tracking, fact QA and shared-context questions; see its model card): the question reaches the retriever, and the
#: model reads the retrieved memories followed by its pass-key query. The intro is its multi-key needle task's: after
#: the pass-key intro, on prompts of ~60 tokens (it trained on 96+), the model often runs past the key without EOS
#: ("24605555"); with this intro it stops. Top-1 QA on the synthetic set, seeds 1 and 2 (50 questions each): 78% and
#: 74% of answerable questions with the pass-key intro, 100% and 100% with this one.
PASSKEY_READER = {"system": NEEDLE_INTRO, "prompt_template": "{system}\n{memories}" + PASSKEY_QUERY}


def _fingerprint(item: dict[str, Any]) -> str:
    sessions = [[{"role": t["role"], "content": t["content"]} for t in s] for s in item["haystack_sessions"]]
    payload = json.dumps([item["haystack_session_ids"], item["haystack_dates"], sessions], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def evaluate_agent(
    items: list[dict[str, Any]],
    model,
    tokenizer,
    *,
    mode: str = "retrieval",
    policy_factory: Callable[[], MemoryPolicy] = RetrievalPolicy,
    embedder_factory: Callable[[], Embedder] | None = None,
    k: int = 1,
    max_prompt_tokens: int = 512,
    max_new_tokens: int = 8,
    granularity: str = "turn",
    system: str | None = None,
    prompt_template: str | None = None,
    abstain_below: float | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: bool = True,
    kv: bool = False,
    kv_context: bool = False,
) -> dict[str, Any]:
    """Scores ``items`` (LongMemEval schema).

    Args:
        mode: ``"retrieval"`` (the agent: top-``k`` memories under ``max_prompt_tokens``) or ``"full_history"``
            (every turn of the haystack in the prompt, no budget).
        policy_factory: builds a fresh policy per haystack.
        embedder_factory: builds the store's embedder (``None``: the store's default, BM25).
        granularity: ``"turn"`` or ``"session"`` memories (user turns, as upstream's retrieval corpus).
        system / prompt_template: the reader's prompt (defaults: :class:`MemoryAgent`'s).
        abstain_below: the agent abstains when its best score is below this.
        ks: cut-offs of the retrieval metrics.
        kv: answer from the memories' stored KV states (:class:`~hf_longmem.agents.kv.KVMemory`): only the text
            after the memories is prefilled; rows also get ``reprefill_tokens`` (the prompt's tokens).
        kv_context: with ``kv``, encode each memory after the prompt's prefix (``MemoryAgent(kv_context=True)``).

    Returns:
        ``{"summary": {"qa": {type: {accuracy, count}}, "retrieval": {metric: mean}, "mean_prompt_tokens"},
        "questions": [per question: id, type, abstention, answer, prediction, correct, retrieved sessions, ...]}``.
    """
    check_choice("mode", mode, ("retrieval", "full_history"))
    check_int("k", k, low=1)
    agent_kwargs = {}
    if system is not None:
        agent_kwargs["system"] = system
    if prompt_template is not None:
        agent_kwargs["prompt_template"] = prompt_template
    kv_memory = None
    if kv:
        check_choice("mode", mode, ("retrieval",))
        from .kv import KVMemory

        kv_memory = KVMemory(model, tokenizer)
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(_fingerprint(item), []).append(item)
    rows = []
    bar = tqdm(total=len(items), desc=f"agent-eval ({mode})", disable=not progress)
    for group in groups.values():
        store = MemoryStore(embedder=None if embedder_factory is None else embedder_factory())
        policy = policy_factory()
        ingest_haystack(group[0], store, policy, granularity=granularity)
        agent = MemoryAgent(
            model,
            tokenizer,
            store,
            policy,
            k=k,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            write_back=False,
            abstain_below=abstain_below,
            kv=kv_memory,
            kv_context=kv_context,
            **agent_kwargs,
        )
        for item in group:
            now = parse_date(item["question_date"])
            row = {
                "question_id": item["question_id"],
                "question_type": item["question_type"],
                "abstention": is_abstention(item),
                "answer": item["answer"],
            }
            if mode == "full_history":
                lines = [t["content"] for s in item["haystack_sessions"] for t in s]
                prompt = agent.prompt_template.format(
                    system=agent.system, memories="\n".join(lines), question=item["question"]
                )
                llm: TransformersLLM = agent.llm
                prediction = llm.generate(prompt, max_new_tokens).strip()
                row.update(prediction=prediction, prompt_tokens=llm.last_prompt_tokens, retrieved_sessions=[])
            else:
                reply = agent.answer(item["question"], now=now)
                # The policy's own top-k first (RMM reranks, MemoryBank forgets), then the store's search order.
                searched = store.search(item["question"], 50, as_of=reply.as_of)
                ranking = session_ranking(h.session_id for h in [*reply.retrieved, *searched])
                row.update(
                    prediction=reply.text,
                    prompt_tokens=reply.prompt_tokens,
                    abstained=reply.abstained,
                    retrieved_sessions=ranking[: max(ks)],
                    top_score=reply.retrieved[0].score if reply.retrieved else None,
                    shown=[h.text for h in reply.shown],
                    reprefill_tokens=reply.extra.get("reprefill_tokens", reply.prompt_tokens),
                )
                if not row["abstention"] and item["answer_session_ids"]:
                    row["retrieval"] = retrieval_metrics(ranking, item["answer_session_ids"], ks)
            row["correct"] = answer_is_correct(row["prediction"], item["answer"], abstention=row["abstention"])
            rows.append(row)
            bar.update(1)
        store.close()
    bar.close()
    scored = [r["retrieval"] for r in rows if "retrieval" in r]
    retrieval = {name: sum(r[name] for r in scored) / len(scored) for name in scored[0]} if scored else {}
    summary = {
        "qa": qa_accuracy_by_type(rows),
        "retrieval": retrieval,
        "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / max(len(rows), 1),
        "max_prompt_tokens": max((r["prompt_tokens"] for r in rows), default=0),
        "num_questions": len(rows),
    }
    if kv_memory is not None:
        summary["mean_reprefill_tokens"] = sum(r["reprefill_tokens"] for r in rows) / max(len(rows), 1)
        summary["memory_encode_tokens"] = kv_memory.encoded_tokens
    return {"summary": summary, "questions": rows}


TABLE_TYPES = ("single-session-user", "knowledge-update", "temporal-reasoning", "abstention", "overall")


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per named result (``evaluate_agent``'s output), QA accuracy (%) per question type,
    recall_any@1 and the mean / max prompt tokens."""
    header = ["run", *TABLE_TYPES, "recall@1", "prompt tokens (mean / max)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        summary = result["summary"]
        cells = [name]
        for qtype in TABLE_TYPES:
            entry = summary["qa"].get(qtype)
            cells.append("-" if entry is None else f"{100 * entry['accuracy']:.0f} ({entry['count']})")
        recall = summary["retrieval"].get("recall_any@1")
        cells.append("-" if recall is None else f"{recall:.2f}")
        cells.append(f"{summary['mean_prompt_tokens']:.0f} / {summary['max_prompt_tokens']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def policy_factory(
    name: str,
    *,
    supersede_key=None,
    forget: bool = False,
    seed: int = 0,
    rmm_greedy: bool = False,
    rmm_prior_weight: float = 1.0,
) -> Callable[[], MemoryPolicy]:
    """A function building a fresh policy ``name`` (``retrieval``, ``memorybank`` or ``rmm``) per haystack."""
    check_choice("policy", name, POLICIES)

    def factory() -> MemoryPolicy:
        if name == "memorybank":
            return MemoryBankPolicy(supersede_key=supersede_key, auto_forget=forget, seed=seed)
        if name == "rmm":
            return RMMPolicy(
                supersede_key=supersede_key,
                seed=seed,
                cite="overlap",
                explore=not rmm_greedy,
                prior_weight=rmm_prior_weight,
            )
        return RetrievalPolicy(supersede_key=supersede_key)

    return factory


def run_agent_eval(args, model, tokenizer, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Runs the options of ``hf-longmem agent-eval`` (``args``, an ``argparse.Namespace``) with a loaded model:
    prints the markdown table and writes the JSON results atomically to ``args.output`` when set."""
    if items is None:
        if args.synthetic:
            items = synthetic_chat_history(
                tokenizer,
                args.num_sessions,
                args.seed,
                update_fraction=args.update_fraction,
                num_questions=args.num_questions,
            )
        else:
            items = load_longmemeval(args.data)
    key = fact_subject if (args.reconcile == "supersede" and args.synthetic) else None
    reader = PASSKEY_READER if args.reader == "passkey" else {}
    result = evaluate_agent(
        items,
        model,
        tokenizer,
        mode=args.mode,
        policy_factory=policy_factory(
            args.policy,
            supersede_key=key,
            forget=args.forget,
            seed=args.seed,
            rmm_greedy=args.rmm_greedy,
            rmm_prior_weight=args.rmm_prior_weight,
        ),
        k=args.k,
        max_prompt_tokens=args.max_prompt_tokens,
        granularity=args.granularity,
        abstain_below=args.abstain_below,
        embedder_factory=BM25Embedder if args.embedder == "bm25" else HashingEmbedder,
        kv=args.kv or args.kv_context,
        kv_context=args.kv_context,
        **reader,
    )
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    result["config"] = config
    name = args.output.rsplit("/", 1)[-1].removesuffix(".json") if args.output else args.policy
    print(results_table({name: result}))
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hf_longmem.cli import add_agent_eval_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_agent_eval_arguments(parser, table=True)
    parser.add_argument("--model", default=None, help="a local model folder (default: the embedded tiny model)")
    args = parser.parse_args(argv)
    if args.table:
        loaded = {}
        for path in args.table:
            with open(path, encoding="utf-8") as handle:
                loaded[path.rsplit("/", 1)[-1].removesuffix(".json")] = json.load(handle)
        print(results_table(loaded))
        return loaded
    if args.model is None:
        from hf_longmem import load_default_model

        model, tokenizer = load_default_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    return run_agent_eval(args, model, tokenizer)


if __name__ == "__main__":
    main()
