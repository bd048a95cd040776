"""ctypes binding of the CUDA kernels in plugins/ (libpdrop_plugins.so, C ABI in pdrop_plugins.h)
and of the CPU decode attention (libpdrop_cpu*.so, pdrop_cpu.h).

Tensors go in as raw device pointers, enqueued on the current torch stream; the kernels never
synchronise. SIGNATURES is checked against the C header by the tests.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..format.errors import EngineError

ABI_VERSION = 3
CPU_ABI_VERSION = 1
_p, _i32, _i64, _f32, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_size_t

# name -> (restype, argtypes), in the header's order
SIGNATURES = {
    "pdrop_abi_version": (_i32, []),
    "pdrop_status_string": (ctypes.c_char_p, [_i32]),
    "pdrop_last_error_string": (ctypes.c_char_p, []),
    "pdrop_score_workspace_size": (_size, [_i32, _i32, _i32, _i64]),
    "pdrop_score": (_i32, [_p, _p, _p, _p, _p, _p, _i32, _i32, _i32, _i32, _i32, _i64, _f32, _i32, _p, _p, _p]),
    "pdrop_select": (_i32, [_p, _p, _p, _p, _p, _i32, _p, _p]),
    "pdrop_compact": (_i32, [_p, _p, _p, _p, _p, _p, _p, _i32, _i64, _i64, _p, _p]),
    "pdrop_paged_decode_workspace_size": (_size, [_i32, _i32, _i32, _i64, _i32]),
    "pdrop_paged_decode": (_i32, [_p, _p, _p, _p, _i64, _p, _i32, _i32, _i32, _i32, _i32, _f32, _i32, _p, _p, _p]),
}
CPU_SIGNATURES = {
    "pdrop_cpu_abi_version": (_i32, []),
    "pdrop_cpu_paged_decode": (_i32, [_p, _p, _p, _p, _i64, _p, _i32, _i32, _i32, _i32, _i32, _f32, _i32, _i32, _p]),
    "pdrop_cpu_linear": (_i32, [_p, _p, _i32, _i64, _i32, _i32, _i32, _p]),
}
ABI_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
STATUS_CUDA_ERROR = 2  # PDROP_ERROR_CUDA


def _offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64, device=device).cumsum(0)


# Loaded libraries by path, for the custom ops below: a compiled decode step (torch.compile) calls the
# kernels as ops of its graph, opaque to the compiler, where a plain ctypes call would break the graph.
_LOADED: dict[str, "CpuKernels | Kernels"] = {}


@torch.library.custom_op("pdrop::linear", mutates_args=())
def _linear_op(library: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _LOADED[library]._linear(x, weight)


@_linear_op.register_fake
def _(library: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("pdrop::paged_decode", mutates_args=())
def _paged_decode_op(library: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                     num_keys: torch.Tensor) -> torch.Tensor:
    return _LOADED[library]._paged_decode(q, k_pool, v_pool, tables, num_keys)


@_paged_decode_op.register_fake
def _(library: str, q: torch.Tensor, *_) -> torch.Tensor:
    return torch.empty_like(q)


def _open(path: str | Path, signatures: dict, abi: str, version: int) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise EngineError(f"cannot load the plugin library {path}: {e}") from None
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if getattr(lib, abi)() != version:
        raise EngineError(f"plugin library {path} has ABI {getattr(lib, abi)()}, expected {version}")
    return lib


def _paged_decode_args(q: torch.Tensor, k_pool: torch.Tensor, tables: torch.Tensor, num_keys: torch.Tensor) -> list:
    """The arguments pdrop_paged_decode and pdrop_cpu_paged_decode share, after the pools."""
    batch, heads, dim = q.shape
    return [tables.data_ptr(), tables.stride(0), num_keys.data_ptr(), batch, heads, k_pool.shape[2], dim,
            k_pool.shape[1], dim ** -0.5, ABI_DTYPES[q.dtype]]


def _check_paged_decode(q, k_pool, v_pool, tables, num_keys) -> None:
    if not (q.is_contiguous() and k_pool.is_contiguous() and v_pool.is_contiguous() and tables.stride(1) == 1
            and num_keys.is_contiguous() and tables.dtype == num_keys.dtype == torch.int64):
        raise ValueError("paged_decode: contiguous q and pools, int64 row-major tables and num_keys expected")


class _DecodeKernels:
    """What the CPU and CUDA libraries share: the paged decode attention, callable eagerly or from
    inside torch.compile (as a custom op)."""

    def __init__(self, path: str | Path, signatures: dict, abi: str, version: int):
        self.path = str(path)
        self.lib = _open(path, signatures, abi, version)
        _LOADED[self.path] = self

    def paged_decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                     num_keys: torch.Tensor) -> torch.Tensor:
        """q (B, H, D) one token per row; pools (blocks, block_size, KV, D); tables (B, W) block ids;
        num_keys (B,) keys of each row -> (B, H, D) attention output, read from the blocks in place."""
        if torch.compiler.is_compiling():
            return _paged_decode_op(self.path, q, k_pool, v_pool, tables, num_keys)
        return self._paged_decode(q, k_pool, v_pool, tables, num_keys)


class CpuKernels(_DecodeKernels):
    """The CPU kernels of a decode step (pdrop_cpu.h), over host tensors, on torch's intra-op thread count."""

    dtypes = (torch.float32, torch.bfloat16)

    def __init__(self, path: str | Path):
        super().__init__(path, CPU_SIGNATURES, "pdrop_cpu_abi_version", CPU_ABI_VERSION)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (rows, in) . weight (out, in)^T -> (rows, out), both of one dtype, contiguous."""
        if torch.compiler.is_compiling():
            return _linear_op(self.path, x, weight)
        return self._linear(x, weight)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
        ok = x.is_contiguous() and weight.is_contiguous() and x.shape[1] == weight.shape[1] and x.dtype == weight.dtype
        if not ok or self.lib.pdrop_cpu_linear(x.data_ptr(), weight.data_ptr(), x.shape[0], weight.shape[0], x.shape[1],
                                               ABI_DTYPES[x.dtype], torch.get_num_threads(), y.data_ptr()) != 0:
            raise ValueError(f"pdrop_cpu_linear: invalid argument (x {tuple(x.shape)} {x.dtype}, weight "
                             f"{tuple(weight.shape)} {weight.dtype})")
        return y

    def _paged_decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                      num_keys: torch.Tensor) -> torch.Tensor:
        _check_paged_decode(q, k_pool, v_pool, tables, num_keys)
        out = torch.empty_like(q)
        status = self.lib.pdrop_cpu_paged_decode(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                                                 *_paged_decode_args(q, k_pool, tables, num_keys),
                                                 torch.get_num_threads(), out.data_ptr())
        if status != 0:
            raise ValueError(f"pdrop_cpu_paged_decode: invalid argument (shapes {tuple(q.shape)}, "
                             f"{tuple(k_pool.shape)}, {tuple(tables.shape)}, dtype {q.dtype})")
        return out


class Kernels(_DecodeKernels):
    """The three stage-boundary kernels, on ragged batches packed along the first dimension, and the
    paged decode attention."""

    def __init__(self, path: str | Path):
        super().__init__(path, SIGNATURES, "pdrop_abi_version", ABI_VERSION)

    def _check(self, status: int, what: str) -> None:
        if status != 0:  # for a CUDA error, the library recorded which one
            message = (self.lib.pdrop_last_error_string() if status == STATUS_CUDA_ERROR
                       else self.lib.pdrop_status_string(status))
            raise RuntimeError(f"{what} failed: {message.decode()}")

    @staticmethod
    def _stream(t: torch.Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream

    def score(self, q: torch.Tensor, k: torch.Tensor, seq_lens: list[int], image_start: list[int],
              image_len: list[int]) -> torch.Tensor:
        """q: (B, H, D) last-token queries; k: (sum L, KV, D) packed keys, both RoPE'd.
        Returns the packed (sum image_len,) head-mean softmax scores of the image tokens, fp32."""
        dev, (batch, heads, dim), kv = q.device, q.shape, k.shape[1]
        q, k = q.contiguous(), k.contiguous()
        seq_off, img_off = _offsets(seq_lens, dev), _offsets(image_len, dev)
        start = torch.tensor(image_start, dtype=torch.int32, device=dev)
        length = torch.tensor(image_len, dtype=torch.int32, device=dev)
        total = sum(image_len)
        scores = torch.empty(total, dtype=torch.float32, device=dev)
        if total == 0:  # nothing to score (and an empty tensor's data pointer is null)
            return scores
        ws = torch.empty(self.lib.pdrop_score_workspace_size(batch, heads, max(seq_lens), total),
                         dtype=torch.uint8, device=dev)
        self._check(self.lib.pdrop_score(
            q.data_ptr(), k.data_ptr(), seq_off.data_ptr(), start.data_ptr(), length.data_ptr(), img_off.data_ptr(),
            batch, heads, kv, dim, max(seq_lens), total, dim ** -0.5, ABI_DTYPES[q.dtype], scores.data_ptr(),
            ws.data_ptr(), self._stream(q)), "pdrop_score")
        return scores

    def select(self, scores: torch.Tensor, image_len: list[int], n_keep: list[int]) -> torch.Tensor:
        """Packed ascending indices of each sequence's top n_keep[b] scores (ties to the lower index)."""
        dev = scores.device
        n_keep = [min(k, n) for k, n in zip(n_keep, image_len)]
        kept = torch.empty(sum(n_keep), dtype=torch.int32, device=dev)
        if not kept.numel():
            return kept
        # every argument tensor stays referenced until the launch: the allocator would reuse it
        img_off, keep_off = _offsets(image_len, dev), _offsets(n_keep, dev)
        length = torch.tensor(image_len, dtype=torch.int32, device=dev)
        count = torch.tensor(n_keep, dtype=torch.int32, device=dev)
        self._check(self.lib.pdrop_select(
            scores.data_ptr(), img_off.data_ptr(), length.data_ptr(), count.data_ptr(), keep_off.data_ptr(),
            len(image_len), kept.data_ptr(), self._stream(scores)), "pdrop_select")
        return kept

    def _paged_decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                      num_keys: torch.Tensor) -> torch.Tensor:
        # on device tensors; the launch depends only on the shapes, so a CUDA graph replays it with
        # new tables and lengths
        _check_paged_decode(q, k_pool, v_pool, tables, num_keys)
        out = torch.empty_like(q)
        batch, heads, dim = q.shape
        size = self.lib.pdrop_paged_decode_workspace_size(batch, heads, dim, tables.stride(0), k_pool.shape[1])
        ws = torch.empty(size, dtype=torch.uint8, device=q.device)
        self._check(self.lib.pdrop_paged_decode(
            q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), *_paged_decode_args(q, k_pool, tables, num_keys),
            out.data_ptr(), ws.data_ptr(), self._stream(q)), "pdrop_paged_decode")
        return out

    def compact(self, src: torch.Tensor, seq_lens: list[int], image_start: list[int], image_len: list[int],
                kept: torch.Tensor, n_keep: list[int]) -> torch.Tensor:
        """Rows of the packed src (sum L, ...) with each sequence's dropped image rows removed."""
        dev = src.device
        src = src.contiguous()
        n_keep = [min(k, n) for k, n in zip(n_keep, image_len)]
        new_lens = [n_seq - n_img + k for n_seq, n_img, k in zip(seq_lens, image_len, n_keep)]
        dst = torch.empty((sum(new_lens), *src.shape[1:]), dtype=src.dtype, device=dev)
        row_bytes = src[0].numel() * src.element_size() if src.shape[0] else 1
        seq_off, keep_off, dst_off = _offsets(seq_lens, dev), _offsets(n_keep, dev), _offsets(new_lens, dev)
        start = torch.tensor(image_start, dtype=torch.int32, device=dev)
        length = torch.tensor(image_len, dtype=torch.int32, device=dev)
        if not kept.numel():  # every image row dropped: the kernel never reads `kept`, but nulls are refused
            kept = torch.zeros(1, dtype=torch.int32, device=dev)
        if not dst.numel():
            return dst
        self._check(self.lib.pdrop_compact(
            src.data_ptr(), seq_off.data_ptr(), start.data_ptr(), length.data_ptr(), kept.data_ptr(),
            keep_off.data_ptr(), dst_off.data_ptr(), len(seq_lens), dst.shape[0], row_bytes, dst.data_ptr(),
            self._stream(src)), "pdrop_compact")
        return dst
