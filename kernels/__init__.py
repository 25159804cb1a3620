"""qaas CUDA kernels with pure-torch reference implementations.

Every kernel is a ``torch.library`` custom op in the ``qaas`` namespace (``torch.ops.qaas.*``): its
default kernel is the pure-torch reference (runs on the CPU, and anywhere), and when the compiled
extension is present (``python -m kernels.build`` on a CUDA machine) its CUDA kernel is registered
for CUDA tensors. ``kernels.dispatch`` is what ``QuantLinear`` calls on CUDA.
"""

from kernels import ops
from kernels._ext import available, unavailable_reason

__all__ = ["available", "ops", "unavailable_reason"]
