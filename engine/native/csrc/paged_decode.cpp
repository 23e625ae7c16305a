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
#include "exp_approx.h"
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

using splitserve::exp_nonpos;  // exp_approx.h

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

// The raw pointers and element strides both kernel paths read: q [B, H, D], k/v_cache
// [num_blocks, bs, Hkv, D], block_tables [B, nblk], seq_lens [B], out [B, H, D]. Members in
// the order the kernels bind them (structured bindings).
template <typename scalar_t>
struct PagedArgs {
  const scalar_t *qp, *kp, *vp;
  scalar_t* op;
  const int64_t *btp, *lp;
  int64_t sqb, sqh, skb, skt, skh, svb, svt, svh, sbt, sbc, sob, soh, sl;

  PagedArgs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, at::Tensor& out)
      : qp(q.data_ptr<scalar_t>()),
        kp(k_cache.data_ptr<scalar_t>()),
        vp(v_cache.data_ptr<scalar_t>()),
        op(out.data_ptr<scalar_t>()),
        btp(block_tables.data_ptr<int64_t>()),
        lp(seq_lens.data_ptr<int64_t>()),
        sqb(q.stride(0)),
        sqh(q.stride(1)),
        skb(k_cache.stride(0)),
        skt(k_cache.stride(1)),
        skh(k_cache.stride(2)),
        svb(v_cache.stride(0)),
        svt(v_cache.stride(1)),
        svh(v_cache.stride(2)),
        sbt(block_tables.stride(0)),
        sbc(block_tables.stride(1)),
        sob(out.stride(0)),
        soh(out.stride(1)),
        sl(seq_lens.stride(0)) {}
};

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

  const auto& [qp, kp, vp, op, btp, lp, sqb, sqh, skb, skt, skh, svb, svt, svh, sbt, sbc, sob, soh, sl] =
      PagedArgs<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, out);

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


#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// ---------------------------------------------------------------- SIMD paths (head_dim 64 / 128)
// Same contract and task split as paged_decode_impl; per task, keys are walked in chunks of
// kChunkV tokens (one online-softmax step each), and within a chunk in blocks of L keys (L =
// the vector width: 16 on AVX-512, 8 on AVX2):
//  - scores: for one query head, L per-key fp32 partial-sum vectors (D / L FMAs each) are
//    summed by a transpose-reduce into one vector of L scores: ~3 ops per key instead of a
//    horizontal reduction per key and head;
//  - P @ V: the accumulators of the heads (AVX-512: up to 16 / DV query heads; AVX2: one head,
//    64 columns at a time) stay in registers over the chunk; each V row is applied with one
//    broadcast per head.
// Keys past the sequence's end in a block read a zero row and get probability 0 (masked).
// What a head computes does not depend on the other heads of its task, so the result is the
// same for any thread count (test_cpu_paged_decode). The task loop, split-K and the merge
// (simd_decode below) are shared; an ISA struct (Avx512, Avx2) supplies the chunk step.

constexpr int64_t kChunkV = 64;    // keys per online-softmax step (multiple of 16)
constexpr int64_t kSegment = 512;  // split-K cut: keys per piece of a long sequence (multiple of kChunkV)

// What one chunk step reads and updates, for the HS kv heads of a task (rows: kv head hk0's).
template <typename scalar_t>
struct ChunkState {
  int64_t HS, G, n;                  // kv heads, query heads per kv head, keys in this chunk
  int64_t skh, svh;                  // element stride between kv heads within a K / V row
  const scalar_t* const* krows;      // [n] K rows, kv head hk0
  const scalar_t* const* vrows;      // [n] V rows, kv head hk0
  const scalar_t** vh;               // [kChunkV] scratch: V rows of one kv head
  const float* qf;                   // [HS * G, D] pre-scaled queries
  float *probs, *m, *l, *acc;        // [QH, kChunkV], [QH], [QH], [QH, D]
};

