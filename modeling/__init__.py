"""hf_longmem's memory architectures (installed as ``hf_longmem.modeling``).

Each architecture is a package of this folder that registers itself with :func:`register_architecture` in its
``__init__`` (``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``, and :func:`available_architectures`).
Importing this package imports every architecture package (``import hf_longmem`` does it): Titans (``titans``), MoM
(``mom_gdn``), LongMem (``longmem``), HMT (``hmt``), CMT (``cmt``), LongGen (``longgen``) and HCAM (``hcam``) today.
The modules ``remote_code``, ``backbone``, ``causal_lm`` and ``padding`` hold the plumbing they share.
"""

from hf_longmem.modeling.remote_code import (
    ArchitectureSpec,
    available_architectures,
    get_architecture_spec,
    register_architecture,
)
from hf_longmem.registration import import_submodules

import_submodules(__name__, __path__, packages_only=True)  # each architecture package registers itself

__all__ = ["ArchitectureSpec", "available_architectures", "get_architecture_spec", "register_architecture"]
