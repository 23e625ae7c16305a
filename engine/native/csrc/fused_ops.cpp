// Fused element-wise and row-wise ops of the decoder layer: each replaces 3-8 torch ops (and
// their temporaries) with one pass over the data.
//
// Numerics follow the Hugging Face Llama modules op by op: math in fp32, and for 16-bit dtypes
// every intermediate that HF materialises in the model dtype is rounded to it at the same place
// (so bf16 results stay within rounding of transformers', not merely of an fp32 reference).
// Rows are split over ChunkPool (chunk_pool.h), in ranges of at least 16K elements.
//
//   rms_norm(x [T, H], w [H], eps) -> [T, H]:  w * to_dtype(x * rsqrt(mean(x^2) + eps))
//   add_rms_norm(x [T, H], delta [T, H], w, eps) -> [T, H]:  x += delta (in place, x's dtype),
//       then rms_norm(x): the residual add of one sublayer fused with the next sublayer's norm
//   rope_split_qkv(qkv [T, (H + 2 Hkv) D] (unit stride along the row), cos/sin [P, D] fp32
//       tables, positions [T] int64, H, Hkv) -> [q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]],
//       dense; q and k rotated: y = x * cos + rotate_half(x) * sin (cos/sin cast to the dtype)
//   silu_mul(gate_up [T, 2I]) -> [T, I]:  silu(gate) * up
//   argmax_rows(logits [N, V] fp32) -> int64 [N]: the first index of each row's maximum
//       (torch.argmax's tie rule; rows must not hold NaN)
//   write_kv(k_cache, v_cache [num_blocks, bs, Hkv, D] views (each token row of Hkv * D
//       elements contiguous), slots [T] int64, k, v [T, Hkv, D]): token t's K/V rows go to
//       block slots[t] / bs, row slots[t] % bs (PagedKVCache.write in one call)

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16_simd.h"
#include "chunk_pool.h"
#include "exp_approx.h"
#include "kernels.h"

namespace {

// Round to the storage dtype and back (identity for float).
template <typename scalar_t>
inline float rnd(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}
template <>
inline float rnd<float>(float v) {
  return v;
}

using splitserve::exp_nonpos;  // exp_approx.h

// Rows per task: enough work per task that small steps (batch-1 decode) stay on one thread.
inline int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

// fn(t0, t1) over [0, T) in row ranges of at least `grain` rows, on ChunkPool (chunk_pool.h).
template <typename F>
void parallel_rows(int64_t T, int64_t grain, const F& fn) {
  const int64_t per = std::max(grain, (T + splitserve::ChunkPool::kMaxChunks - 1) / splitserve::ChunkPool::kMaxChunks);
  const int64_t chunks = (T + per - 1) / per;
  splitserve::ChunkPool::get().run(chunks, [&](int64_t c) { fn(c * per, std::min(T, (c + 1) * per)); });
}

template <typename scalar_t>
inline void norm_row(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = static_cast<float>(x[i]);
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) {
    const float hn = rnd<scalar_t>(static_cast<float>(x[i]) * r);
    out[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * hn);
  }
}

#if defined(__AVX512F__)
using splitserve::exp_nonpos16;  // exp_approx.h
using splitserve::load_bf16x16;  // bf16_simd.h
using splitserve::narrow_bf16x16;
using splitserve::widen_bf16x16;

// silu(g) * u for fp32 rows, 16 lanes at a time (the tail through the scalar loop below).
inline int64_t silu_mul_avx512(const float* g, const float* u, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp_nonpos16(_mm512_or_ps(x, sign));  // exp(-|x|)
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, e, inv);  // x < 0: e / (1 + e)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
  return i;
}

// The bf16 rows' silu(g) * u, 16 lanes at a time: the scalar loop's operations and roundings
// (silu rounded to bf16, then times u, rounded again), vectorised.
inline int64_t silu_mul_avx512(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load_bf16x16(g + i);
    const __m512 e = exp_nonpos16(_mm512_or_ps(x, sign));  // exp(-|x|)
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, e, inv);  // x < 0: e / (1 + e)
    const __m256i act = narrow_bf16x16(_mm512_mul_ps(x, sig));
    const __m256i out = narrow_bf16x16(_mm512_mul_ps(widen_bf16x16(act), load_bf16x16(u + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), out);
  }
  return i;
}
#elif defined(__AVX2__) && defined(__FMA__)
using splitserve::exp_nonpos8;  // exp_approx.h

