"""A-MEM, agentic memory (Xu et al., 2025, "A-MEM: Agentic Memory for LLM Agents"; agiresearch/A-mem, MIT).

Each memory is a Zettelkasten note: its content (the store record) plus LLM-written ``keywords``, ``context`` and
``tags``, ``links`` to other notes, a ``retrieval_count`` and an ``evolution_history`` (the note state, kept in the
store's per-memory state). Writing a note: (1) the LLM analyses the content (the official analysis prompt, JSON);
(2) the ``k`` nearest notes are shown to the LLM with the official evolution prompt, which decides ``should_evolve``
and the actions ``strengthen`` (link the new note to the suggested neighbours and replace its tags) and
``update_neighbor`` (rewrite each neighbour's context and tags; the old ones go to its ``evolution_history``).
Retrieval returns the top-``k`` notes and then the notes they link to.

Deviations from ``agentic_memory/memory_system.py``, each on purpose:

- ``update_neighbor`` rewrites the neighbours the LLM was shown; upstream indexes its list of *all* notes (in
  insertion order) with the neighbours' positions in the search result, so it rewrites the first notes ever written;
- the neighbours are shown with their ids, so ``suggested_connections`` can name them (upstream shows
  ``memory index:i`` and then keeps only suggestions that are note ids); an index is accepted too;
- retrieval returns the top-``k`` notes *and* up to ``k`` linked notes; upstream appends the linked notes and then
  cuts the list to ``k``, so linked notes are never returned when ``k`` notes matched;
- the store (BM25 by default) replaces ChromaDB with all-MiniLM-L6-v2; a reply that is not valid JSON means "no
  evolution" and default attributes, as upstream's error path.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hf_longmem.validation import check_int

from .llm import LLM
from .policy import MemoryPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["AMemPolicy", "parse_json_object"]

ANALYSIS_PROMPT = """Generate a structured analysis of the following content by:
1. Identifying the most salient keywords (focus on nouns, verbs, and key concepts)
2. Extracting core themes and contextual elements
3. Creating relevant categorical tags

Format the response as a JSON object:
{"keywords": [several specific, distinct keywords, most important first], "context": "one sentence summarizing the main topic, key points and purpose", "tags": [several broad categories/themes for classification]}

Content for analysis:
"""

EVOLUTION_PROMPT = """You are an AI memory evolution agent responsible for managing and evolving a knowledge base.
Analyze the new memory note according to keywords and context, also with their several nearest neighbors memory.
Make decisions about its evolution.

The new memory context:
{context}
content: {content}
keywords: {keywords}

The nearest neighbors memories:
{neighbors}

Based on this information, determine:
1. Should this memory be evolved? Consider its relationships with other memories.
2. What specific actions should be taken (strengthen, update_neighbor)?
   2.1 If choose to strengthen the connection, which memory should it be connected to? Can you give the updated tags of this memory?
   2.2 If choose to update_neighbor, you can update the context and tags of these memories based on the understanding of these memories. If the context and the tags are not updated, the new context and tags should be the same as the original ones. Generate the new context and tags in the sequential order of the input neighbors.
