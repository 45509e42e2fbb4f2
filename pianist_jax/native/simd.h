// pianist-jax native kernels: SIMD helpers shared by the kernels.
//
// Two builds of the same sources (pianist_jax/native_kernels.py picks one per CPU): AVX2 + FMA
// (8 float32 lanes) and AVX-512 (16 lanes, 32 registers: twice the arithmetic per instruction
// and room for more independent sums). `Vec` and its helpers are the build's widest vector;
// the 8-lane helpers (load8, hsum) exist in both.
#pragma once

#include <immintrin.h>

#include <cstdint>

// 8 float32 from memory; 8 bfloat16 (their bits as uint16) widened to float32: the high 16
// bits of a float32 are its bfloat16, so the widening is exact.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// The sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// 8 values into the low lanes, the high lanes zero (the tail of a length % 16 == 8 row).
inline Vec vload_low(const float* p) { return _mm512_zextps256_ps512(load8(p)); }
inline Vec vload_low(const uint16_t* p) { return _mm512_zextps256_ps512(load8(p)); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// The 16 lanes folded to 8 (lane i + lane i + 8), for the 8-lane reductions.
inline __m256 fold8(Vec v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#else
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vload(const float* p) { return load8(p); }
inline Vec vload(const uint16_t* p) { return load8(p); }
inline Vec vload_low(const float* p) { return load8(p); }  // never used: rows are % 8
inline Vec vload_low(const uint16_t* p) { return load8(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline __m256 fold8(Vec v) { return v; }
#endif

// The sum of all lanes (the same fixed order for every call).
inline float vsum(Vec v) { return hsum(fold8(v)); }
