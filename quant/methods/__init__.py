"""Built-in quantization methods; each module registers itself with ``@register_method``."""

from quant.methods import rtn  # noqa: F401
from quant.methods import gptq  # noqa: F401
from quant.methods import smoothquant  # noqa: F401
from quant.methods import osplus  # noqa: F401
from quant.methods import flatquant  # noqa: F401
from quant.methods import quarot  # noqa: F401
from quant.methods import ostquant  # noqa: F401
