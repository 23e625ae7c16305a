// Weight-streaming linear for few rows: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// stream_linear(x [M, K] float32|bfloat16, w [N, K] float32|bfloat16 (unit stride along K),
// bias [N] or None) -> y [M, N] in x's dtype. Meant for decode batches (M up to ~16), where
// MKL / oneDNN spend 2-4x the time it takes to read the weights once (issue 11's profile).
//
// Each task owns blocks of NB = 4 consecutive weight rows; it reads each block from memory
// once and applies it to every row of x (x is converted to one contiguous fp32 copy first and
// stays in L1/L2). Register tile: MR (<= 4) rows of x x NB weight rows = up to 16 fp32 vector
// accumulators over K, 16 lanes each, then one horizontal reduction per (m, n) in a fixed tree.
//
// Determinism: y[m, n] is computed by the same sequence of operations whatever M is, whichever
// tile row m falls in and however many threads run (the split is over n, never over k), so a
// row's output does not depend on what it is batched with, nor on the run. Accumulation is
// fp32; bfloat16 weights are widened exactly (bf16 -> fp32 is a shift).
//
// Blocks are claimed in chunks of kChunkBlocks by the caller and ChunkPool's helpers (torch's
// thread count; no barrier that a descheduled thread could stall, see chunk_pool.h). Three builds
// of the tile, picked at compile time (-march=native): AVX-512 (16 lanes), AVX2 + FMA (8 lanes,
// rows in pairs), and plain loops elsewhere; the accumulation order differs between them.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16_simd.h"
#include "chunk_pool.h"
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPLITSERVE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPLITSERVE_AVX2 1
#endif

namespace {

constexpr int64_t NB = 4;  // weight rows per block (per register tile)
constexpr int64_t MR = 4;  // rows of x per register tile
constexpr int64_t kChunkBlocks = 16;  // blocks a thread claims at a time (64 weight rows)

#ifdef SPLITSERVE_AVX512

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return splitserve::load_bf16x16(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return splitserve::widen_bf16x16(_mm256_maskz_loadu_epi16(m, p));
}

// [sum(a0), sum(a1), sum(a2), sum(a3)] in one fixed tree (the same for every lane position).
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  auto half = [](__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  };
  const __m256 h01 = _mm256_hadd_ps(half(a0), half(a1));
  const __m256 h23 = _mm256_hadd_ps(half(a2), half(a3));
  const __m256 h = _mm256_hadd_ps(h01, h23);
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[i, j] for i < ROWS (rows of x at x + i * K), j < NB (weight rows w[j]); out[i * NB + j].
// pf: the next block's weights (NB * K contiguous elements) or null. Each 16-wide k step
// prefetches its share of them, so the next block streams from memory while this one is
// computed (the other row tiles of this block then read it from L1, not from memory).
template <int ROWS, typename wt>
inline void tile(const float* x, int64_t K, const wt* const* w, float* out, const char* pf) {
  constexpr int64_t kLines = NB * static_cast<int64_t>(sizeof(wt)) / 4;  // cache lines per k step
  __m512 acc[ROWS][NB];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (pf != nullptr) {
      for (int64_t l = 0; l < kLines; ++l) _mm_prefetch(pf + ((k >> 4) * kLines + l) * 64, _MM_HINT_T0);
    }
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load16(w[j] + k);
    for (int i = 0; i < ROWS; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load16(w[j] + k, m);
    for (int i = 0; i < ROWS; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < ROWS; ++i) _mm_storeu_ps(out + i * NB, reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

#elif defined(SPLITSERVE_AVX2)
// AVX2 + FMA (e.g. AMD Zen 2/3, Intel Haswell..Alder Lake): 8 partial sums per (m, n), one
// __m256 each. 16 ymm registers hold 2 rows x NB accumulators + NB weight vectors + x, so a
// tile of more rows runs as pairs of rows (the weights come from L1 the second time). A row's
// operations do not depend on the pairing, so the determinism above holds.

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));  // exact widening
}

// [sum(a0), sum(a1), sum(a2), sum(a3)] in one fixed tree.
inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows [0, ROWS) (ROWS <= 2) of the tile; pf as in the AVX-512 tile (1 or 2 lines per k step).
template <int ROWS, typename wt>
inline void pair(const float* x, int64_t K, const wt* const* w, float* out, const char* pf) {
  constexpr int64_t kLines = NB * static_cast<int64_t>(sizeof(wt)) / 8;  // cache lines per 8-wide k step
  __m256 acc[ROWS][NB];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (pf != nullptr) {
      for (int64_t l = 0; l < kLines; ++l) _mm_prefetch(pf + ((k >> 3) * kLines + l) * 64, _MM_HINT_T0);
    }
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load8(w[j] + k);
    for (int i = 0; i < ROWS; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 8 elements, zero-padded (adds exact zeros)
    alignas(32) float xt[ROWS][8] = {}, wtail[NB][8] = {};
    for (int64_t l = 0; l < K - k; ++l) {
      for (int i = 0; i < ROWS; ++i) xt[i][l] = x[i * K + k + l];
      for (int j = 0; j < NB; ++j) wtail[j][l] = static_cast<float>(w[j][k + l]);
    }
    for (int i = 0; i < ROWS; ++i) {
      const __m256 xv = _mm256_load_ps(xt[i]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, _mm256_load_ps(wtail[j]), acc[i][j]);
    }
  }
  for (int i = 0; i < ROWS; ++i) _mm_storeu_ps(out + i * NB, reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <int ROWS, typename wt>
inline void tile(const float* x, int64_t K, const wt* const* w, float* out, const char* pf) {
  if constexpr (ROWS == 1) {
    pair<1>(x, K, w, out, pf);
  } else {
    pair<2>(x, K, w, out, pf);
    if constexpr (ROWS == 3) pair<1>(x + 2 * K, K, w, out + 2 * NB, nullptr);
    if constexpr (ROWS == 4) pair<2>(x + 2 * K, K, w, out + 2 * NB, nullptr);
  }
}

#else  // portable fallback: the same tiling, 16 partial sums per (m, n) as plain loops

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

template <int ROWS, typename wt>
inline void tile(const float* x, int64_t K, const wt* const* w, float* out, const char*) {
  float acc[ROWS][NB][16] = {};
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t len = std::min<int64_t>(16, K - k0);
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < NB; ++j)
        for (int64_t l = 0; l < len; ++l) acc[i][j][l] += x[i * K + k0 + l] * widen(w[j][k0 + l]);
  }
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += acc[i][j][l];
      out[i * NB + j] = s;
    }
}

