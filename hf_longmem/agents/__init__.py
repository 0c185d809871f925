"""Long-term memory for chat and agents: a durable bi-temporal store, embedders, policies, an agent loop, LongMemEval.

Everything runs offline: SQLite (standard library) for records, safetensors for vectors, JSON for the rest.
"""

from .embedders import BM25Embedder, Embedder, HashingEmbedder, LMEmbedder, top_k
from .records import MemoryRecord
from .store import MemoryStore

__all__ = ["BM25Embedder", "Embedder", "HashingEmbedder", "LMEmbedder", "MemoryRecord", "MemoryStore", "top_k"]
