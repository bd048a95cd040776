// PyramidDrop kernels behind pdrop_plugins.h: score (attention of the last prompt token to the
// image tokens), select (top-k, ties to the lower index, ascending), compact (row gather) and the
// paged decode attention.
#include "pdrop_plugins.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdio>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace {

constexpr int kScoreThreads = 256;
constexpr int kSelectThreads = 512;
constexpr int kCopyThreads = 128;
constexpr int kMaxHeadDim = 256;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeChunk = 256;  // keys per block: split-K over a row's keys, as flash-decoding does
constexpr int kMaxGroup = 16;  // query heads per KV head

struct MaxOp {  // cub::Max is gone from CUDA 13's CCCL
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_float(float x, float* out) { *out = x; }
__device__ __forceinline__ void from_float(float x, __half* out) { *out = __float2half(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16* out) { *out = __float2bfloat16(x); }

// One block per (sequence, head): logits of the query against every key of the sequence (a warp
// per key, lanes over head_dim), then a softmax over all of them; the image keys' probabilities
// go to probs[h][image_offsets[b] + j].
template <typename T>
__global__ void score_heads(const T* q, const T* k, const int64_t* seq_offsets, const int32_t* image_start,
                            const int32_t* image_len, const int64_t* image_offsets, int num_heads, int num_kv_heads,
                            int head_dim, int max_seq_len, float scale, float* logits_ws, float* probs,
                            int64_t total_image) {
  const int b = blockIdx.x / num_heads, h = blockIdx.x % num_heads;
  const int kv = h / (num_heads / num_kv_heads);
  const int64_t first = seq_offsets[b];
  const int len = static_cast<int>(seq_offsets[b + 1] - first);
  float* logits = logits_ws + static_cast<int64_t>(blockIdx.x) * max_seq_len;

  __shared__ float qs[kMaxHeadDim];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = to_float(q[(static_cast<int64_t>(b) * num_heads + h) * head_dim + d]);
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float local_max = -FLT_MAX;
  for (int j = warp; j < len; j += warps) {
    const T* row = k + ((first + j) * num_kv_heads + kv) * head_dim;
    float dot = 0.f;
    for (int d = lane; d < head_dim; d += 32) dot += qs[d] * to_float(row[d]);
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) logits[j] = dot * scale;
    local_max = fmaxf(local_max, dot * scale);
  }
  using Reduce = cub::BlockReduce<float, kScoreThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float max_all, sum_all;
  const float m = Reduce(tmp).Reduce(local_max, MaxOp());
  if (threadIdx.x == 0) max_all = m;
  __syncthreads();

  float local_sum = 0.f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) local_sum += expf(logits[j] - max_all);
  const float s = Reduce(tmp).Sum(local_sum);
  if (threadIdx.x == 0) sum_all = s;
  __syncthreads();

  const int start = image_start[b], n = image_len[b];
  float* out = probs + static_cast<int64_t>(h) * total_image + image_offsets[b];
  for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = expf(logits[start + j] - max_all) / sum_all;
}

// scores[i] = sum over heads of probs[h][i], in head order, divided by the head count: the same
// deterministic order on every run.
__global__ void mean_heads(const float* probs, int num_heads, int64_t total_image, float* scores) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total_image) return;
  float acc = 0.f;
  for (int h = 0; h < num_heads; ++h) acc += probs[h * total_image + i];
  scores[i] = acc / num_heads;
}

// Order-preserving map of a float to an unsigned key: a larger float gives a larger key.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per sequence. Radix select (4 passes of 8 bits) finds the key T of the k-th highest
// score; then one ordered pass keeps every score above T and the first (by index) of those equal
// to T, writing indices in ascending order.
__global__ void select_topk(const float* scores, const int64_t* image_offsets, const int32_t* image_len,
                            const int32_t* keep, const int64_t* keep_offsets, int32_t* kept) {
  const int b = blockIdx.x;
  const int n = image_len[b];
  const int k = min(max(keep[b], 0), n);
  const float* s = scores + image_offsets[b];
  int32_t* out = kept + keep_offsets[b];
  if (k == 0) return;

  __shared__ int hist[256];
  __shared__ uint32_t prefix, mask;
  __shared__ int remaining;
  if (threadIdx.x == 0) {
    prefix = 0u;
    mask = 0u;
    remaining = k;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t key = order_key(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int digit = 255;
      while (hist[digit] < remaining) remaining -= hist[digit--];
      prefix |= static_cast<uint32_t>(digit) << shift;
      mask |= 0xffu << shift;
    }
    __syncthreads();
  }
  const uint32_t threshold = prefix;  // the k-th highest key; `remaining` of its ties are kept

  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int written, ties_seen;
  if (threadIdx.x == 0) written = ties_seen = 0;
  __syncthreads();
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const uint32_t key = i < n ? order_key(s[i]) : 0u;
    const int tie = i < n && key == threshold;
    int tie_rank, ties_total;
    Scan(scan_tmp).ExclusiveSum(tie, tie_rank, ties_total);
    __syncthreads();
    const int take = i < n && (key > threshold || (tie && ties_seen + tie_rank < remaining));
    int pos, taken;
    Scan(scan_tmp).ExclusiveSum(take, pos, taken);
    if (take) out[written + pos] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
      written += taken;
      ties_seen += ties_total;
    }
    __syncthreads();
  }
}

