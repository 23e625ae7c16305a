// XXH3-64 (the default-secret, seedless long-input variant of xxHash 0.8) of KV cache pages,
// optionally fused with copying them: kv_transfer's one-copy shm receiver and its sender.
//
//   xxh3_pages(src [Ns * page_bytes] bytes, src_ids [n], dst [Nd * page_bytes] or null,
//              dst_ids [n] or null, page_bytes, impl) -> uint64
//     = XXH3_64bits(src page src_ids[0] || src page src_ids[1] || ...), the same digest as
//       xxhash.xxh3_64 over those pages concatenated; with dst, page src_ids[i] is also copied
//       to page dst_ids[i] in the same pass: each 64-byte stripe is loaded into a register
//       once, stored to dst from that register and hashed from it, so the digest describes
//       exactly the bytes written (a source changing under the copy cannot verify by
//       accident) and every byte crosses the memory bus once (non-temporal stores when dst is
//       64-byte aligned, so the destination is not read first either).
//   Contract (checked by the caller, xxh3_pages_supported): page_bytes % 64 == 0 and
//   n * page_bytes > 240 (shorter inputs take other XXH3 code paths); ids in range.
//
// The long-input algorithm (xxhash.h, XXH3_hashLong_64b_internal), restated for a stream of
// S = len / 64 stripes (len a multiple of 64): stripe s < S - 1 is accumulated with the secret
// at byte (s % 16) * 8 and, when (s + 1) % 16 == 0, the accumulators are scrambled with the
// secret's last 64 bytes; the last stripe uses the secret at byte 192 - 64 - 7; the result is
// mergeAccs(acc, secret + 11, len * PRIME64_1). (xxhash's blocks are 16 stripes; its "last
// partial block" holds the stripes before the last one, which is why a stream that ends on a
// block boundary is not scrambled after its final block.)
//
// impl: 0 = the best variant compiled in (the build uses -march=native: AVX-512F, else AVX2,
// else scalar), 1 = scalar, 2 = AVX2, 3 = AVX-512F (tests compare every variant the build has
// with xxhash).

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace splitserve {
namespace {

constexpr uint64_t P32_1 = 0x9E3779B1U, P32_2 = 0x85EBCA77U, P32_3 = 0xC2B2AE3DU;
constexpr uint64_t P64_1 = 0x9E3779B185EBCA87ULL, P64_2 = 0xC2B2AE3D27D4EB4FULL, P64_3 = 0x165667B19E3779F9ULL,
                   P64_4 = 0x85EBCA77C2B2AE63ULL, P64_5 = 0x27D4EB2F165667C5ULL;
constexpr size_t STRIPE = 64, STRIPES_PER_BLOCK = 16, SECRET_SIZE = 192, LASTACC_START = 7, MERGEACCS_START = 11;

alignas(64) const uint8_t kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9,
    0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78,
    0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
    0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f,
    0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
    0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff,
    0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
    0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

inline uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian x86
  return v;
}

inline uint64_t mul128_fold64(uint64_t a, uint64_t b) {
  const __uint128_t p = static_cast<__uint128_t>(a) * b;
  return static_cast<uint64_t>(p) ^ static_cast<uint64_t>(p >> 64);
}

uint64_t merge(const uint64_t acc[8], uint64_t len) {
  uint64_t r = len * P64_1;
  const uint8_t* s = kSecret + MERGEACCS_START;
  for (int i = 0; i < 4; i++) r += mul128_fold64(acc[2 * i] ^ read64(s + 16 * i), acc[2 * i + 1] ^ read64(s + 16 * i + 8));
  r ^= r >> 37;
  r *= 0x165667919E3779F9ULL;
  r ^= r >> 32;
  return r;
}

// One contiguous run of the stream: `bytes` bytes from src (and to dst, when not null).
struct Run {
  const uint8_t* src;
  uint8_t* dst;
  size_t bytes;
};

// The stripe loop shared by every variant. V provides: state type A, load(A*, const uint8_t*)
// (-> register R), store(uint8_t*, R, aligned), acc(A&, R, const uint8_t* key), scramble(A&),
// finish(A&, uint64_t out[8]) and init(). The last stripe of the stream is held back (its
// key differs), so the loop always knows whether a stripe is the last.
template <class V>
uint64_t run_stream(const Run* runs, size_t nruns, size_t len) {
  typename V::A a = V::init();
  const size_t stripes = len / STRIPE;
  size_t s = 0;  // stripes accumulated so far
  bool nt = true;
  for (size_t r = 0; r < nruns; r++)
    if (runs[r].dst != nullptr && reinterpret_cast<uintptr_t>(runs[r].dst) % 64 != 0) nt = false;
  for (size_t r = 0; r < nruns; r++) {
    const uint8_t* src = runs[r].src;
    uint8_t* dst = runs[r].dst;
    for (size_t off = 0; off < runs[r].bytes; off += STRIPE) {
      const auto v = V::load(src + off);
      if (dst != nullptr) V::store(dst + off, v, nt);
      if (s + 1 == stripes) {
        V::acc(a, v, kSecret + SECRET_SIZE - STRIPE - LASTACC_START);
      } else {
        V::acc(a, v, kSecret + (s % STRIPES_PER_BLOCK) * 8);
        if ((s + 1) % STRIPES_PER_BLOCK == 0) V::scramble(a);
      }
      s++;
    }
  }
  if (nt) _mm_sfence();  // order the streaming stores before the caller publishes the pages
  alignas(64) uint64_t acc[8];
  V::finish(a, acc);
  return merge(acc, len);
}

struct Scalar {
  struct A {
    uint64_t v[8];
  };
  struct R {
    uint8_t b[64];
  };
  static A init() { return A{{P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1}}; }
  static R load(const uint8_t* p) {
    R r;
    std::memcpy(r.b, p, 64);
    return r;
  }
  static void store(uint8_t* p, const R& r, bool) { std::memcpy(p, r.b, 64); }
  static void acc(A& a, const R& r, const uint8_t* key) {
    for (int i = 0; i < 8; i++) {
      const uint64_t d = read64(r.b + 8 * i);
      const uint64_t dk = d ^ read64(key + 8 * i);
      a.v[i ^ 1] += d;
      a.v[i] += (dk & 0xFFFFFFFFULL) * (dk >> 32);
    }
  }
  static void scramble(A& a) {
    const uint8_t* key = kSecret + SECRET_SIZE - STRIPE;
    for (int i = 0; i < 8; i++) {
      uint64_t x = a.v[i];
      x ^= x >> 47;
      x ^= read64(key + 8 * i);
      x *= P32_1;
      a.v[i] = x;
    }
  }
  static void finish(const A& a, uint64_t out[8]) { std::memcpy(out, a.v, 64); }
};

#if defined(__AVX2__)
struct Avx2 {
  struct A {
    __m256i lo, hi;
  };
  struct R {
    __m256i lo, hi;
  };
  static A init() {
    return A{_mm256_setr_epi64x(P32_3, P64_1, P64_2, P64_3), _mm256_setr_epi64x(P64_4, P32_2, P64_5, P32_1)};
  }
  static R load(const uint8_t* p) {
    return R{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
  }
  static void store(uint8_t* p, const R& r, bool nt) {
    if (nt) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r.lo);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p + 32), r.hi);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r.lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 32), r.hi);
    }
  }
  static __m256i acc1(__m256i a, __m256i d, const uint8_t* key) {
    const __m256i dk = _mm256_xor_si256(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key)));
    const __m256i dk_lo = _mm256_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
    const __m256i prod = _mm256_mul_epu32(dk, dk_lo);
    const __m256i swap = _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
    return _mm256_add_epi64(prod, _mm256_add_epi64(a, swap));
  }
  static void acc(A& a, const R& r, const uint8_t* key) {
    a.lo = acc1(a.lo, r.lo, key);
    a.hi = acc1(a.hi, r.hi, key + 32);
  }
  static __m256i scr1(__m256i a, const uint8_t* key) {
    const __m256i prime = _mm256_set1_epi32(static_cast<int>(P32_1));
    const __m256i x = _mm256_xor_si256(_mm256_xor_si256(a, _mm256_srli_epi64(a, 47)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key)));
    const __m256i hi = _mm256_shuffle_epi32(x, _MM_SHUFFLE(0, 3, 0, 1));
    return _mm256_add_epi64(_mm256_mul_epu32(x, prime), _mm256_slli_epi64(_mm256_mul_epu32(hi, prime), 32));
  }
  static void scramble(A& a) {
    const uint8_t* key = kSecret + SECRET_SIZE - STRIPE;
    a.lo = scr1(a.lo, key);
    a.hi = scr1(a.hi, key + 32);
  }
  static void finish(const A& a, uint64_t out[8]) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a.lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4), a.hi);
  }
};

