// The screen-and-refine step of the greedy head (engine/models/greedy_head.py has the bound):
//
//   greedy_refine(screened [N, V] fp32 or bf16, bound [N] fp32, out_round, slack,
//                 x [N, H] fp32, w [V, H] fp32, max_candidates) -> int64 [2, N]
//
// Per row n: m = max_v screened[n, v]; B = bound[n], or (B + out_round |m|) / (1 - 2 out_round)
// when out_round > 0 (bf16 screened logits: their own rounding); every v with
// screened[n, v] >= m - 2 slack B is a candidate, and its float32 logit dot(x[n], w[v]) is
// computed (16-lane FMA, one fixed summation order per (row, v): the same value in any batch).
// Row 0 of the result: the candidate with the largest float32 logit, the lowest v on a tie
// (torch.argmax's rule; v ascends); -1 when the row holds a NaN or an infinite maximum; -2 when
// it has more than max_candidates candidates. Row 1: the row's candidate count (0 for -1).
// Comparisons are in float32 (bf16 -> float32 is exact), so the candidate set is exactly the
// one the bound names. One row per chunk (ChunkPool, like argmax_rows): rows are independent.

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16_simd.h"
#include "chunk_pool.h"
#include "kernels.h"

namespace {

// Element i of a row of fp32 (T = float) or bf16 (T = uint16_t) screened logits.
template <typename T>
inline float at(const T* row, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return row[i];
  } else {
    return splitserve::bf16_bits_to_float(row[i]);
  }
}

#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return splitserve::load_bf16x16(p);
  }
}
#endif

// (max, whether the row holds a NaN)
template <typename T>
std::pair<float, bool> row_max(const T* row, int64_t V) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vbest = _mm512_set1_ps(best);
  __mmask16 unordered = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = load16(row + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vbest = _mm512_max_ps(vbest, v);
  }
  best = _mm512_reduce_max_ps(vbest);
  nan = unordered != 0;
#endif
  for (; i < V; ++i) {
    const float v = at(row, i);
    nan |= std::isnan(v);
    best = v > best ? v : best;
  }
  return {best, nan};
}

float dot(const float* a, const float* b, int64_t H) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= H; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < H; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void refine_row(const T* row, int64_t V, float bound, double out_round, double slack, const float* x, const float* w,
                int64_t H, int64_t max_candidates, int64_t* token, int64_t* count) {
  const auto [m, nan] = row_max(row, V);
  if (nan || !std::isfinite(m)) {
    *token = -1;
    *count = 0;
    return;
  }
  double b = bound;
  if (out_round > 0) b = (b + out_round * std::fabs(m)) / (1.0 - 2.0 * out_round);
  const float thr = static_cast<float>(m - 2.0 * slack * b);
  int64_t n = 0, arg = -1;
  float best = -std::numeric_limits<float>::infinity();
  auto consider = [&](int64_t v) {
    if (++n > max_candidates) return false;
    const float logit = dot(x, w + v * H, H);
    if (arg < 0 || logit > best) best = logit, arg = v;  // strictly greater: the lowest v wins a tie
    return true;
  };
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vthr = _mm512_set1_ps(thr);
  for (; i + 16 <= V; i += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(load16(row + i), vthr, _CMP_GE_OQ);
    while (hit) {
      const int lane = __builtin_ctz(hit);
      hit &= hit - 1;
      if (!consider(i + lane)) {
        *token = -2, *count = n;
        return;
      }
    }
  }
#endif
  for (; i < V; ++i) {
    if (at(row, i) >= thr && !consider(i)) {
      *token = -2, *count = n;
      return;
    }
  }
  *token = arg;  // the maximum itself is always a candidate (B >= 0): arg >= 0
  *count = n;
}

}  // namespace

namespace splitserve {

at::Tensor greedy_refine(const at::Tensor& screened, const at::Tensor& bound, double out_round, double slack,
                         const at::Tensor& x, const at::Tensor& w, int64_t max_candidates) {
  const bool bf16 = screened.scalar_type() == at::kBFloat16;
  TORCH_CHECK(screened.device().is_cpu() && (bf16 || screened.scalar_type() == at::kFloat),
              "greedy_refine: CPU float32 or bfloat16 screened logits only");
  TORCH_CHECK(screened.dim() == 2 && screened.size(1) > 0 && screened.stride(1) == 1,
              "greedy_refine: screened must be [N, V] with unit stride along V");
  const int64_t N = screened.size(0), V = screened.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && bound.scalar_type() == at::kFloat,
              "greedy_refine: x, w and bound must be float32");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == N && x.is_contiguous(), "greedy_refine: x must be contiguous [N, H]");
  const int64_t H = x.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == V && w.size(1) == H && w.is_contiguous(),
              "greedy_refine: w must be contiguous [V, H] matching screened and x");
  TORCH_CHECK(bound.dim() == 1 && bound.size(0) == N && bound.is_contiguous(), "greedy_refine: bound must be [N]");
  TORCH_CHECK(out_round >= 0 && out_round < 0.25 && slack >= 1, "greedy_refine: out_round in [0, 0.25), slack >= 1");
  at::Tensor out = at::empty({2, N}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bound.data_ptr<float>();
  const int64_t ld = screened.stride(0);
  const char* base = static_cast<const char*>(screened.data_ptr());
  splitserve::ChunkPool::get().run(N, [&](int64_t n) {
    if (bf16) {
      const auto* row = reinterpret_cast<const uint16_t*>(base) + n * ld;
      refine_row(row, V, bp[n], out_round, slack, xp + n * H, wp, H, max_candidates, op + n, op + N + n);
    } else {
      const auto* row = reinterpret_cast<const float*>(base) + n * ld;
      refine_row(row, V, bp[n], out_round, slack, xp + n * H, wp, H, max_candidates, op + n, op + N + n);
    }
  });
  return out;
}

}  // namespace splitserve
