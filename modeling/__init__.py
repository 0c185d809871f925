"""hf_longmem's memory architectures (installed as ``hf_longmem.modeling``).

Importing this package registers every architecture with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``
(``import hf_longmem`` does it): Titans (``titans``), MoM (``mom_gdn``), LongMem (``longmem``), HMT (``hmt``), CMT
(``cmt``) and LongGen (``longgen``). ``remote_code`` and ``backbone`` hold the plumbing they share.
"""

from hf_longmem.modeling import cmt, hmt, longgen, longmem, mom, titans  # noqa: F401  (registration on import)