// silu(g) * u for fp32 rows, 8 lanes at a time (AVX2 machines; the tail through the scalar loop).
inline int64_t silu_mul_avx2(const float* g, const float* u, float* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp_nonpos8(_mm256_or_ps(x, sign));  // exp(-|x|)
    const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);  // x < 0: e / (1 + e)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
  return i;
}
#endif

template <typename scalar_t>
inline void silu_mul_row(const scalar_t* g, const scalar_t* u, scalar_t* y, int64_t n) {
  int64_t start = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)
    start = silu_mul_avx512(g, u, y, n);
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float>) start = silu_mul_avx2(g, u, y, n);
#endif
#pragma omp simd
  for (int64_t i = start; i < n; ++i) {
    const float x = static_cast<float>(g[i]);
    const float e = exp_nonpos(-std::fabs(x));  // exp(-|x|) never overflows
    const float sig = x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    y[i] = static_cast<scalar_t>(rnd<scalar_t>(x * sig) * static_cast<float>(u[i]));
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [T, H] with unit stride along H");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), "rms_norm: w must be a contiguous [H]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: x and w dtypes differ");
}

}  // namespace

namespace splitserve {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w);
  const int64_t T = x.size(0), H = x.size(1), ldx = x.stride(0);
  at::Tensor out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_rows(T, row_grain(H), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) norm_row(xp + t * ldx, wp, op + t * H, H, static_cast<float>(eps));
    });
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps) {
  check_norm(x, w);
  TORCH_CHECK(x.is_contiguous(), "add_rms_norm: x (updated in place) must be contiguous");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.stride(1) == 1 && delta.scalar_type() == x.scalar_type(),
              "add_rms_norm: delta must be [T, H] like x, unit stride along H");
  const int64_t T = x.size(0), H = x.size(1), ldd = delta.stride(0);
  at::Tensor out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_rows(T, row_grain(H), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* row = xp + t * H;
        const scalar_t* d = dp + t * ldd;
        for (int64_t i = 0; i < H; ++i) row[i] = static_cast<scalar_t>(static_cast<float>(row[i]) + static_cast<float>(d[i]));
        norm_row(row, wp, op + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return out;
}

std::vector<at::Tensor> rope_split_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& positions, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && positions.device().is_cpu(), "rope: CPU tensors only");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rope: qkv must be [T, (H + 2 Hkv) D], unit stride along rows");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && qkv.size(1) % (heads + 2 * kv_heads) == 0, "rope: bad head counts");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (heads + 2 * kv_heads), ld = qkv.stride(0);
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && cos.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "rope: cos/sin must be contiguous fp32 [max_positions, head_dim] tables");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T && positions.scalar_type() == at::kLong,
              "rope: positions must be int64 [T]");
  at::Tensor q = at::empty({T, heads, D}, qkv.options());
  at::Tensor k = at::empty({T, kv_heads, D}, qkv.options());
  at::Tensor v = at::empty({T, kv_heads, D}, qkv.options());
  const int64_t P = cos.size(0), half = D / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rope: position ", pos[t], " outside the table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_split_qkv", [&] {
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    parallel_rows(T, row_grain((heads + 2 * kv_heads) * D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* c = cp + pos[t] * D;
        const float* s = sp + pos[t] * D;
        const scalar_t* row = src + t * ld;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
          const scalar_t* x = row + h * D;
          scalar_t* y = h < heads ? qp + (t * heads + h) * D : kp + (t * kv_heads + h - heads) * D;
          for (int64_t i = 0; i < D; ++i) {
            const float rot = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
            const float a = rnd<scalar_t>(static_cast<float>(x[i]) * rnd<scalar_t>(c[i]));
            const float b = rnd<scalar_t>(rot * rnd<scalar_t>(s[i]));
            y[i] = static_cast<scalar_t>(a + b);
          }
        }
        std::memcpy(vp + t * kv_heads * D, row + (heads + kv_heads) * D, sizeof(scalar_t) * kv_heads * D);
      }
    });
  });
  return {q, k, v};
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1,
              "silu_mul: gate_up must be [T, 2I] with unit stride along rows");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_rows(T, row_grain(2 * I), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* g = src + t * ld;
        silu_mul_row(g, g + I, op + t * I, I);
      }
    });
  });
  return out;
}