// One block per output row: find its sequence and source row, copy row_bytes (16 bytes at a time
// when everything is 16-byte aligned).
__global__ void compact_rows(const char* src, const int64_t* seq_offsets, const int32_t* image_start,
                             const int32_t* image_len, const int32_t* kept, const int64_t* keep_offsets,
                             const int64_t* dst_offsets, int batch, int64_t row_bytes, char* dst) {
  const int64_t row = blockIdx.x;
  int b = 0;
  while (b + 1 < batch && dst_offsets[b + 1] <= row) ++b;
  const int64_t r = row - dst_offsets[b];
  const int64_t start = image_start[b];
  const int64_t n_keep = keep_offsets[b + 1] - keep_offsets[b];
  int64_t from = r;
  if (r >= start + n_keep) {
    from = r - n_keep + image_len[b];
  } else if (r >= start) {
    from = start + kept[keep_offsets[b] + (r - start)];
  }
  const char* in = src + (seq_offsets[b] + from) * row_bytes;
  char* out = dst + row * row_bytes;
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (wide) {
    const int64_t chunks = row_bytes / 16;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
      reinterpret_cast<uint4*>(out)[c] = reinterpret_cast<const uint4*>(in)[c];
  } else {
    for (int64_t c = threadIdx.x; c < row_bytes; c += blockDim.x) out[c] = in[c];
  }
}

// One block per (chunk of keys, row, KV head), for the query heads sharing that KV head: logits (a
// warp per key, lanes over head_dim), the chunk's max and sum of exponentials, and the unnormalised
// output (a thread per (query head, dim), reading values coalesced). Blocks past a row's length
// leave an empty partial (sum 0), so the grid depends only on the table width: capturable.
// partial: [batch, num_heads, chunks, head_dim + 2] = max, sum, output.
template <typename T>
__global__ void paged_decode_chunks(const T* q, const T* k_pool, const T* v_pool, const int64_t* tables,
                                    int64_t table_stride, const int64_t* num_keys, int num_heads, int num_kv_heads,
                                    int head_dim, int block_size, float scale, float* partial) {
  const int chunk = blockIdx.x, b = blockIdx.y, kv = blockIdx.z, chunks = gridDim.x;
  const int group = num_heads / num_kv_heads;
  const int64_t begin = static_cast<int64_t>(chunk) * kDecodeChunk;
  const int count = static_cast<int>(max(int64_t{0}, min(num_keys[b] - begin, int64_t{kDecodeChunk})));
  const int64_t slot = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int64_t* table = tables + b * table_stride;

  __shared__ float qs[kMaxGroup * kMaxHeadDim];
  __shared__ float score[kMaxGroup * kDecodeChunk];
  __shared__ float stat[kMaxGroup][2];
  for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x)
    qs[i] = to_float(q[(static_cast<int64_t>(b) * num_heads + kv * group) * head_dim + i]) * scale;
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int j = warp; j < count; j += warps) {
    const int64_t t = begin + j;
    const T* key = k_pool + (table[t / block_size] * block_size + t % block_size) * slot + kv * head_dim;
    for (int g = 0; g < group; ++g) {
      float dot = 0.f;
      for (int d = lane; d < head_dim; d += 32) dot += qs[g * head_dim + d] * to_float(key[d]);
      for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (lane == 0) score[g * kDecodeChunk + j] = dot;
    }
  }
  __syncthreads();
  for (int g = warp; g < group; g += warps) {
    float mx = -INFINITY, sum = 0.f;
    for (int j = lane; j < count; j += 32) mx = fmaxf(mx, score[g * kDecodeChunk + j]);
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    for (int j = lane; j < count; j += 32) {
      const float e = expf(score[g * kDecodeChunk + j] - mx);
      score[g * kDecodeChunk + j] = e;
      sum += e;
    }
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) stat[g][0] = mx, stat[g][1] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
    const int g = i / head_dim, d = i % head_dim;
    float acc = 0.f;
    for (int j = 0; j < count; ++j) {
      const int64_t t = begin + j;
      acc += score[g * kDecodeChunk + j] *
             to_float(v_pool[(table[t / block_size] * block_size + t % block_size) * slot + kv * head_dim + d]);
    }
    float* out = partial + ((static_cast<int64_t>(b) * num_heads + kv * group + g) * chunks + chunk) * (head_dim + 2);
    out[2 + d] = acc;
    if (d == 0) out[0] = stat[g][0], out[1] = stat[g][1];
  }
}

