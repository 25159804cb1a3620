"""Built-in quantization methods; each module registers itself with ``@register_method``."""

from quant.methods import rtn  # noqa: F401