#if defined(__AVX512F__)
struct Avx512 {
  static __m512 load_row(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_row(const at::BFloat16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static __m512 load_row(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // out[u] = sum of the 16 lanes of v[slot(u)], slot(u) = (u % 4) * 4 + u / 4 (the caller stores
  // key u's partial sums there, so no final permute is needed): four levels of shuffle + add.
  static __m512 sum16(const __m512* v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i) {  // 128-bit lanes: [a0+a2, a1+a3, b0+b2, b1+b3]
      t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    }
    for (int i = 0; i < 4; ++i) {  // lane k: 4 partials of v[4 i + k]
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    }
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44), _mm512_shuffle_ps(u[0], u[1], 0xEE));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_ps(u[2], u[3], 0x44), _mm512_shuffle_ps(u[2], u[3], 0xEE));
    // lane k: [v[k], v[4 + k], v[8 + k], v[12 + k]] summed = out[4k .. 4k + 3] given the slot order
    return _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x88), _mm512_shuffle_ps(w0, w1, 0xDD));
  }

  // scores[j] = q . k_j for the 16 keys of a block (rows[j] of DV vectors; q: DV vectors).
  template <typename scalar_t, int DV>
  static __m512 block_scores(const __m512* q, const scalar_t* const* rows) {
    __m512 part[16];
    for (int u = 0; u < 16; ++u) {
      const scalar_t* k = rows[u];
      __m512 a = _mm512_mul_ps(q[0], load_row(k));
      for (int c = 1; c < DV; ++c) a = _mm512_fmadd_ps(q[c], load_row(k + 16 * c), a);
      part[(u % 4) * 4 + u / 4] = a;
    }
    return sum16(part);
  }

  // acc[g] += sum_j p[g][j] v_j over the n keys of a chunk, for NG query heads (acc: NG x DV
  // vectors at acc + g * 16 * DV, p: rows of kChunkV probabilities at p + g * kChunkV).
  template <typename scalar_t, int DV, int NG>
  static void block_pv(float* acc, const float* p, const scalar_t* const* vrows, int64_t n) {
    __m512 a[NG][DV];
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < DV; ++c) a[g][c] = _mm512_loadu_ps(acc + (g * DV + c) * 16);
    for (int64_t j = 0; j < n; ++j) {
      __m512 v[DV];
      for (int c = 0; c < DV; ++c) v[c] = load_row(vrows[j] + 16 * c);
      for (int g = 0; g < NG; ++g) {
        const __m512 pj = _mm512_set1_ps(p[g * kChunkV + j]);
        for (int c = 0; c < DV; ++c) a[g][c] = _mm512_fmadd_ps(pj, v[c], a[g][c]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < DV; ++c) _mm512_storeu_ps(acc + (g * DV + c) * 16, a[g][c]);
  }

  template <typename scalar_t, int DV, int NG>
  static void heads_pv(float* acc, const float* p, const scalar_t* const* vrows, int64_t n, int64_t heads) {
    // heads <= NG: the group's heads with a compile-time count, so the accumulators stay in registers
    if constexpr (NG > 1) {
      if (heads < NG) return heads_pv<scalar_t, DV, NG - 1>(acc, p, vrows, n, heads);
    }
    block_pv<scalar_t, DV, NG>(acc, p, vrows, n);
  }

  // One online-softmax step over the chunk's keys for every query head of the task.
  template <typename scalar_t, int64_t D>
  static void chunk(ChunkState<scalar_t>& st) {
    constexpr int DV = static_cast<int>(D / 16);
    constexpr int NGMAX = 16 / DV;  // query heads whose accumulators fit 16 registers
    alignas(64) static const scalar_t zero_row[D] = {};
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const int64_t n = st.n, G = st.G;
    const scalar_t* kr[16];
    // scores -> probs[h][0, n); running max / sum; acc rescaled
    for (int64_t hh = 0; hh < st.HS; ++hh) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hh * G + g;
        float* ph = &st.probs[h * kChunkV];
        __m512 qh[DV];
        for (int c = 0; c < DV; ++c) qh[c] = _mm512_loadu_ps(&st.qf[h * D + 16 * c]);
        __m512 mx = _mm512_set1_ps(neg_inf);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t nv = std::min<int64_t>(16, n - j0);
          for (int64_t u = 0; u < 16; ++u) kr[u] = u < nv ? st.krows[j0 + u] + hh * st.skh : zero_row;
          const __mmask16 valid = static_cast<__mmask16>(nv == 16 ? 0xFFFF : (1u << nv) - 1);
          const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(neg_inf), valid, block_scores<scalar_t, DV>(qh, kr));
          _mm512_storeu_ps(ph + j0, sc);
          mx = _mm512_max_ps(mx, sc);
        }
        const float mnew = std::max(st.m[h], _mm512_reduce_max_ps(mx));
        const float corr = st.m[h] == neg_inf ? 0.f : exp_nonpos(st.m[h] - mnew);
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t nv = std::min<int64_t>(16, n - j0);
          const __mmask16 valid = static_cast<__mmask16>(nv == 16 ? 0xFFFF : (1u << nv) - 1);
          const __m512 pr = _mm512_maskz_mov_ps(valid, splitserve::exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(ph + j0), mv)));
          _mm512_storeu_ps(ph + j0, pr);
          sum = _mm512_add_ps(sum, pr);
        }
        st.l[h] = st.l[h] * corr + _mm512_reduce_add_ps(sum);
        st.m[h] = mnew;
        if (corr != 1.f) {
          for (int64_t i = 0; i < D; ++i) st.acc[h * D + i] *= corr;
        }
      }
    }
    // acc[h] += sum_j probs[h][j] v_j, NGMAX heads at a time
    for (int64_t hh = 0; hh < st.HS; ++hh) {
      for (int64_t j = 0; j < n; ++j) st.vh[j] = st.vrows[j] + hh * st.svh;  // kv head hk0 + hh's rows
      for (int64_t g0 = 0; g0 < G; g0 += NGMAX) {
        const int64_t h = hh * G + g0;
        heads_pv<scalar_t, DV, NGMAX>(&st.acc[h * D], &st.probs[h * kChunkV], st.vh, n,
                                      std::min<int64_t>(NGMAX, G - g0));
      }
    }
  }
};
using Simd = Avx512;

