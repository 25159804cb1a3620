from quant.transforms import kronecker  # noqa: F401  (registers "kronecker")
from quant.transforms import hadamard  # noqa: F401  (registers "hadamard")
