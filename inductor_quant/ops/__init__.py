"""Definitions of the ``torch.ops.inductor_quant`` operators: schema, fake impl, CPU kernel.

Importing this package registers every op. Device kernels (Triton, in ``inductor_quant.kernels``)
are registered for cuda/xpu by the ``triton_*`` modules; ``optim_functional`` and ``matmul_8bit``
define the functional ops the compiled paths use, ``autograd`` the QLoRA backward.
"""

from . import blockwise, fourbit, gemm, optim  # noqa: F401  (registration side effects)
from . import optim_functional  # noqa: F401  (functional optimizer steps for compiled graphs)
from . import matmul_8bit  # noqa: F401  (linear_8bit: the 8-bit weight matmul of the dequant+linear pass)
from . import autograd  # noqa: F401  (QLoRA backward of gemm_4bit)
from . import triton_gemm  # noqa: F401  (Triton GPU kernels of gemv_4bit / gemm_4bit)
from . import triton_quant  # noqa: F401  (Triton GPU kernels of the quantize / dequantize ops)
from . import triton_optim  # noqa: F401  (Triton GPU kernels of the optimizer updates)