#endif  // __AVX2__

#if defined(__AVX512F__)
struct Avx512 {
  using A = __m512i;
  using R = __m512i;
  static A init() {
    return _mm512_setr_epi64(P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1);
  }
  static R load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static void store(uint8_t* p, R r, bool nt) {
    if (nt)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
    else
      _mm512_storeu_si512(p, r);
  }
  static void acc(A& a, R d, const uint8_t* key) {
    const __m512i dk = _mm512_xor_si512(d, _mm512_loadu_si512(key));
    const __m512i dk_lo = _mm512_shuffle_epi32(dk, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(0, 3, 0, 1)));
    const __m512i prod = _mm512_mul_epu32(dk, dk_lo);
    const __m512i swap = _mm512_shuffle_epi32(d, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_add_epi64(prod, _mm512_add_epi64(a, swap));
  }
  static void scramble(A& a) {
    const __m512i prime = _mm512_set1_epi32(static_cast<int>(P32_1));
    const __m512i x = _mm512_xor_si512(_mm512_xor_si512(a, _mm512_srli_epi64(a, 47)),
                                       _mm512_loadu_si512(kSecret + SECRET_SIZE - STRIPE));
    const __m512i hi = _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(0, 3, 0, 1)));
    a = _mm512_add_epi64(_mm512_mul_epu32(x, prime), _mm512_slli_epi64(_mm512_mul_epu32(hi, prime), 32));
  }
  static void finish(A a, uint64_t out[8]) { _mm512_storeu_si512(out, a); }
};
#endif  // __AVX512F__

