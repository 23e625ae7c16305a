// The native CPU kernels of splitserve_native (bindings.cpp exposes them to Python).
// Shapes and contracts are stated at each definition; every function checks its inputs with
// TORCH_CHECK and runs on torch's intra-op threads (at::parallel_for).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace splitserve {

// paged_decode.cpp: decode attention straight from the KV cache pages.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                        int64_t sliding_window);

// linear.cpp: weight-streaming linear for few rows (decode batches).
at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// fused_ops.cpp: element-wise / row-wise ops of the decoder layer, fused.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps);
std::vector<at::Tensor> rope_split_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& positions, int64_t heads, int64_t kv_heads);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor argmax_rows(const at::Tensor& logits);
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v);

// greedy_head.cpp: the greedy head's screen-and-refine (engine/models/greedy_head.py).
at::Tensor greedy_refine(const at::Tensor& screened, const at::Tensor& bound, double out_round, double slack,
                         const at::Tensor& x, const at::Tensor& w, int64_t max_candidates);

// xxh3_pages.cpp: XXH3-64 of KV pages, optionally fused with copying them (kv_transfer shm).
// Raw pointers: the Python binding checks the buffers (contiguous bytes) and releases the GIL.
uint64_t xxh3_pages(const uint8_t* src, int64_t src_rows, const std::vector<int64_t>& src_ids, uint8_t* dst,
                    int64_t dst_rows, const std::vector<int64_t>* dst_ids, int64_t page_bytes, int64_t impl);
int64_t xxh3_pages_best_impl();

}  // namespace splitserve
