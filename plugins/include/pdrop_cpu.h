/* The CPU kernels of a decode step: attention over paged keys and values read in place, and the
 * linear layers for a few rows.
 *
 * A plain C ABI over host pointers (the runtime calls it through ctypes). Threads: OpenMP, as many
 * as num_threads. dtype as pdrop_dtype_t in pdrop_plugins.h: 0 fp32, 2 bf16 (fp16 is refused).
 */
#ifndef PDROP_CPU_H
#define PDROP_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PDROP_CPU_ABI_VERSION 1

int pdrop_cpu_abi_version(void);

/* Decode attention, the CUDA twin of pdrop_paged_decode (pdrop_plugins.h), same arguments and meaning:
 * out[b, h] = softmax_t(q[b, h] . K_b[t, h / group] * scale) . V_b[t, h / group] over the keys
 * t < num_keys[b] of row b, where token t of row b sits in block tables[b * table_stride + t / block_size]
 * at slot t % block_size of k_pool / v_pool ([blocks, block_size, num_kv_heads, head_dim]).
 * q, out: [batch, num_heads, head_dim]; math in fp32; dtype as pdrop_dtype_t (fp32 or bf16 here).
 * A row with num_keys[b] == 0 (padding) gets zeros. Returns 0, or 1 for an invalid argument. */
int pdrop_cpu_paged_decode(const void* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                           int64_t table_stride, const int64_t* num_keys, int batch, int num_heads,
                           int num_kv_heads, int head_dim, int block_size, float scale, int dtype,
                           int num_threads, void* out);

/* y[rows, out_features] = x[rows, in_features] . weight[out_features, in_features]^T, math in fp32:
 * a decode step's few rows against every weight, in one pass over the weight (memory bound). Returns
 * 0, or 1 for an invalid argument. */
int pdrop_cpu_linear(const void* x, const void* weight, int rows, int64_t out_features, int in_features, int dtype,
                     int num_threads, void* y);

#ifdef __cplusplus
}
#endif

#endif /* PDROP_CPU_H */