#if defined(__AVX512F__)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif
#if defined(__AVX2__)
constexpr bool kAvx2 = true;
#else
constexpr bool kAvx2 = false;
#endif

}  // namespace

int64_t xxh3_pages_best_impl() { return kAvx512 ? 3 : kAvx2 ? 2 : 1; }

uint64_t xxh3_pages(const uint8_t* src, int64_t src_rows, const std::vector<int64_t>& src_ids, uint8_t* dst,
                    int64_t dst_rows, const std::vector<int64_t>* dst_ids, int64_t page_bytes, int64_t impl) {
  const size_t n = src_ids.size();
  if (page_bytes <= 0 || page_bytes % 64 != 0) throw std::invalid_argument("xxh3_pages: page_bytes must be a positive multiple of 64");
  if (n == 0 || static_cast<uint64_t>(n) * page_bytes <= 240) throw std::invalid_argument("xxh3_pages: needs more than 240 bytes");
  if (dst != nullptr && (dst_ids == nullptr || dst_ids->size() != n))
    throw std::invalid_argument("xxh3_pages: dst_ids must list one destination page per source page");
  if (impl == 0) impl = xxh3_pages_best_impl();
  if (impl < 1 || impl > 3 || (impl == 3 && !kAvx512) || (impl == 2 && !kAvx2))
    throw std::invalid_argument("xxh3_pages: impl " + std::to_string(impl) + " is not available on this CPU");
  // runs of pages consecutive on both sides: one stream segment each
  std::vector<Run> runs;
  runs.reserve(n);
  for (size_t i = 0; i < n; i++) {
    const int64_t s = src_ids[i];
    if (s < 0 || s >= src_rows) throw std::out_of_range("xxh3_pages: source page id " + std::to_string(s) + " out of range");
    int64_t d = 0;
    if (dst != nullptr) {
      d = (*dst_ids)[i];
      if (d < 0 || d >= dst_rows) throw std::out_of_range("xxh3_pages: destination page id " + std::to_string(d) + " out of range");
    }
    const bool extends = i > 0 && s == src_ids[i - 1] + 1 && (dst == nullptr || d == (*dst_ids)[i - 1] + 1);
    if (extends) {
      runs.back().bytes += page_bytes;
    } else {
      runs.push_back(Run{src + s * page_bytes, dst == nullptr ? nullptr : dst + d * page_bytes, static_cast<size_t>(page_bytes)});
    }
  }
  const size_t len = n * static_cast<size_t>(page_bytes);
#if defined(__AVX512F__)
  if (impl == 3) return run_stream<Avx512>(runs.data(), runs.size(), len);
#endif
#if defined(__AVX2__)
  if (impl == 2) return run_stream<Avx2>(runs.data(), runs.size(), len);
#endif
  return run_stream<Scalar>(runs.data(), runs.size(), len);
}

}  // namespace splitserve
