"""Attention kernels for compressed KV caches: Triton on CUDA, torch reference elsewhere.

Each op lives in its own folder with ``reference.py`` (torch, the spec), ``triton.py`` (kernels and launcher) and a
public function that checks its arguments and dispatches (``backend="torch"|"triton"|None``):

* :func:`decode_attention` — flash-decoding (split-K) attention of a few queries over a cache, GQA-aware, with LSE;
* :func:`merge_attention` — exact merge of attention over two disjoint slot sets by their LSE;
* :func:`channel_attention` — attention over ThinK's channel-pruned keys (plus an optional full-width tail);
* :func:`attention_column_scores` — attention each key receives (H2O/SnapKV scores) without a ``[q, n]`` matrix;
* :func:`sparse_attention` — LongGen's sparse attention (sinks + window, or block-sparse strided), forward and backward.

:func:`set_kernel_backend` chooses the kernels of one cache's layers (per instance, nothing global).
"""

from hf_longmem.kernels.attention_scores import attention_column_scores
from hf_longmem.kernels.channel_attention import channel_attention
from hf_longmem.kernels.decode_attention import decode_attention, merge_attention
from hf_longmem.kernels.sparse_attention import sparse_attention
from hf_longmem.kernels.utils import set_kernel_backend, triton_available

__all__ = [
    "attention_column_scores",
    "channel_attention",
    "decode_attention",
    "merge_attention",
    "set_kernel_backend",
    "sparse_attention",
    "triton_available",
]