#else
struct Avx2 {
  static __m256 load_row(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load_row(const at::BFloat16* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
#if defined(__F16C__)
  static __m256 load_row(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#else
  static __m256 load_row(const at::Half* p) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
    return _mm256_load_ps(f);
  }
#endif

  // out[u] = sum of the 8 lanes of v[u]: three levels of hadd/permute, one fixed tree.
  static __m256 sum8(const __m256* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // [0..3 | 0..3]
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // [4..7 | 4..7]
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  static float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }

  // scores[u] = q . k_u for the 8 keys of a block (q: D floats in L1, rows[u]: D elements).
  template <typename scalar_t, int64_t D>
  static __m256 block_scores(const float* q, const scalar_t* const* rows) {
    __m256 part[8];
    for (int u = 0; u < 8; ++u) {
      const scalar_t* k = rows[u];
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), load_row(k));
      for (int64_t c = 8; c < D; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_row(k + c), a);
      part[u] = a;
    }
    return sum8(part);
  }

  // acc[0, D) += sum_j p[j] v_j over the n keys of a chunk, 64 columns (8 registers) at a time.
  template <typename scalar_t, int64_t D>
  static void head_pv(float* acc, const float* p, const scalar_t* const* vrows, int64_t n) {
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      __m256 a[8];
      for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(acc + c0 + 8 * c);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(pj, load_row(vrows[j] + c0 + 8 * c), a[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(acc + c0 + 8 * c, a[c]);
    }
  }

  // One online-softmax step over the chunk's keys for every query head of the task.
  template <typename scalar_t, int64_t D>
  static void chunk(ChunkState<scalar_t>& st) {
    alignas(32) static const scalar_t zero_row[D] = {};
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int64_t n = st.n, G = st.G;
    const scalar_t* kr[8];
    for (int64_t hh = 0; hh < st.HS; ++hh) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hh * G + g;
        float* ph = &st.probs[h * kChunkV];
        const float* qh = &st.qf[h * D];
        __m256 mx = _mm256_set1_ps(neg_inf);
        for (int64_t j0 = 0; j0 < n; j0 += 8) {
          const int64_t nv = std::min<int64_t>(8, n - j0);
          for (int64_t u = 0; u < 8; ++u) kr[u] = u < nv ? st.krows[j0 + u] + hh * st.skh : zero_row;
          const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nv)), lane));
          const __m256 sc = _mm256_blendv_ps(_mm256_set1_ps(neg_inf), block_scores<scalar_t, D>(qh, kr), valid);
          _mm256_storeu_ps(ph + j0, sc);
          mx = _mm256_max_ps(mx, sc);
        }
        const float mnew = std::max(st.m[h], hmax(mx));
        const float corr = st.m[h] == neg_inf ? 0.f : exp_nonpos(st.m[h] - mnew);
        const __m256 mv = _mm256_set1_ps(mnew);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += 8) {
          const int64_t nv = std::min<int64_t>(8, n - j0);
          const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nv)), lane));
          const __m256 pr = _mm256_and_ps(valid, splitserve::exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(ph + j0), mv)));
          _mm256_storeu_ps(ph + j0, pr);
          sum = _mm256_add_ps(sum, pr);
        }
        st.l[h] = st.l[h] * corr + hsum(sum);
        st.m[h] = mnew;
        if (corr != 1.f) {
          for (int64_t i = 0; i < D; ++i) st.acc[h * D + i] *= corr;
        }
      }
    }
    for (int64_t hh = 0; hh < st.HS; ++hh) {
      for (int64_t j = 0; j < n; ++j) st.vh[j] = st.vrows[j] + hh * st.svh;  // kv head hk0 + hh's rows
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hh * G + g;
        head_pv<scalar_t, D>(&st.acc[h * D], &st.probs[h * kChunkV], st.vh, n);
      }
    }
  }
};
using Simd = Avx2;
#endif