// One block per (row, query head): the chunks' partials merged, rescaled to the overall max.
template <typename T>
__global__ void paged_decode_merge(const float* partial, int chunks, int head_dim, T* out) {
  const float* p = partial + static_cast<int64_t>(blockIdx.x) * chunks * (head_dim + 2);
  float mx = -INFINITY;
  for (int c = 0; c < chunks; ++c) mx = fmaxf(mx, p[c * (head_dim + 2)]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float y = 0.f, sum = 0.f;
    for (int c = 0; c < chunks; ++c) {
      const float* pc = p + c * (head_dim + 2);
      if (pc[1] > 0.f) {
        const float w = expf(pc[0] - mx);
        y += w * pc[2 + d];
        sum += w * pc[1];
      }
    }
    from_float(sum > 0.f ? y / sum : 0.f, out + static_cast<int64_t>(blockIdx.x) * head_dim + d);
  }
}

template <typename T>
void launch_paged_decode(const void* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                         int64_t table_stride, const int64_t* num_keys, int batch, int num_heads, int num_kv_heads,
                         int head_dim, int block_size, float scale, void* out, float* partial, int chunks,
                         cudaStream_t stream) {
  paged_decode_chunks<T><<<dim3(chunks, batch, num_kv_heads), kDecodeThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k_pool), static_cast<const T*>(v_pool), tables, table_stride,
      num_keys, num_heads, num_kv_heads, head_dim, block_size, scale, partial);
  paged_decode_merge<T><<<batch * num_heads, kDecodeThreads, 0, stream>>>(partial, chunks, head_dim,
                                                                          static_cast<T*>(out));
}

int decode_chunks(int64_t table_stride, int block_size) {
  return static_cast<int>((table_stride * block_size + kDecodeChunk - 1) / kDecodeChunk);
}

// Which CUDA error the last PDROP_ERROR_CUDA of this thread was: the status alone cannot say, and a
// thread-local keeps concurrent callers' messages apart.
thread_local char last_error[256] = "no CUDA error";

int launched() {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return PDROP_SUCCESS;
  snprintf(last_error, sizeof(last_error), "CUDA error %s: %s", cudaGetErrorName(error), cudaGetErrorString(error));
  return PDROP_ERROR_CUDA;
}

}  // namespace

extern "C" {

int pdrop_abi_version(void) { return PDROP_ABI_VERSION; }

const char* pdrop_status_string(int status) {
  switch (status) {
    case PDROP_SUCCESS: return "success";
    case PDROP_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case PDROP_ERROR_CUDA: return "CUDA error";
    default: return "unknown status";
  }
}

const char* pdrop_last_error_string(void) { return last_error; }

size_t pdrop_score_workspace_size(int batch, int num_heads, int max_seq_len, int64_t total_image_tokens) {
  if (batch <= 0 || num_heads <= 0 || max_seq_len <= 0 || total_image_tokens < 0) return 0;
  const size_t logits = static_cast<size_t>(batch) * num_heads * max_seq_len;
  const size_t probs = static_cast<size_t>(num_heads) * total_image_tokens;
  return (logits + probs) * sizeof(float);
}

int pdrop_score(const void* q, const void* k, const int64_t* seq_offsets, const int32_t* image_start,
                const int32_t* image_len, const int64_t* image_offsets, int batch, int num_heads, int num_kv_heads,
                int head_dim, int max_seq_len, int64_t total_image, float scale, int dtype, float* scores,
                void* workspace, cudaStream_t stream) {
  if (!q || !k || !seq_offsets || !image_start || !image_len || !image_offsets || !scores || !workspace ||
      batch <= 0 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 ||
      head_dim > kMaxHeadDim || max_seq_len <= 0 || total_image < 0)
    return PDROP_ERROR_INVALID_ARGUMENT;
  if (total_image == 0) return PDROP_SUCCESS;
  // workspace: the logits of every (sequence, head), then the image probabilities of every head

  float* logits = static_cast<float*>(workspace);
  float* probs = logits + static_cast<int64_t>(batch) * num_heads * max_seq_len;
  const dim3 grid(batch * num_heads);
  switch (dtype) {
    case PDROP_FLOAT32:
      score_heads<float><<<grid, kScoreThreads, 0, stream>>>(
          static_cast<const float*>(q), static_cast<const float*>(k), seq_offsets, image_start, image_len,
          image_offsets, num_heads, num_kv_heads, head_dim, max_seq_len, scale, logits, probs, total_image);
      break;
    case PDROP_FLOAT16:
      score_heads<__half><<<grid, kScoreThreads, 0, stream>>>(
          static_cast<const __half*>(q), static_cast<const __half*>(k), seq_offsets, image_start, image_len,
          image_offsets, num_heads, num_kv_heads, head_dim, max_seq_len, scale, logits, probs, total_image);
      break;
    case PDROP_BFLOAT16:
      score_heads<__nv_bfloat16><<<grid, kScoreThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), seq_offsets, image_start,
          image_len, image_offsets, num_heads, num_kv_heads, head_dim, max_seq_len, scale, logits, probs,
          total_image);
      break;
    default:
      return PDROP_ERROR_INVALID_ARGUMENT;
  }
  mean_heads<<<static_cast<unsigned>((total_image + 255) / 256), 256, 0, stream>>>(probs, num_heads, total_image,
                                                                                    scores);
  return launched();
}

