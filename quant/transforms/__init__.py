from quant.transforms import kronecker  # noqa: F401  (registers "kronecker")
