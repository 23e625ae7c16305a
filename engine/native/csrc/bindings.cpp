// Python bindings of every kernel in this directory (one extension module, see ../build.py).
// Every function releases the GIL: the kernels run on torch's intra-op threads only.
#include <torch/extension.h>
#include <tuple>

#include "chunk_pool.h"
#include "kernels.h"

namespace {

// A C-contiguous buffer of bytes (any shape, itemsize 1) as (pointer, number of page_bytes rows).
std::pair<uint8_t*, int64_t> page_buffer(const py::buffer& b, bool writable, int64_t page_bytes, const char* name) {
  py::buffer_info info = b.request(writable);
  if (info.itemsize != 1) throw py::value_error(std::string(name) + ": expected a buffer of bytes (uint8)");
  py::ssize_t expect = 1;
  for (py::ssize_t d = info.ndim - 1; d >= 0; d--) {
    if (info.shape[d] != 1 && info.strides[d] != expect)
      throw py::value_error(std::string(name) + ": buffer must be C-contiguous");
    expect *= info.shape[d];
  }
  if (page_bytes <= 0 || info.size % page_bytes != 0)
    throw py::value_error(std::string(name) + ": " + std::to_string(info.size) + " bytes is not a whole number of " +
                          std::to_string(page_bytes) + "-byte pages");
  return {static_cast<uint8_t*>(info.ptr), static_cast<int64_t>(info.size / page_bytes)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using splitserve::add_rms_norm;
  using splitserve::argmax_rows;
  using splitserve::greedy_refine;
  using splitserve::paged_decode;
  using splitserve::rms_norm;
  using splitserve::rope_split_qkv;
  using splitserve::silu_mul;
  using splitserve::stream_linear;
  using splitserve::write_kv;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode", &paged_decode, "Paged decode attention over the KV cache pages (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("sliding_window") = -1, nogil);
  m.def("stream_linear", &stream_linear, "x @ w.T (+ bias) streaming each weight row once (few rows of x)",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (fp32 math, Hugging Face rounding)", py::arg("x"), py::arg("w"),
        py::arg("eps"), nogil);
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm(x)", py::arg("x"), py::arg("delta"),
        py::arg("w"), py::arg("eps"), nogil);
  m.def("rope_split_qkv", &rope_split_qkv, "split [T, (H + 2 Hkv) D] into dense q, k, v; rotate q and k",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("heads"), py::arg("kv_heads"),
        nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I] -> [T, I]", py::arg("gate_up"), nogil);
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum (float32 [N, V] -> int64 [N])",
        py::arg("logits"), nogil);
  m.def("greedy_refine", &greedy_refine,
        "each row's float32 argmax among the tokens a screened logit and its bound keep (int64 [2, N]: "
        "token or -1 / -2, candidate count)",
        py::arg("screened"), py::arg("bound"), py::arg("out_round"), py::arg("slack"), py::arg("x"), py::arg("w"),
        py::arg("max_candidates"), nogil);
  // the GIL is released by hand: the buffers are requested (checked) with it held
  m.def(
      "xxh3_pages",
      [](const py::buffer& src, const std::vector<int64_t>& src_ids, const std::optional<py::buffer>& dst,
         const std::optional<std::vector<int64_t>>& dst_ids, int64_t page_bytes, int64_t impl) {
        auto [s, s_rows] = page_buffer(src, false, page_bytes, "src");
        uint8_t* d = nullptr;
        int64_t d_rows = 0;
        if (dst) std::tie(d, d_rows) = page_buffer(*dst, true, page_bytes, "dst");
        py::gil_scoped_release nogil_here;
        return splitserve::xxh3_pages(s, s_rows, src_ids, d, d_rows, dst_ids ? &*dst_ids : nullptr, page_bytes, impl);
      },
      "XXH3-64 of pages src[src_ids] concatenated; with dst, also dst[dst_ids[i]] = src[src_ids[i]] in the same pass",
      py::arg("src"), py::arg("src_ids"), py::arg("dst") = py::none(), py::arg("dst_ids") = py::none(),
      py::arg("page_bytes"), py::arg("impl") = 0);
  m.def("xxh3_pages_best_impl", &splitserve::xxh3_pages_best_impl,
        "xxh3_pages's default variant: 3 AVX-512F, 2 AVX2, 1 scalar");
  m.def("set_openmp", &splitserve::ChunkPool::set_openmp,
        "run the next kernels' parallel chunks on torch's OpenMP threads (True) or the kernels' own pool (False)",
        py::arg("on"));
  m.def("uses_openmp", &splitserve::ChunkPool::uses_openmp, "what set_openmp last set");
  m.def(
      "simd_isa",
      []() -> std::string {
#if defined(__AVX512F__)
        return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
        return "avx2";
#else
        return "portable";
#endif
      },
      "which vector paths this build compiled (-march=native): avx512, avx2 or portable");
  m.def("write_kv", &write_kv, "store the step's K/V rows at their cache slots", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"), nogil);
}
