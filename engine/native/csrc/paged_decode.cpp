// Paged decode attention on CPU: one query row per sequence, K/V read straight from the pages.
//
// paged_decode(q [B, H, D], k_cache, v_cache [num_blocks, block_size, Hkv, D] (any strides,
// unit stride along D), block_tables [B, nblk] int64, seq_lens [B] int64, scale,
// sliding_window (-1: none)) -> out [B, H, D], dtype of q.
//
// Sequence b's query is at position seq_lens[b] - 1 and sees keys
// max(0, seq_lens[b] - sliding_window) .. seq_lens[b] - 1; key t lives in page
// block_tables[b, t / block_size], row t % block_size.
//
// Work split: one task per (b, slice of HS kv heads), run by ChunkPool (chunk_pool.h: the
// caller plus torch.get_num_threads() - 1 helpers, no end-of-region barrier). HS = Hkv unless
// B is too small to keep the threads busy (head_slices), so a task usually reads whole [Hkv, D] token rows: each page's K and V are
// streamed sequentially, once. A task walks its keys in chunks of kChunk tokens for all
// GROUP = H / Hkv query heads of each kv head (each K/V row is loaded once per group), with an
// online softmax in fp32: per chunk, scores -> new running max -> rescale -> P @ V.
// bf16/fp16 rows are converted to an fp32 scratch tile first; all arithmetic is fp32.
// Head dims 64 and 128 get compile-time-sized (fully unrolled) row loops, others a generic one.

#include <torch/extension.h>

#include "chunk_pool.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 32;  // keys per online-softmax step
constexpr int64_t kUnroll = 4;  // keys per inner step: 4 independent accumulators per dot

// Row of D elements as fp32: float rows are used in place, others converted into `buf`.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* buf, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}
template <>
inline const float* as_float<float>(const float* src, float*, int64_t) {
  return src;
}

// exp(x) for x <= 0 (a score minus the running max), vectorisable; relative error < 2e-7.
// Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial for exp(r), times 2^n.
// x is clamped to -87 so 2^n stays a normal float; exp(-87) ~ 1.6e-38 is 0 for our sums.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// s[u] = q . k[u] for kUnroll rows at once (independent accumulators hide FMA latency).
inline void dot4(const float* __restrict q, const float* const* k, int64_t d, float* s) {
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < d; ++i) {
    s0 += q[i] * k0[i];
    s1 += q[i] * k1[i];
    s2 += q[i] * k2[i];
    s3 += q[i] * k3[i];
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// acc += sum_u p[u] * v[u] over kUnroll rows (one load/store of acc per 4 rows).
inline void axpy4(float* __restrict acc, const float* p, const float* const* v, int64_t d) {
  const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
  const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
}

inline void axpy(float* __restrict acc, float p, const float* __restrict v, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += p * v[i];
}

// Number of kv-head slices per sequence: the smallest divisor c of Hkv with B * c >= 4 * threads
// (enough tasks to balance), so a task usually reads whole [Hkv, D] token rows sequentially.
int64_t head_slices(int64_t B, int64_t Hkv) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  for (int64_t c = 1; c < Hkv; ++c) {
    if (Hkv % c == 0 && B * c >= want) return c;
  }
  return Hkv;
}