Note that the length of new_tags_neighborhood must equal the number of input neighbors, and the length of new_context_neighborhood must equal the number of input neighbors.
The number of neighbors is {count}.
Return your decision in JSON format with the following structure:
{{"should_evolve": true or false, "actions": ["strengthen", "update_neighbor"], "suggested_connections": ["neighbor memory ids"], "tags_to_update": ["tag_1", "tag_n"], "new_context_neighborhood": ["new context", "new context"], "new_tags_neighborhood": [["tag_1", "tag_n"], ["tag_1", "tag_n"]]}}
"""


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (a model may wrap it in prose or a code fence), else ``None``."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                try:
                    value = json.loads(text[start : end + 1])
                except ValueError:
                    break
                return value if isinstance(value, dict) else None
        start = text.find("{", start + 1)
    return None


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


class AMemPolicy(MemoryPolicy):
    """A-MEM notes, links and memory evolution over a :class:`MemoryStore`.

    Args:
        llm: the LLM for note analysis and evolution decisions.
        k_neighbors: notes shown to the evolution step (upstream: 5).
        max_new_tokens: reply length of the analysis and evolution calls.
    """

    def __init__(self, llm: LLM, *, k_neighbors: int = 5, max_new_tokens: int = 256, supersede_key=None):
        super().__init__(supersede_key=supersede_key)
        if not isinstance(llm, LLM):
            raise ValueError(f"`llm` must be an hf_longmem.agents LLM, got {type(llm).__name__}")
        self.llm = llm
        self.k_neighbors = check_int("k_neighbors", k_neighbors, low=1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        #: Notes that evolved so far (upstream's ``evo_cnt``).
        self.evolutions = 0

    def analyze(self, content: str) -> dict[str, Any]:
        """``{"keywords": [...], "context": str, "tags": [...]}`` from the LLM (defaults if its reply is not JSON)."""
        reply = parse_json_object(self.llm.generate(ANALYSIS_PROMPT + content, self.max_new_tokens)) or {}
        context = reply.get("context")
        return {
            "keywords": _strings(reply.get("keywords")),
            "context": context if isinstance(context, str) and context else "General",
            "tags": _strings(reply.get("tags")),
        }

    @staticmethod
    def _describe(record: MemoryRecord, note: dict[str, Any]) -> str:
        return (
            f"memory id:{record.id}\ttalk start time:{record.timestamp}\tmemory content: {record.text}\t"
            f"memory context: {note.get('context', '')}\tmemory keywords: {note.get('keywords', [])}\t"
            f"memory tags: {note.get('tags', [])}"
        )

    def ingest(self, store, text_or_messages, *, session_id, timestamp, user_id=None, metadata=None) -> str:
        """Writes a note: analysis, then evolution against its nearest notes; returns its id."""
        self._check_store(store)
        seconds = to_seconds(timestamp)
        content = (
            text_or_messages
            if isinstance(text_or_messages, str)
            else "\n".join(f"{m['role']}: {m['content']}" for m in text_or_messages)
        )
        note = {**self.analyze(content), "links": [], "retrieval_count": 0, "evolution_history": []}
        neighbors = store.search(content, self.k_neighbors) if len(store) else []
        if neighbors:
            states = [store.get_state(n.id) for n in neighbors]
            prompt = EVOLUTION_PROMPT.format(
                context=note["context"],
                content=content,
                keywords=note["keywords"],
                count=len(neighbors),
                neighbors="\n".join(self._describe(n, s) for n, s in zip(neighbors, states)),
            )
            decision = parse_json_object(self.llm.generate(prompt, self.max_new_tokens)) or {}
            if decision.get("should_evolve") is True:
                self.evolutions += 1
                actions = _strings(decision.get("actions"))
                if "strengthen" in actions:
                    ids = [n.id for n in neighbors]
                    for suggestion in _strings(decision.get("suggested_connections")):
                        if suggestion.isdigit() and int(suggestion) < len(ids):
                            suggestion = ids[int(suggestion)]
                        if suggestion in ids and suggestion not in note["links"]:
                            note["links"].append(suggestion)
                    if isinstance(decision.get("tags_to_update"), list):
                        note["tags"] = _strings(decision["tags_to_update"])
                if "update_neighbor" in actions:
                    contexts = decision.get("new_context_neighborhood")
                    tags = decision.get("new_tags_neighborhood")
                    for i, (neighbor, state) in enumerate(zip(neighbors, states)):
                        new_context = contexts[i] if isinstance(contexts, list) and i < len(contexts) else None
                        new_tags = tags[i] if isinstance(tags, list) and i < len(tags) else None
                        changed = {}
                        if isinstance(new_context, str) and new_context != state.get("context"):
                            changed["context"] = new_context
                        if isinstance(new_tags, list) and _strings(new_tags) != state.get("tags"):
                            changed["tags"] = _strings(new_tags)
                        if changed:
                            old = {key: state.get(key) for key in changed}
                            history = [*state.get("evolution_history", []), {"time": seconds, "before": old}]
                            store.set_state(neighbor.id, {**state, **changed, "evolution_history": history})
        metadata = {**(metadata or {}), "kind": "note"}
        memory_id = super().ingest(
            store, text_or_messages, session_id=session_id, timestamp=timestamp, user_id=user_id, metadata=metadata
        )
        store.set_state(memory_id, {**store.get_state(memory_id), **note})
        return memory_id

    def retrieve(self, store: MemoryStore, query: str, k: int, *, now, as_of=None, filter=None) -> list[MemoryRecord]:
        """The top-``k`` notes, then up to ``k`` notes they link to (``metadata["is_neighbor"]``); each returned
        note's ``retrieval_count`` grows by one."""
        hits = super().retrieve(store, query, k, now=now, as_of=as_of, filter=filter)
        seen = {h.id for h in hits}
        linked = []
        for hit in hits:
            for link in store.get_state(hit.id).get("links", []):
                if link in seen or len(linked) >= k:
                    continue
                record = store.get(link, as_of=as_of)
                if record is not None and record.status == "active":
                    linked.append(dataclasses.replace(record, metadata={**record.metadata, "is_neighbor": True}))
                    seen.add(link)
        out = hits + linked
        for record in out:
            state = store.get_state(record.id)
            if "retrieval_count" in state:
                store.set_state(record.id, {**state, "retrieval_count": state["retrieval_count"] + 1})
        return out