template <typename scalar_t, int64_t D>
void simd_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale_d, int64_t window,
                 at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = H / Hkv, nblk = block_tables.size(1);
  const int64_t slices = head_slices(B, Hkv), HS = Hkv / slices;
  const int64_t QH = HS * G;
  const float scale = static_cast<float>(scale_d);
  constexpr int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));

  const auto& [qp, kp, vp, op, btp, lp, sqb, sqh, skb, skt, skh, svb, svt, svh, sbt, sbc, sob, soh, sl] =
      PagedArgs<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, out);

  // Split-K: a sequence's keys [first, len) are cut at absolute multiples of kSegment and each
  // piece is a task of its own (so one long sequence keeps every thread busy); a sequence cut in
  // several pieces leaves per-piece (max, sum, unnormalised acc) partials that are merged after
  // the parallel part. The cuts depend on positions only, never on the batch or the threads:
  // a sequence's result is the same whatever it is batched with.
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, std::min(lp[b * sl], nblk * bs));
  const int64_t nseg = std::max<int64_t>(1, (max_len + kSegment - 1) / kSegment);  // pieces per (b, slice), at most
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // partials, [B * slices * nseg, QH] (m, l) and [B * slices * nseg, QH, D] (acc); only when a cut exists
  std::vector<float> part_m, part_l, part_acc;
  if (nseg > 1) {
    part_m.assign(B * slices * nseg * QH, neg_inf);
    part_l.assign(B * slices * nseg * QH, 0.f);
    part_acc.assign(B * slices * nseg * QH * D, 0.f);
  }
  struct Piece {
    int64_t b, hk0, len, s0, s1;  // keys [s0, s1) of sequence b (context len), kv heads hk0 ..
    const int64_t* table;
    bool split;  // the sequence spans several pieces: write partials, not out
  };
  // task = (b * slices + slice) * nseg + segment -> its piece; false: the segment is outside the sequence
  auto piece_of = [&](int64_t task, Piece& w) -> bool {
    const int64_t seg = task % nseg, bsl = task / nseg;
    w.b = bsl / slices;
    w.hk0 = (bsl % slices) * HS;
    w.len = lp[w.b * sl];
    w.table = btp + w.b * sbt;
    const int64_t first = window > 0 ? std::max<int64_t>(0, w.len - window) : 0;
    const int64_t seg0 = first / kSegment, seg1 = w.len > first ? (w.len - 1) / kSegment : seg0;
    if (seg < seg0 || seg > seg1) return false;
    w.split = seg1 > seg0;
    w.s0 = std::max(first, seg * kSegment);
    w.s1 = std::max(w.s0, std::min(w.len, (seg + 1) * kSegment));  // s0 == s1: an empty sequence
    return true;
  };
  // the piece's length and pages are valid (else nothing of it may be read)
  auto valid_piece = [&](const Piece& w, int64_t upto) {
    bool ok = w.len >= 0 && w.len <= nblk * bs;
    for (int64_t pg = w.s0 / bs; ok && pg < (upto + bs - 1) / bs; ++pg) {
      ok = w.table[pg * sbc] >= 0 && w.table[pg * sbc] < num_blocks;
    }
    return ok;
  };

  std::atomic<bool> bad_block{false};
  const int64_t ntasks = B * slices * nseg;
  const int64_t per = std::max<int64_t>(1, ntasks / (4 * at::get_num_threads()));
  splitserve::ChunkPool::get().run((ntasks + per - 1) / per, [&](int64_t chunk) {
    const int64_t begin = chunk * per, end = std::min(ntasks, begin + per);
    // per-thread scratch: qf (scaled q) and acc [QH][D], probs [QH][kChunkV], m/l [QH]
    std::vector<float> qf(QH * D), acc(QH * D), probs(QH * kChunkV), m(QH), l(QH);
    std::vector<const scalar_t*> krows(kChunkV), vrows(kChunkV);  // chunk's token rows (kv head hk0)
    std::vector<const scalar_t*> vh(kChunkV);                        // the same V rows at kv head hk0 + hh
    // K/V rows of tokens [from, to) of kv heads hk .. hk + HS of the sequence with this table -> L1
    // (measured on the 2-core EPYC: _MM_HINT_T0 a few % ahead of T1, two chunks ahead no better)
    // token t's row at kv head hk of the cache at `base` (strides sb, st, sh), for the sequence with table tbl
    auto row_at = [&](const scalar_t* base, int64_t sb, int64_t st, int64_t sh, const int64_t* tbl, int64_t hk,
                      int64_t t) { return base + tbl[(t / bs) * sbc] * sb + (t % bs) * st + hk * sh; };
    auto prefetch = [&](const int64_t* tbl, int64_t hk, int64_t from, int64_t to) {
      for (int64_t t = from; t < to; ++t) {
        const char* kn = reinterpret_cast<const char*>(row_at(kp, skb, skt, skh, tbl, hk, t));
        const char* vn = reinterpret_cast<const char*>(row_at(vp, svb, svt, svh, tbl, hk, t));
        for (int64_t hh = 0; hh < HS; ++hh) {
          for (int64_t byte = 0; byte < row_bytes; byte += 64) {
            _mm_prefetch(kn + hh * skh * sizeof(scalar_t) + byte, _MM_HINT_T0);
            _mm_prefetch(vn + hh * svh * sizeof(scalar_t) + byte, _MM_HINT_T0);
          }
        }
      }
    };
    Piece w, w1;
    for (int64_t task = begin; task < end; ++task) {
      if (!piece_of(task, w)) continue;
      if (!valid_piece(w, w.s1)) {
        bad_block = true;
        continue;
      }
      const int64_t b = w.b, hk0 = w.hk0, s1 = w.s1;
      const int64_t* table = w.table;
      for (int64_t h = 0; h < QH; ++h) {
        const scalar_t* src = qp + b * sqb + (hk0 * G + h) * sqh;
        for (int64_t i = 0; i < D; ++i) qf[h * D + i] = static_cast<float>(src[i]) * scale;  // exact widening, one rounding
        m[h] = neg_inf;
        l[h] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = w.s0; t0 < s1; t0 += kChunkV) {
        const int64_t n = std::min(kChunkV, s1 - t0);
        for (int64_t j = 0; j < n; ++j) {
          krows[j] = row_at(kp, skb, skt, skh, table, hk0, t0 + j);
          vrows[j] = row_at(vp, svb, svt, svh, table, hk0, t0 + j);
        }
        // prefetch the next chunk's K/V rows while this one computes: this piece's next
        // chunk, or the next task's first (other pages: the hardware prefetcher would start
        // cold there), only what that task will validate
        if (t0 + kChunkV < s1) {
          prefetch(table, hk0, t0 + kChunkV, std::min(s1, t0 + 2 * kChunkV));
        } else if (task + 1 < end && piece_of(task + 1, w1)) {
          const int64_t upto = std::min(w1.s1, w1.s0 + kChunkV);
          if (valid_piece(w1, upto)) prefetch(w1.table, w1.hk0, w1.s0, upto);
        }
        ChunkState<scalar_t> st{HS, G, n, skh, svh, krows.data(), vrows.data(), vh.data(), qf.data(), probs.data(),
                                m.data(), l.data(), acc.data()};
        Simd::chunk<scalar_t, D>(st);
      }
      if (w.split) {  // partials of piece `task`, merged below
        std::copy(m.begin(), m.end(), part_m.begin() + task * QH);
        std::copy(l.begin(), l.end(), part_l.begin() + task * QH);
        std::copy(acc.begin(), acc.end(), part_acc.begin() + task * QH * D);
        continue;
      }
      for (int64_t h = 0; h < QH; ++h) {
        scalar_t* dst = op + b * sob + (hk0 * G + h) * soh;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // l == 0 only for an empty sequence
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(acc[h * D + i] * inv);
      }
    }
  });
  TORCH_CHECK(!bad_block, "paged_decode: seq_lens exceed block_tables, or a block id is out of range");
  if (nseg == 1) return;
  // merge the pieces of each cut sequence, in segment order: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M)
  std::vector<float> merged(D);
  for (int64_t bsl = 0; bsl < B * slices; ++bsl) {
    Piece w;
    int64_t seg0 = -1, seg1 = -1;  // the sequence's pieces (w: the last one)
    for (int64_t seg = 0; seg < nseg; ++seg) {
      if (piece_of(bsl * nseg + seg, w)) {
        if (seg0 < 0) seg0 = seg;
        seg1 = seg;
      }
    }
    if (seg0 < 0 || seg1 == seg0) continue;  // one piece: written straight to out
    for (int64_t h = 0; h < QH; ++h) {
      float mx = neg_inf;
      for (int64_t seg = seg0; seg <= seg1; ++seg) mx = std::max(mx, part_m[(bsl * nseg + seg) * QH + h]);
      float sum = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t seg = seg0; seg <= seg1; ++seg) {
        const int64_t i = (bsl * nseg + seg) * QH + h;
        if (part_m[i] == neg_inf) continue;  // an empty piece
        const float f = exp_nonpos(part_m[i] - mx);
        sum += part_l[i] * f;
        for (int64_t d = 0; d < D; ++d) merged[d] += part_acc[i * D + d] * f;
      }
      scalar_t* dst = op + w.b * sob + (w.hk0 * G + h) * soh;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(merged[d] * inv);
    }
  }
}
#endif

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                       at::Tensor& out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (q.size(2) == 64) return simd_decode<scalar_t, 64>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
  if (q.size(2) == 128) return simd_decode<scalar_t, 128>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
#endif
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
