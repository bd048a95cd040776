/* PyramidDrop stage-boundary kernels (score, select, compact) and the paged decode attention.
 *
 * A plain C ABI over raw device pointers, so that the Python runtime (ctypes) and a TensorRT
 * plugin can both call them. Every function enqueues on `stream`, returns a pdrop_status_t and
 * never synchronises. Ragged batches are packed: sequence b owns rows [offsets[b], offsets[b+1]).
 * Index and offset arrays live on the device.
 */
#ifndef PDROP_PLUGINS_H
#define PDROP_PLUGINS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PDROP_ABI_VERSION 3

typedef enum { PDROP_FLOAT32 = 0, PDROP_FLOAT16 = 1, PDROP_BFLOAT16 = 2 } pdrop_dtype_t;

typedef enum {
  PDROP_SUCCESS = 0,
  PDROP_ERROR_INVALID_ARGUMENT = 1,
  PDROP_ERROR_CUDA = 2
} pdrop_status_t;

int pdrop_abi_version(void);
const char* pdrop_status_string(int status);

/* After a PDROP_ERROR_CUDA, which error it was: "CUDA error <cudaGetErrorName>: <cudaGetErrorString>",
 * for the last such status returned on the calling thread (valid until that thread's next one). */
const char* pdrop_last_error_string(void);

/* Bytes of device workspace pdrop_score needs. */
size_t pdrop_score_workspace_size(int batch, int num_heads, int max_seq_len, int64_t total_image_tokens);

/* scores[image_offsets[b] + j] = mean over heads h of softmax_k(q[b,h] . k[b,k,h/group] * scale)
 * at key image_start[b] + j, for j < image_len[b]: the attention the query (the last prompt token)
 * gives each image token, over ALL keys of its sequence. q: [batch, num_heads, head_dim];
 * k: [seq_offsets[batch], num_kv_heads, head_dim]; math in fp32; scores fp32. max_seq_len bounds
 * every sequence and total_image_tokens = image_offsets[batch] (both host values, as given to
 * pdrop_score_workspace_size). */
int pdrop_score(const void* q, const void* k, const int64_t* seq_offsets, const int32_t* image_start,
                const int32_t* image_len, const int64_t* image_offsets, int batch, int num_heads,
                int num_kv_heads, int head_dim, int max_seq_len, int64_t total_image_tokens, float scale,
                int dtype, float* scores, void* workspace, cudaStream_t stream);

/* For each sequence: the indices of its keep[b] highest scores (ties to the lower index), written
 * in ascending order to kept[keep_offsets[b] ...]. keep[b] is clamped to image_len[b]. */
int pdrop_select(const float* scores, const int64_t* image_offsets, const int32_t* image_len,
                 const int32_t* keep, const int64_t* keep_offsets, int batch, int32_t* kept,
                 cudaStream_t stream);

/* Gather rows of src (row_bytes each): sequence b keeps its rows before and after its image span
 * and, inside it, rows image_start[b] + kept[...]; the output sequence b starts at dst_offsets[b].
 * total_dst_rows = dst_offsets[batch]. Positions need no gather: they are renumbered 0..L'-1. */
int pdrop_compact(const void* src, const int64_t* seq_offsets, const int32_t* image_start,
                  const int32_t* image_len, const int32_t* kept, const int64_t* keep_offsets,
                  const int64_t* dst_offsets, int batch, int64_t total_dst_rows, int64_t row_bytes,
                  void* dst, cudaStream_t stream);

/* Bytes of device workspace pdrop_paged_decode needs. */
size_t pdrop_paged_decode_workspace_size(int batch, int num_heads, int head_dim, int64_t table_stride,
                                         int block_size);

/* Decode attention over paged keys and values, read in place: out[b, h] = softmax_t(q[b, h] .
 * K_b[t, h / group] * scale) . V_b[t, h / group] over t < num_keys[b], token t of row b in block
 * tables[b * table_stride + t / block_size] at slot t % block_size of k_pool / v_pool ([blocks,
 * block_size, num_kv_heads, head_dim]). q, out: [batch, num_heads, head_dim]; math in fp32. tables and
 * num_keys live on the device; the launch shape depends only on the arguments given here, so the
 * call can be captured in a CUDA graph and replayed with new tables and lengths. A row with
 * num_keys[b] == 0 gets zeros. Same meaning as pdrop_cpu_paged_decode (pdrop_cpu.h). */
int pdrop_paged_decode(const void* q, const void* k_pool, const void* v_pool, const int64_t* tables,
                       int64_t table_stride, const int64_t* num_keys, int batch, int num_heads, int num_kv_heads,
                       int head_dim, int block_size, float scale, int dtype, void* out, void* workspace,
                       cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PDROP_PLUGINS_H */
