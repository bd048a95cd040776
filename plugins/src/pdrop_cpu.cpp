// The CPU kernels of a decode step (pdrop_cpu.h).
//
// Paged decode attention: split-K over chunks of a row's keys, as flash-decoding does on GPUs, so
// that one long row still keeps every thread busy. Rows of different lengths and tables of a layer's
// own width are the point: a deep pyramid stage's layers hold fewer tokens, and a step reads exactly
// what each layer holds.
//
// A task is (row, chunk of whole blocks). It walks its tokens once for the keys and once for the
// values, every KV head of a token at a time (a block slot holds all heads contiguously), and leaves
// per (query head) the running max, the sum of exponentials and the unnormalised output; a second
// pass merges a row's chunks. Memory bound: each key and value byte is read once, whatever the
// number of query heads sharing it.
#include "pdrop_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

enum { kFloat32 = 0, kBFloat16 = 2 };

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
    return;
  }
  *out = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// exp(x) for x <= 0 (scores minus their max), to ~2 ulp; a plain loop the compiler vectorises,
// where std::exp would be one scalar call per key.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
  float p = 1.98756912e-4f;
  p = p * r + 1.39819994e-3f;
  p = p * r + 8.33345205e-3f;
  p = p * r + 4.16657962e-2f;
  p = p * r + 1.66666657e-1f;
  p = p * r + 5.0e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

struct Shape {
  int heads, kv_heads, group, dim, block_size;
  int64_t table_stride;
  float scale;
};

// Sixteen lanes in GCC/Clang vector extensions: one zmm register with AVX-512, two ymm with AVX2,
// four xmm on the baseline. They never cross this file's interface (an anonymous namespace), so
// GCC's note that their calling convention differs between instruction sets does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {  // bf16 -> fp32: the 16 bits become the high half
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float sum16(f32x16 v) {  // a tree of halves
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// q . k over D dims, D a compile-time head size (a multiple of 16): whole vectors and one tree sum,
// where a reduction clause sums the last vector's lanes one after another. D 0: `dim` at run time,
// any size.
template <int D, typename T>
inline float dot(const float* q, const T* k, int dim) {
  if constexpr (D == 0) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < dim; ++d) acc += q[d] * to_float(k[d]);
    return acc;
  } else {
    static_assert(D % 16 == 0, "head size must be a multiple of 16");
    f32x16 acc = load16(q) * load16(k);
    for (int d = 16; d < D; d += 16) acc += load16(q + d) * load16(k + d);
    return sum16(acc);
  }
}

// acc += p * v over D dims (as dot).
template <int D, typename T>
inline void axpy(float p, const T* v, float* acc, int dim) {
  const int n = D ? D : dim;
#pragma omp simd
  for (int d = 0; d < n; ++d) acc[d] += p * to_float(v[d]);
}

// One task's partial results for every query head h: max m[h], sum l[h], output acc[h][dim]. The
// task's keys [begin, end) start at a block boundary; a token's KV heads are contiguous in its slot,
// and each is read once for the `group` query heads that share it.
template <int D, typename T>
void run_chunk(const Shape& s, const T* q, const T* k_pool, const T* v_pool, const int64_t* table, int64_t begin,
               int64_t end, float* m, float* l, float* acc, std::vector<float>& scratch) {
  const int heads = s.heads, dim = D ? D : s.dim, n = static_cast<int>(end - begin);
  const int64_t slot = static_cast<int64_t>(s.kv_heads) * dim;  // one token of one block
  scratch.resize(static_cast<size_t>(heads) * (dim + n));
  float* qf = scratch.data();  // [heads][dim], scaled
  float* score = qf + static_cast<size_t>(heads) * dim;  // [heads][n]
  for (int h = 0; h < heads; ++h)
    for (int d = 0; d < dim; ++d) qf[h * dim + d] = to_float(q[h * dim + d]) * s.scale;

  // calls f(i, token's slot offset) for the task's tokens i = 0..n-1, a block at a time, with the
  // next block of `pool` fetched meanwhile: blocks are scattered, and a hardware prefetcher stops at
  // each 4 KiB page
  const int64_t block_elems = s.block_size * slot;
  const int64_t block_bytes = block_elems * static_cast<int64_t>(sizeof(T));
  auto for_each_token = [&](const T* pool, auto&& f) {
    for (int64_t t0 = begin; t0 < end; t0 += s.block_size) {
      const int64_t base = table[t0 / s.block_size] * block_elems;
      if (t0 + s.block_size < end) {
        const char* next = reinterpret_cast<const char*>(pool + table[t0 / s.block_size + 1] * block_elems);
        for (int64_t byte = 0; byte < block_bytes; byte += 64) __builtin_prefetch(next + byte);
      }
      const int count = static_cast<int>(std::min<int64_t>(s.block_size, end - t0));
      for (int j = 0; j < count; ++j) f(static_cast<int>(t0 - begin) + j, base + j * slot);
    }
  };
  for_each_token(k_pool, [&](int i, int64_t offset) {
    const T* key = k_pool + offset;
    for (int g = 0, h = 0; g < s.kv_heads; ++g)
      for (int r = 0; r < s.group; ++r, ++h) score[h * n + i] = dot<D>(qf + h * dim, key + g * dim, dim);
  });
  for (int h = 0; h < heads; ++h) {
    float* sh = score + static_cast<size_t>(h) * n;
    float mx = sh[0];
    for (int i = 1; i < n; ++i) mx = std::max(mx, sh[i]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; ++i) {
      sh[i] = exp_nonpositive(sh[i] - mx);
      sum += sh[i];
    }
    m[h] = mx;
    l[h] = sum;
  }
  std::fill(acc, acc + static_cast<size_t>(heads) * dim, 0.0f);
  for_each_token(v_pool, [&](int i, int64_t offset) {
    const T* value = v_pool + offset;
    for (int g = 0, h = 0; g < s.kv_heads; ++g)
      for (int r = 0; r < s.group; ++r, ++h) axpy<D>(score[h * n + i], value + g * dim, acc + h * dim, dim);
  });
}

