"""Linear layers whose decode-sized inputs run in the engine's CPU kernel (pdrop_cpu_linear).

A decode step is a few rows times every weight, so it is bound by reading the weights. PyTorch's
CPU libraries read them at ~13 GB/s on this project's machine for 1-8 rows (MKL's sgemv, and oneDNN
on weights packed for it), where pdrop_cpu_linear, one pass over the weight for all rows, reads at
~16-20 GB/s. Prefill's many rows stay with F.linear (a GEMM), as fast on the plain weight as on a
packed one, so the weight is kept once, as loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # the decode batch sizes measured; more rows go to the GEMM


class KernelLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) with `kernels`, a network.kernels.CpuKernels."""

    kernels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or self.bias is not None or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = self.kernels.linear(x.reshape(rows, -1).contiguous(), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def use_kernel_linears(module: nn.Module, kernels) -> nn.Module:
    """Every bias-free nn.Linear under `module` becomes a KernelLinear over `kernels`, in place: its
    class changes and nothing is copied. Returns `module`."""
    for m in module.modules():
        if type(m) is nn.Linear and m.bias is None and m.weight.dtype in kernels.dtypes:
            m.__class__, m.kernels = KernelLinear, kernels
    return module