// kD > 0: head_dim known at compile time (fully unrolled row loops); 0: any head_dim.
template <typename scalar_t, int64_t kD>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale_d,
                       int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = kD > 0 ? kD : q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = H / Hkv, nblk = block_tables.size(1);
  const int64_t slices = head_slices(B, Hkv), HS = Hkv / slices;  // kv heads per task
  const int64_t QH = HS * G;                                       // query heads per task
  const float scale = static_cast<float>(scale_d);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));

  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t* btp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t sqb = q.stride(0), sqh = q.stride(1);
  const int64_t skb = k_cache.stride(0), skt = k_cache.stride(1), skh = k_cache.stride(2);
  const int64_t svb = v_cache.stride(0), svt = v_cache.stride(1), svh = v_cache.stride(2);
  const int64_t sbt = block_tables.stride(0), sbc = block_tables.stride(1);
  const int64_t sob = out.stride(0), soh = out.stride(1);
  const int64_t sl = seq_lens.stride(0);

  std::atomic<bool> bad_block{false};
  // One task = (sequence b, slice of HS kv heads); tasks of a sequence are adjacent. Tasks are
  // grouped into chunks (about 4 per thread) that ChunkPool hands out (see chunk_pool.h).
  const int64_t ntasks = B * slices;
  const int64_t per = std::max<int64_t>(1, ntasks / (4 * at::get_num_threads()));
  splitserve::ChunkPool::get().run((ntasks + per - 1) / per, [&](int64_t chunk) {
    const int64_t begin = chunk * per, end = std::min(ntasks, begin + per);
    // Per-thread scratch, reused across this thread's tasks. Layouts:
    // qf/acc [QH, D] (query head hh * G + g), scores [QH, kChunk], tile [kUnroll, D].
    std::vector<float> qf(QH * D), acc(QH * D), scores(QH * kChunk), m(QH), l(QH), tile(kUnroll * D);
    std::vector<const scalar_t*> krows(kChunk), vrows(kChunk);  // chunk's rows, slice's first kv head
    const float* rows[kUnroll];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slices, hk0 = (task % slices) * HS;
      const int64_t len = lp[b * sl];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t* table = btp + b * sbt;
      bool ok = len >= 0 && len <= nblk * bs;
      for (int64_t p = first / bs; ok && p < (len + bs - 1) / bs; ++p) {
        ok = table[p * sbc] >= 0 && table[p * sbc] < num_blocks;
      }
      if (!ok) {
        bad_block = true;
        continue;
      }
      for (int64_t h = 0; h < QH; ++h) {
        const scalar_t* src = qp + b * sqb + (hk0 * G + h) * sqh;
        for (int64_t i = 0; i < D; ++i) qf[h * D + i] = static_cast<float>(src[i]) * scale;
        m[h] = -std::numeric_limits<float>::infinity();
        l[h] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);

      for (int64_t t0 = first; t0 < len; t0 += kChunk) {
        const int64_t n = std::min(kChunk, len - t0);
        const int64_t n4 = n - n % kUnroll;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = t0 + j;
          const int64_t page = table[(t / bs) * sbc], off = t % bs;
          krows[j] = kp + page * skb + off * skt + hk0 * skh;
          vrows[j] = vp + page * svb + off * svt + hk0 * svh;
        }
        // Software-prefetch the next chunk's K/V rows into L2 while this chunk computes (measured:
        // ~20% faster on a cache far larger than L2 with shuffled pages; prefetcht0 was no better
        // than none, spreading the prefetches over the loops below was no better either).
        for (int64_t t = t0 + kChunk; t < std::min(len, t0 + 2 * kChunk); ++t) {
          const int64_t page = table[(t / bs) * sbc], off = t % bs;
          const char* kr = reinterpret_cast<const char*>(kp + page * skb + off * skt + hk0 * skh);
          const char* vr = reinterpret_cast<const char*>(vp + page * svb + off * svt + hk0 * svh);
          for (int64_t hh = 0; hh < HS; ++hh) {
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
              __builtin_prefetch(kr + hh * skh * sizeof(scalar_t) + byte, 0, 1);
              __builtin_prefetch(vr + hh * svh * sizeof(scalar_t) + byte, 0, 1);
            }
          }
        }
        // scores[h, j] = q_h . k_j (q pre-scaled); token-major so a token's heads are read together
        for (int64_t j = 0; j < n4; j += kUnroll) {
          for (int64_t hh = 0; hh < HS; ++hh) {
            for (int64_t u = 0; u < kUnroll; ++u) rows[u] = as_float(krows[j + u] + hh * skh, &tile[u * D], D);
            for (int64_t g = 0; g < G; ++g) dot4(&qf[(hh * G + g) * D], rows, D, &scores[(hh * G + g) * kChunk + j]);
          }
        }
        for (int64_t j = n4; j < n; ++j) {
          for (int64_t hh = 0; hh < HS; ++hh) {
            const float* kr = as_float(krows[j] + hh * skh, tile.data(), D);
            for (int64_t g = 0; g < G; ++g) scores[(hh * G + g) * kChunk + j] = dot(&qf[(hh * G + g) * D], kr, D);
          }
        }
        // online softmax: new running max, rescale the running sums, scores -> probabilities
        for (int64_t h = 0; h < QH; ++h) {
          float* s = &scores[h * kChunk];
          float mx = m[h];
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
          const float corr = m[h] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpos(m[h] - mx);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            s[j] = exp_nonpos(s[j] - mx);
            sum += s[j];
          }
          l[h] = l[h] * corr + sum;
          m[h] = mx;
          if (corr != 1.f) {
            float* a = &acc[h * D];
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) a[i] *= corr;
          }
        }
        // acc[h] += sum_j p[h, j] * v_j
        for (int64_t j = 0; j < n4; j += kUnroll) {
          for (int64_t hh = 0; hh < HS; ++hh) {
            for (int64_t u = 0; u < kUnroll; ++u) rows[u] = as_float(vrows[j + u] + hh * svh, &tile[u * D], D);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t h = hh * G + g;
              axpy4(&acc[h * D], &scores[h * kChunk + j], rows, D);
            }
          }
        }
        for (int64_t j = n4; j < n; ++j) {
          for (int64_t hh = 0; hh < HS; ++hh) {
            const float* vr = as_float(vrows[j] + hh * svh, tile.data(), D);
            for (int64_t g = 0; g < G; ++g) axpy(&acc[(hh * G + g) * D], scores[(hh * G + g) * kChunk + j], vr, D);
          }
        }
      }
      for (int64_t h = 0; h < QH; ++h) {
        scalar_t* dst = op + b * sob + (hk0 * G + h) * soh;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // l == 0 only for an empty sequence
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(acc[h * D + i] * inv);
      }
    }
  });
  TORCH_CHECK(!bad_block, "paged_decode: seq_lens exceed block_tables, or a block id is out of range");
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                       at::Tensor& out) {
  switch (q.size(2)) {
    case 64:
      return paged_decode_impl<scalar_t, 64>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
    case 128:
      return paged_decode_impl<scalar_t, 128>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
    default:
      return paged_decode_impl<scalar_t, 0>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
  }
}

}  // namespace

namespace splitserve {

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                        int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache/v_cache must be [num_blocks, bs, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and the cache differ");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "cache must have unit stride along D");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, "num heads must be a multiple of num kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.scalar_type() == at::kLong && block_tables.device().is_cpu(),
              "block_tables must be a CPU int64 [B, nblk] tensor");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == q.size(0) && seq_lens.scalar_type() == at::kLong &&
                  seq_lens.device().is_cpu(),
              "seq_lens must be a CPU int64 [B] tensor");
  TORCH_CHECK(sliding_window == -1 || sliding_window > 0, "sliding_window must be -1 (none) or > 0");
  at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(qc, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out);
      break;
    case at::kBFloat16:
      dispatch_head_dim<at::BFloat16>(qc, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out);
      break;
    case at::kHalf:
      dispatch_head_dim<at::Half>(qc, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace splitserve
