"""HiAgent (Hu et al., ACL 2025, "HiAgent: Hierarchical Working Memory Management for Solving Long-Horizon Agent
Tasks"): working memory chunked by subgoals.

Before acting, the agent states a subgoal; it keeps the full action-observation pairs of the *current* subgoal only.
When a subgoal is finished, its pairs are replaced by one summarised observation written by the LLM (through the
:class:`~hf_longmem.agents.llm.LLM` interface), and a trajectory-retrieval step can re-expand a past subgoal's full
trace into the next prompt. The paper's code is not released ("Coming Soon" in HiAgent2024/HiAgent); this follows the
paper's description, with our own summary prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_longmem.validation import check_int

from .llm import LLM

__all__ = ["HiAgentPolicy", "Subgoal"]

SUMMARY_PROMPT = (
    "Summarize the following actions and observations for the subgoal '{goal}' in one short observation that keeps "
    "what was achieved and any facts needed later.\n{trace}\nSummary:"
)


@dataclass
class Subgoal:
    """A subgoal, its action-observation pairs and (once finished) its summary."""

    goal: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    summary: str | None = None


class HiAgentPolicy:
    """Hierarchical working memory: full detail for the current subgoal, summaries for finished ones.

    Args:
        llm: writes the summary of a finished subgoal.
        summary_tokens: ``max_new_tokens`` of a summary.
    """

    def __init__(self, llm: LLM, *, summary_tokens: int = 64):
        if not isinstance(llm, LLM):
            raise ValueError(f"`llm` must be an hf_longmem.agents LLM, got {type(llm).__name__}")
        self.llm = llm
        self.summary_tokens = check_int("summary_tokens", summary_tokens, low=1)
        self.subgoals: list[Subgoal] = []
        self._expanded: set[int] = set()

    @property
    def current(self) -> Subgoal | None:
        return self.subgoals[-1] if self.subgoals and self.subgoals[-1].summary is None else None

    def start_subgoal(self, goal: str) -> None:
        """States a new subgoal (finishing the current one first, if any)."""
        if not isinstance(goal, str) or not goal.strip():
            raise ValueError("`goal` must be a non-empty string")
        if self.current is not None:
            self.finish_subgoal()
        self.subgoals.append(Subgoal(goal))

    def record(self, action: str, observation: str) -> None:
        """Adds an action-observation pair to the current subgoal."""
        if self.current is None:
            raise ValueError("no current subgoal: call `start_subgoal` first")
        self.current.pairs.append((action, observation))

    def finish_subgoal(self) -> str:
        """Replaces the current subgoal's pairs in the prompt by the LLM's summary; returns it."""
        subgoal = self.current
        if subgoal is None:
            raise ValueError("no current subgoal to finish")
        trace = "\n".join(f"Action: {a}\nObservation: {o}" for a, o in subgoal.pairs)
        subgoal.summary = self.llm.generate(SUMMARY_PROMPT.format(goal=subgoal.goal, trace=trace), self.summary_tokens)
        subgoal.summary = subgoal.summary.strip()
        return subgoal.summary

    def retrieve_trajectory(self, index: int) -> None:
        """Re-expands finished subgoal ``index``'s full trace in the next prompt (the paper's trajectory retrieval)."""
        check_int("index", index, low=0, high=len(self.subgoals) - 1)
        self._expanded.add(index)

    def prompt(self, task: str) -> str:
        """The task, each finished subgoal as its summary (or its full trace if retrieved), then the current subgoal
        with all its pairs."""
        lines = [f"Task: {task}"]
        for i, subgoal in enumerate(self.subgoals):
            if subgoal.summary is not None and i not in self._expanded:
                lines.append(f"Subgoal {i + 1} (done): {subgoal.goal}\nSummary: {subgoal.summary}")
                continue
            status = "done" if subgoal.summary is not None else "current"
            lines.append(f"Subgoal {i + 1} ({status}): {subgoal.goal}")
            lines.extend(f"Action: {a}\nObservation: {o}" for a, o in subgoal.pairs)
        self._expanded.clear()
        return "\n".join(lines)
