"""CUDA-graph capture, emulated on the CPU for the tests (CI has no GPU): record every op one call
dispatches, with its arguments and outputs, then replay the list as a graph would.

A graph replays the kernels it recorded with their recorded scalar arguments, reading whatever its
input tensors hold by then. So a step is capturable only if no op syncs with the host or draws
random numbers, no tensor is made from Python data inside it, and every tensor it reads is its
input, a weight, the KV pool or made inside it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import builder

PROJECT = str(Path(builder.__file__).parent)

# aten names, in-place variants' trailing "_" dropped; .item() is aten.item in inference mode, else
# aten._local_scalar_dense
SYNCS = {"item", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "unique_dim_consecutive", "repeat_interleave", "bincount", "equal", "is_nonzero"}
RANDOM = {"multinomial", "bernoulli", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
          "randperm", "normal", "uniform", "exponential", "geometric", "cauchy", "log_normal", "random", "poisson",
          "native_dropout"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}  # torch.tensor(data) inside the call: a constant baked into a graph


@dataclass
class Op:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: object
    where: str  # the innermost project frames that called it

    @property
    def name(self) -> str:
        return self.func._opname.rstrip("_")

    def hazard(self) -> str | None:
        """Why a CUDA graph could not capture this op, or None."""
        if self.name in SYNCS:
            return "host sync"
        if self.name in RANDOM:
            return "random numbers"
        if self.name in HOST_DATA:
            return "a tensor from Python data"
        ins = [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(self.out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in ins) and any(t.device.type != "cpu" for t in outs):
            return "a host-to-device copy"
        return None

    def __str__(self) -> str:
        return f"{self.func} at {self.where}"


def _where(depth: int = 3) -> str:
    frame, found = sys._getframe(2), []
    while frame is not None and len(found) < depth:
        if frame.f_code.co_filename.startswith(PROJECT):
            found.append(f"{Path(frame.f_code.co_filename).relative_to(Path(PROJECT).parent)}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(found) or "outside the project"


class Recorder(TorchDispatchMode):
    """Every op dispatched while active, in order. Arguments and outputs are kept alive, so that a
    tensor's id names one tensor for the whole record. A custom op (the kernels) is one op: the mode
    is off while it runs."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(Op(func, args, kwargs, out, _where()))
        return out

    def hazards(self) -> list[str]:
        return [f"{op.hazard()}: {op}" for op in self.ops if op.hazard()]

    def foreign(self, inputs: list[torch.Tensor]) -> list[str]:
        """Ops reading a tensor that is neither made by an earlier op nor shares storage with `inputs`
        (a graph would replay it as it was at capture)."""
        allowed = {t.untyped_storage().data_ptr() for t in inputs}
        made: set[int] = set()
        found = []
        for op in self.ops:
            for t in tree_leaves((op.args, op.kwargs)):
                if (isinstance(t, torch.Tensor) and id(t) not in made
                        and t.untyped_storage().data_ptr() not in allowed):
                    found.append(f"{tuple(t.shape)} {t.dtype}: {op}")
            made.update(id(t) for t in tree_leaves(op.out) if isinstance(t, torch.Tensor))
        return found

    def replay(self) -> dict[int, torch.Tensor]:
        """Run the recorded ops again, as a graph replays: tensors made by an earlier op replaced by
        its replayed output, every other tensor read as it is now, every other argument as recorded.
        Returns the replayed outputs by the id of the recorded ones."""
        now: dict[int, torch.Tensor] = {}

        def swap(x):
            return now.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for op in self.ops:
            out = op.func(*tree_map(swap, op.args), **tree_map(swap, op.kwargs))
            for old, new in zip(tree_leaves(op.out), tree_leaves(out)):
                if isinstance(old, torch.Tensor):
                    now[id(old)] = new
        return now
