"""Long-term memory for chat and agents: a durable bi-temporal store, embedders, policies, an agent loop, LongMemEval.

Everything runs offline: SQLite (standard library) for records, safetensors for vectors, JSON for the rest.

- :class:`MemoryStore` — add/search/get/get_all/update (supersede)/delete/restore/history, ``as_of`` queries.
- :class:`BM25Embedder` (default), :class:`HashingEmbedder`, :class:`LMEmbedder` — texts to vectors, scored by top-k.
- :class:`TransformersLLM` / :class:`FunctionLLM` — the one ``generate(prompt, max_new_tokens)`` interface.
- Policies: :class:`RetrievalPolicy` (plain; supersede or ADD-only), :class:`MemoryBankPolicy`, :class:`SCMPolicy`,
  :class:`AMemPolicy`, :class:`TiMPolicy`, :class:`RMMPolicy`; working memory for multi-step loops: :class:`HiAgentPolicy`, :class:`TMEPolicy`.
- :class:`MemoryAgent` — ``chat(message, now=...)``: retrieve, prompt under a token budget, generate.
- :class:`KVMemory` — memories as model state: KV states encoded once, stored, re-rotated and spliced into the cache.
- LongMemEval: :func:`load_longmemeval`, :func:`synthetic_chat_history`, metrics in :mod:`.metrics`,
  :func:`hf_longmem.agents.evaluate.evaluate_agent` (``python -m hf_longmem.agents.evaluate``).
"""

from .agent import AgentReply, MemoryAgent
from .amem import AMemPolicy
from .embedders import BM25Embedder, Embedder, HashingEmbedder, LMEmbedder, top_k
from .hiagent import HiAgentPolicy
from .kv import KVMemory, KVState
from .llm import LLM, FunctionLLM, TransformersLLM
from .longmemeval import ingest_haystack, is_abstention, load_longmemeval
from .memorybank import MemoryBankPolicy, retention
from .policy import MemoryPolicy, RetrievalPolicy
from .records import MemoryRecord
from .rmm import CitationReranker, RMMPolicy
from .scm import SCMPolicy
from .store import MemoryStore
from .synthetic import fact_subject, synthetic_chat_history
from .tim import TiMPolicy
from .tme import TMEPolicy

__all__ = [
    "LLM",
    "AMemPolicy",
    "AgentReply",
    "BM25Embedder",
    "CitationReranker",
    "Embedder",
    "FunctionLLM",
    "HashingEmbedder",
    "HiAgentPolicy",
    "KVMemory",
    "KVState",
    "LMEmbedder",
    "MemoryAgent",
    "MemoryBankPolicy",
    "MemoryPolicy",
    "MemoryRecord",
    "MemoryStore",
    "RMMPolicy",
    "RetrievalPolicy",
    "SCMPolicy",
    "TMEPolicy",
    "TiMPolicy",
    "TransformersLLM",
    "fact_subject",
    "ingest_haystack",
    "is_abstention",
    "load_longmemeval",
    "retention",
    "synthetic_chat_history",
    "top_k",
]