template <typename T>
void paged_decode(const Shape& s, const T* q, const T* k_pool, const T* v_pool, const int64_t* tables,
                  const int64_t* num_keys, int batch, int threads, T* out) {
  // Chunks of whole blocks, small enough for about four tasks a thread, at most 512 keys.
  int64_t total = 0;
  for (int b = 0; b < batch; ++b) total += num_keys[b];
  int64_t chunk = std::clamp<int64_t>(total / (4 * static_cast<int64_t>(threads)), 64, 512);
  chunk = std::max<int64_t>(1, (chunk + s.block_size - 1) / s.block_size) * s.block_size;

  std::vector<int64_t> first(batch + 1, 0);  // row b's tasks are [first[b], first[b + 1])
  for (int b = 0; b < batch; ++b) first[b + 1] = first[b] + (num_keys[b] + chunk - 1) / chunk;
  const int64_t tasks = first[batch];
  const int heads = s.heads, dim = s.dim;
  std::vector<float> ml(static_cast<size_t>(tasks) * heads * 2);
  std::vector<float> acc(static_cast<size_t>(tasks) * heads * dim);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int b = static_cast<int>(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
      const int64_t begin = (task - first[b]) * chunk, end = std::min(num_keys[b], begin + chunk);
      float* m = ml.data() + static_cast<size_t>(task) * heads * 2;
      auto run = dim == 64 ? run_chunk<64, T> : dim == 128 ? run_chunk<128, T> : run_chunk<0, T>;
      run(s, q + static_cast<int64_t>(b) * heads * dim, k_pool, v_pool, tables + b * s.table_stride, begin, end, m,
          m + heads, acc.data() + static_cast<size_t>(task) * heads * dim, scratch);
    }
#pragma omp for
    for (int64_t bh = 0; bh < static_cast<int64_t>(batch) * heads; ++bh) {
      const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
      T* o = out + bh * dim;
      float mx = -INFINITY, sum = 0.0f;
      for (int64_t task = first[b]; task < first[b + 1]; ++task) mx = std::max(mx, ml[task * heads * 2 + h]);
      std::vector<float> y(dim, 0.0f);
      for (int64_t task = first[b]; task < first[b + 1]; ++task) {
        const float w = std::exp(ml[task * heads * 2 + h] - mx);
        sum += w * ml[task * heads * 2 + heads + h];
        const float* a = acc.data() + (task * heads + h) * dim;
        for (int d = 0; d < dim; ++d) y[d] += w * a[d];
      }
      for (int d = 0; d < dim; ++d) from_float(sum > 0.0f ? y[d] / sum : 0.0f, o + d);
    }
  }
}