int pdrop_select(const float* scores, const int64_t* image_offsets, const int32_t* image_len, const int32_t* keep,
                 const int64_t* keep_offsets, int batch, int32_t* kept, cudaStream_t stream) {
  if (!scores || !image_offsets || !image_len || !keep || !keep_offsets || !kept || batch <= 0)
    return PDROP_ERROR_INVALID_ARGUMENT;
  select_topk<<<batch, kSelectThreads, 0, stream>>>(scores, image_offsets, image_len, keep, keep_offsets, kept);
  return launched();
}

int pdrop_compact(const void* src, const int64_t* seq_offsets, const int32_t* image_start, const int32_t* image_len,
                  const int32_t* kept, const int64_t* keep_offsets, const int64_t* dst_offsets, int batch,
                  int64_t total_dst_rows, int64_t row_bytes, void* dst, cudaStream_t stream) {
  if (!src || !seq_offsets || !image_start || !image_len || !kept || !keep_offsets || !dst_offsets || !dst ||
      batch <= 0 || total_dst_rows < 0 || row_bytes <= 0)
    return PDROP_ERROR_INVALID_ARGUMENT;
  if (total_dst_rows == 0) return PDROP_SUCCESS;
  compact_rows<<<static_cast<unsigned>(total_dst_rows), kCopyThreads, 0, stream>>>(
      static_cast<const char*>(src), seq_offsets, image_start, image_len, kept, keep_offsets, dst_offsets, batch,
      row_bytes, static_cast<char*>(dst));
  return launched();
}

size_t pdrop_paged_decode_workspace_size(int batch, int num_heads, int head_dim, int64_t table_stride,
                                         int block_size) {
  if (batch <= 0 || num_heads <= 0 || head_dim <= 0 || table_stride <= 0 || block_size <= 0) return 0;
  return static_cast<size_t>(batch) * num_heads * decode_chunks(table_stride, block_size) * (head_dim + 2) *
         sizeof(float);
}

int pdrop_paged_decode(const void* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                       int64_t table_stride, const int64_t* num_keys, int batch, int num_heads, int num_kv_heads,
                       int head_dim, int block_size, float scale, int dtype, void* out, void* workspace,
                       cudaStream_t stream) {
  if (!q || !k_pool || !v_pool || !tables || !num_keys || !out || !workspace || batch <= 0 || num_heads <= 0 ||
      num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > kMaxGroup || head_dim <= 0 ||
      head_dim > kMaxHeadDim || block_size <= 0 || table_stride <= 0)
    return PDROP_ERROR_INVALID_ARGUMENT;
  const int chunks = decode_chunks(table_stride, block_size);
  float* partial = static_cast<float*>(workspace);
  switch (dtype) {
    case PDROP_FLOAT32:
      launch_paged_decode<float>(q, k_pool, v_pool, tables, table_stride, num_keys, batch, num_heads, num_kv_heads,
                                 head_dim, block_size, scale, out, partial, chunks, stream);
      break;
    case PDROP_FLOAT16:
      launch_paged_decode<__half>(q, k_pool, v_pool, tables, table_stride, num_keys, batch, num_heads, num_kv_heads,
                                  head_dim, block_size, scale, out, partial, chunks, stream);
      break;
    case PDROP_BFLOAT16:
      launch_paged_decode<__nv_bfloat16>(q, k_pool, v_pool, tables, table_stride, num_keys, batch, num_heads,
                                         num_kv_heads, head_dim, block_size, scale, out, partial, chunks, stream);
      break;
    default:
      return PDROP_ERROR_INVALID_ARGUMENT;
  }
  return launched();
}

}  // extern "C"
