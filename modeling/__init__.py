from hf_longmem.modeling import cmt as _cmt  # noqa: F401  (registers model_type "cmt" with the Auto classes)
from hf_longmem.modeling import hmt  # noqa: F401  (registers model_type "hmt" with the Auto classes)
from hf_longmem.modeling import mom as _mom  # noqa: F401  (registers model_type "mom_gdn" with the Auto classes)
from hf_longmem.modeling import longmem  # noqa: F401  (registers model_type "longmem")