// Four weight rows against MB (1 or 2) input rows in one pass over the weights: 4 x MB dot
// products, y[m * ldy + j] for weight row j and input row m.
template <int MB, typename T>
inline void dot_rows4(const float* x, int k_dim, const T* w, T* y, int64_t ldy) {
  const T *w0 = w, *w1 = w + k_dim, *w2 = w + 2 * k_dim, *w3 = w + 3 * k_dim;
  const float* x1 = x + (MB > 1 ? k_dim : 0);
  float a00 = 0.f, a01 = 0.f, a02 = 0.f, a03 = 0.f, a10 = 0.f, a11 = 0.f, a12 = 0.f, a13 = 0.f;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13)
  for (int k = 0; k < k_dim; ++k) {
    const float v0 = x[k], u0 = to_float(w0[k]), u1 = to_float(w1[k]), u2 = to_float(w2[k]), u3 = to_float(w3[k]);
    a00 += u0 * v0, a01 += u1 * v0, a02 += u2 * v0, a03 += u3 * v0;
    if constexpr (MB > 1) {
      const float v1 = x1[k];
      a10 += u0 * v1, a11 += u1 * v1, a12 += u2 * v1, a13 += u3 * v1;
    }
  }
  from_float(a00, y), from_float(a01, y + 1), from_float(a02, y + 2), from_float(a03, y + 3);
  if constexpr (MB > 1) from_float(a10, y + ldy), from_float(a11, y + ldy + 1), from_float(a12, y + ldy + 2),
      from_float(a13, y + ldy + 3);
}

// Threads split the weight's rows; each row of the weight is read once for all input rows.
template <typename T>
void linear(const T* x, const T* w, int rows, int64_t n_out, int k_dim, int threads, T* y) {
  std::vector<float> xf(static_cast<size_t>(rows) * k_dim);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = to_float(x[i]);
  const int64_t groups = n_out / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g <= groups; ++g) {
    int m = 0;
    if (g < groups) {
      for (; m + 2 <= rows; m += 2) dot_rows4<2>(xf.data() + m * k_dim, k_dim, w + g * 4 * k_dim, y + m * n_out + g * 4, n_out);
      if (m < rows) dot_rows4<1>(xf.data() + m * k_dim, k_dim, w + g * 4 * k_dim, y + m * n_out + g * 4, n_out);
      continue;
    }
    for (int64_t n = groups * 4; n < n_out; ++n)  // the last out_features % 4 rows
      for (m = 0; m < rows; ++m) {
        const float* xm = xf.data() + m * k_dim;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int k = 0; k < k_dim; ++k) acc += xm[k] * to_float(w[n * k_dim + k]);
        from_float(acc, y + m * n_out + n);
      }
  }
}

}  // namespace

extern "C" int pdrop_cpu_abi_version(void) { return PDROP_CPU_ABI_VERSION; }

extern "C" int pdrop_cpu_paged_decode(const void* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                                      int64_t table_stride, const int64_t* num_keys, int batch, int num_heads,
                                      int num_kv_heads, int head_dim, int block_size, float scale, int dtype,
                                      int num_threads, void* out) {
  if (!q || !k_pool || !v_pool || !tables || !num_keys || !out || batch < 1 || num_heads < 1 || num_kv_heads < 1 ||
      num_heads % num_kv_heads != 0 || head_dim < 1 || block_size < 1 || table_stride < 0 || num_threads < 1 ||
      (dtype != kFloat32 && dtype != kBFloat16))
    return 1;
  for (int b = 0; b < batch; ++b)
    if (num_keys[b] < 0 || (num_keys[b] + block_size - 1) / block_size > table_stride) return 1;
  const Shape s{num_heads, num_kv_heads, num_heads / num_kv_heads, head_dim, block_size, table_stride, scale};
  if (dtype == kFloat32)
    paged_decode(s, static_cast<const float*>(q), static_cast<const float*>(k_pool), static_cast<const float*>(v_pool),
                 tables, num_keys, batch, num_threads, static_cast<float*>(out));
  else
    paged_decode(s, static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_pool),
                 static_cast<const uint16_t*>(v_pool), tables, num_keys, batch, num_threads,
                 static_cast<uint16_t*>(out));
  return 0;
}

extern "C" int pdrop_cpu_linear(const void* x, const void* weight, int rows, int64_t out_features, int in_features,
                                int dtype, int num_threads, void* y) {
  if (!x || !weight || !y || rows < 1 || out_features < 1 || in_features < 1 || num_threads < 1 ||
      (dtype != kFloat32 && dtype != kBFloat16))
    return 1;
  if (dtype == kFloat32)
    linear(static_cast<const float*>(x), static_cast<const float*>(weight), rows, out_features, in_features,
           num_threads, static_cast<float*>(y));
  else
    linear(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), rows, out_features, in_features,
           num_threads, static_cast<uint16_t*>(y));
  return 0;
}