void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "write_kv: caches must be [nb, bs, Hkv, D]");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && k.device().is_cpu(), "write_kv: CPU only");
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), row = k_cache.size(2) * k_cache.size(3);
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->stride(3) == 1 && c->stride(2) == c->size(3) && c->stride(1) == row,
                "write_kv: each cache token row must be contiguous");
  TORCH_CHECK(k.dim() == 3 && k.size(1) * k.size(2) == row && k.is_contiguous() && v.sizes() == k.sizes() &&
                  v.is_contiguous(),
              "write_kv: k and v must be contiguous [T, Hkv, D] matching the cache");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "write_kv: k/v and cache dtypes differ");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong &&
                  slots.device().is_cpu() && slots.is_contiguous(),
              "write_kv: slots must be a contiguous CPU int64 [T]");
  const int64_t T = k.size(0), elem = k.element_size(), bstride = k_cache.stride(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < nb * bs, "write_kv: slot ", sp[t], " outside the cache");
    const int64_t off = ((sp[t] / bs) * bstride + (sp[t] % bs) * row) * elem;
    std::memcpy(kc + off, kp + t * row * elem, row * elem);
    std::memcpy(vc + off, vp + t * row * elem, row * elem);
  }
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat, "argmax_rows: CPU float32 logits only");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "argmax_rows: logits must be [N, V] with unit stride along V");
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  // one row per chunk: each row is 100-200 KB, enough work for a helper
  splitserve::ChunkPool::get().run(N, [&](int64_t n) {
    const float* row = lp + n * ld;
    float best = row[0];
    int64_t arg = 0;
    int64_t i = 1;
#if defined(__AVX512F__)
    if (V >= 32) {
      // per lane: the first maximum among indices = lane (mod 16); then the smallest index
      // among the lanes that hold the row's maximum
      __m512 vbest = _mm512_loadu_ps(row);
      __m512i varg = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512i vidx = varg;
      const __m512i step = _mm512_set1_epi32(16);
      for (i = 16; i + 16 <= V; i += 16) {
        vidx = _mm512_add_epi32(vidx, step);
        const __m512 v = _mm512_loadu_ps(row + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);
        vbest = _mm512_mask_blend_ps(gt, vbest, v);
        varg = _mm512_mask_blend_epi32(gt, varg, vidx);
      }
      alignas(64) float bv[16];
      alignas(64) int32_t ba[16];
      _mm512_store_ps(bv, vbest);
      _mm512_store_si512(ba, varg);
      best = bv[0];
      arg = ba[0];
      for (int l = 1; l < 16; ++l) {
        if (bv[l] > best || (bv[l] == best && ba[l] < arg)) {
          best = bv[l];
          arg = ba[l];
        }
      }
    }
#elif defined(__AVX2__)
    if (V >= 16) {  // the AVX-512 loop above on 8 lanes
      __m256 vbest = _mm256_loadu_ps(row);
      __m256i varg = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256i vidx = varg;
      const __m256i step = _mm256_set1_epi32(8);
      for (i = 8; i + 8 <= V; i += 8) {
        vidx = _mm256_add_epi32(vidx, step);
        const __m256 v = _mm256_loadu_ps(row + i);
        const __m256 gt = _mm256_cmp_ps(v, vbest, _CMP_GT_OQ);
        vbest = _mm256_blendv_ps(vbest, v, gt);
        varg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(varg), _mm256_castsi256_ps(vidx), gt));
      }
      alignas(32) float bv[8];
      alignas(32) int32_t ba[8];
      _mm256_store_ps(bv, vbest);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ba), varg);
      best = bv[0];
      arg = ba[0];
      for (int l = 1; l < 8; ++l) {
        if (bv[l] > best || (bv[l] == best && ba[l] < arg)) {
          best = bv[l];
          arg = ba[l];
        }
      }
    }
#endif
    for (; i < V; ++i) {
      if (row[i] > best) {
        best = row[i];
        arg = i;
      }
    }
    op[n] = arg;
  });
  return out;
}

}  // namespace splitserve