#endif

// Rows n0 .. n0 + NB of y (fewer at the end of N) for every row of x.
template <typename wt, typename yt>
inline void block(const float* x, int64_t M, int64_t K, const wt* w, int64_t ldw, int64_t N, const float* bias, yt* y,
                  int64_t n0, float* out) {
  const int64_t valid = std::min(NB, N - n0);
  const wt* rows[NB];
  for (int64_t j = 0; j < NB; ++j) rows[j] = w + std::min(n0 + j, N - 1) * ldw;  // tail: repeat the last row
  // the next block's rows form one contiguous region when w is a dense [N, K] matrix
  const char* next = (ldw == K && n0 + 2 * NB <= N) ? reinterpret_cast<const char*>(w + (n0 + NB) * ldw) : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = std::min(MR, M - m0);
    const float* xm = x + m0 * K;
    const char* pf = m0 == 0 ? next : nullptr;
    switch (mr) {
      case 4: tile<4>(xm, K, rows, out, pf); break;
      case 3: tile<3>(xm, K, rows, out, pf); break;
      case 2: tile<2>(xm, K, rows, out, pf); break;
      default: tile<1>(xm, K, rows, out, pf); break;
    }
    for (int64_t i = 0; i < mr; ++i) {
      yt* dst = y + (m0 + i) * N + n0;
      for (int64_t j = 0; j < valid; ++j) dst[j] = static_cast<yt>(out[i * NB + j] + (bias ? bias[n0 + j] : 0.f));
    }
  }
}

template <typename wt, typename yt>
void stream_linear_impl(const float* x, int64_t M, int64_t K, const wt* w, int64_t ldw, int64_t N,
                        const float* bias, yt* y) {
  const int64_t blocks = (N + NB - 1) / NB;
  const int64_t per_chunk = std::max(kChunkBlocks, (blocks + splitserve::ChunkPool::kMaxChunks - 1) /
                                                       splitserve::ChunkPool::kMaxChunks);
  const int64_t chunks = (blocks + per_chunk - 1) / per_chunk;
  splitserve::ChunkPool::get().run(chunks, [&](int64_t c) {
    float out[MR * NB];
    for (int64_t b = c * per_chunk; b < std::min(blocks, (c + 1) * per_chunk); ++b) {
      block(x, M, K, w, ldw, N, bias, y, b * NB, out);
    }
  });
}

}  // namespace

namespace splitserve {

at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "stream_linear: CPU tensors only");
  TORCH_CHECK(w.dim() == 2, "stream_linear: w must be [N, K], got ", w.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "stream_linear: x [..., K] must match w [N, K]: ", x.sizes(),
              " vs ", w.sizes());
  TORCH_CHECK(w.stride(1) == 1, "stream_linear: w needs unit stride along K");
  const auto wdt = w.scalar_type(), xdt = x.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16, "stream_linear: w must be float32 or bfloat16, got ", wdt);
  TORCH_CHECK(xdt == at::kFloat || xdt == at::kBFloat16, "stream_linear: x must be float32 or bfloat16, got ", xdt);
  const int64_t K = w.size(1), N = w.size(0);
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  // x as one contiguous fp32 [M, K] block (a copy only when it is not one already)
  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "stream_linear: bias must be [N]");
    bf = bias->to(at::kFloat).contiguous();
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y;
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  const int64_t ldw = w.stride(0);
  if (wdt == at::kFloat && xdt == at::kFloat) {
    stream_linear_impl(xp, M, K, w.data_ptr<float>(), ldw, N, bp, y.data_ptr<float>());
  } else if (wdt == at::kBFloat16 && xdt == at::kBFloat16) {
    stream_linear_impl(xp, M, K, w.data_ptr<at::BFloat16>(), ldw, N, bp, y.data_ptr<at::BFloat16>());
  } else if (wdt == at::kBFloat16) {
    stream_linear_impl(xp, M, K, w.data_ptr<at::BFloat16>(), ldw, N, bp, y.data_ptr<float>());
  } else {
    stream_linear_impl(xp, M, K, w.data_ptr<float>(), ldw, N, bp, y.data_ptr<at::BFloat16>());
  }
  return y;
}

}  // namespace splitserve
