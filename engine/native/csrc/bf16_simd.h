// bfloat16 <-> float32 conversions shared by the kernels (linear.cpp, fused_ops.cpp,
// greedy_head.cpp). Widening is exact (bf16 is the top half of a float32); narrowing rounds to
// nearest even and maps NaN to 0x7FC0: c10::BFloat16's conversion, bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace splitserve {

// One bf16 value (its 16 bits) as a float32.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
// 16 bf16 values (16-bit lanes) -> 16 float32 lanes.
inline __m512 widen_bf16x16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 bf16 values at p (unaligned) -> 16 float32 lanes.
inline __m512 load_bf16x16(const void* p) { return widen_bf16x16(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }

// 16 float32 lanes -> 16 bf16 values, rounded to nearest even, NaN -> 0x7FC0.
inline __m256i narrow_bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}
#endif

}  // namespace splitserve
