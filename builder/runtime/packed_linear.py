"""Linear layers with their weights packed once for the CPU's GEMM library (oneDNN), as inductor's
weight freezing does for a compiled model on CPU.

A decode step is a few rows times every weight, and plain `F.linear` (MKL sgemm on an (out, in)
weight) handles few rows poorly, worst at batch 8; with weights reordered for oneDNN's blocked
kernels a decode step took 16-28% less time here (scripts/bench_decode.py, batch 1 and 8), and a
prefill's GEMMs keep their speed. The packed weight replaces the plain one (no second copy is kept).
"""
from __future__ import annotations

import torch
from torch import nn

_HINT_ROWS = 8  # the row count oneDNN picks its blocking for: decode batches; prefill is no slower


def packable(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN packs float32 on any x86 CPU, bfloat16 only where the CPU computes it natively."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _HINT_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()

    @property
    def weight(self) -> torch.Tensor:
        """The plain (out, in) weight, unpacked on demand: for the few readers that slice it (the
        pyramid's ranking projects only the last token's query and the keys)."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # an nn.Linear's entries, so that exports and comparisons see the module they always saw
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: nn.Module) -> nn.Module:
    """Every nn.Linear under `module` replaced, in place, by a PackedLinear where its dtype and device
    allow packing; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and packable(child.weight.dtype, child.weight.device):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module
