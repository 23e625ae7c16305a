// Python bindings of every kernel in this directory (one extension module, see ../build.py).
// Every function releases the GIL: the kernels run on torch's intra-op threads only.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using splitserve::add_rms_norm;
  using splitserve::argmax_rows;
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
  m.def("write_kv", &write_kv, "store the step's K/V rows at their cache slots", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"), nogil);
}
