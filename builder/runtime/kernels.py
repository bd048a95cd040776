"""ctypes binding of the CUDA kernels in plugins/ (libpdrop_plugins.so, C ABI in pdrop_plugins.h).

Tensors go in as raw device pointers, enqueued on the current torch stream; the kernels never
synchronise. SIGNATURES is checked against the C header by the tests.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..format.errors import EngineError

ABI_VERSION = 1
_p, _i32, _i64, _f32, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_size_t

# name -> (restype, argtypes), in the header's order
SIGNATURES = {
    "pdrop_abi_version": (_i32, []),
    "pdrop_status_string": (ctypes.c_char_p, [_i32]),
    "pdrop_score_workspace_size": (_size, [_i32, _i32, _i32, _i64]),
    "pdrop_score": (_i32, [_p, _p, _p, _p, _p, _p, _i32, _i32, _i32, _i32, _i32, _i64, _f32, _i32, _p, _p, _p]),
    "pdrop_select": (_i32, [_p, _p, _p, _p, _p, _i32, _p, _p]),
    "pdrop_compact": (_i32, [_p, _p, _p, _p, _p, _p, _p, _i32, _i64, _i64, _p, _p]),
}
ABI_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64, device=device).cumsum(0)


class Kernels:
    """The three stage-boundary kernels, on ragged batches packed along the first dimension."""

    def __init__(self, path: str | Path):
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise EngineError(f"cannot load the plugin library {path}: {e}") from None
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        if self.lib.pdrop_abi_version() != ABI_VERSION:
            raise EngineError(f"plugin library {path} has ABI {self.lib.pdrop_abi_version()}, expected {ABI_VERSION}")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: {self.lib.pdrop_status_string(status).decode()}")

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
