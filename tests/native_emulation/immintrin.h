// Test-only stand-in for <immintrin.h>: scalar versions of exactly the intrinsics that
// pianist_jax/native/{simd.h,matvec.cc} use, so their AVX-512 and AVX512-BF16 paths (which
// the CI machine's CPU cannot run) are compiled and checked on any CPU. Every vector type of
// one width is the same byte array, so the kernels' casts between them are copies.
// _mm_prefetch checks that each prefetched address lies inside the buffer the test declares.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

template <int B>
struct FakeVec {
  alignas(64) unsigned char b[B];
  float f(int i) const { float v; std::memcpy(&v, b + 4 * i, 4); return v; }
  void set_f(int i, float v) { std::memcpy(b + 4 * i, &v, 4); }
  uint16_t h(int i) const { uint16_t v; std::memcpy(&v, b + 2 * i, 2); return v; }
  void set_h(int i, uint16_t v) { std::memcpy(b + 2 * i, &v, 2); }
  uint32_t u(int i) const { uint32_t v; std::memcpy(&v, b + 4 * i, 4); return v; }
  void set_u(int i, uint32_t v) { std::memcpy(b + 4 * i, &v, 4); }
};
using __m128 = FakeVec<16>;
using __m128i = FakeVec<16>;
using __m128bh = FakeVec<16>;
using __m256 = FakeVec<32>;
using __m256i = FakeVec<32>;
using __m256d = FakeVec<32>;
using __m256bh = FakeVec<32>;
using __m512 = FakeVec<64>;
using __m512i = FakeVec<64>;
using __m512d = FakeVec<64>;
using __m512bh = FakeVec<64>;
using __mmask32 = uint32_t;
#define _MM_HINT_T0 3

namespace fake {
inline const char* prefetch_lo = nullptr;  // the buffer prefetches must stay inside
inline const char* prefetch_hi = nullptr;
inline long prefetches = 0;
template <int B>
FakeVec<B> load(const void* p) { FakeVec<B> v; std::memcpy(v.b, p, B); return v; }
template <int B>
FakeVec<B> zero() { FakeVec<B> v; std::memset(v.b, 0, B); return v; }
inline float bf16_to_f(uint16_t h) { uint32_t u = uint32_t{h} << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f_to_bf16(float f) {  // nearest even, as VCVTNEPS2BF16 (normal numbers)
  uint32_t u; std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
template <int N>  // N float32 lanes -> N bfloat16
FakeVec<2 * N> cvtneps(const FakeVec<4 * N>& a) {
  FakeVec<2 * N> r; for (int i = 0; i < N; ++i) r.set_h(i, f_to_bf16(a.f(i))); return r;
}
template <int B>
FakeVec<B> fma(const FakeVec<B>& a, const FakeVec<B>& b, const FakeVec<B>& c) {
  FakeVec<B> r; for (int i = 0; i < B / 4; ++i) r.set_f(i, std::fma(a.f(i), b.f(i), c.f(i))); return r;
}
template <int B>
FakeVec<2 * B> widen_u16(const FakeVec<B>& a) {
  FakeVec<2 * B> r; for (int i = 0; i < B / 2; ++i) r.set_u(i, a.h(i)); return r;
}
template <int B>
FakeVec<B> shl32(const FakeVec<B>& a, int n) {
  FakeVec<B> r; for (int i = 0; i < B / 4; ++i) r.set_u(i, a.u(i) << n); return r;
}
template <int B>
FakeVec<B> set1(float x) { FakeVec<B> r; for (int i = 0; i < B / 4; ++i) r.set_f(i, x); return r; }
template <int Out, int In>
FakeVec<Out> part(const FakeVec<In>& a, int offset) {
  FakeVec<Out> r; std::memset(r.b, 0, Out);
  std::memcpy(r.b, a.b + offset, Out < In ? Out : In); return r;
}
}  // namespace fake

inline void _mm_pause() {}
inline void _mm_prefetch(const char* p, int) {
  ++fake::prefetches;
  if (fake::prefetch_lo && (p < fake::prefetch_lo || p >= fake::prefetch_hi)) {
    std::fprintf(stderr, "prefetch outside the weights: %td bytes from their start\n",
                 p - fake::prefetch_lo);
    std::abort();
  }
}
// 128-bit
inline __m128i _mm_loadu_si128(const __m128i* p) { return fake::load<16>(p); }
inline void _mm_storeu_si128(__m128i* p, __m128i v) { std::memcpy(p, v.b, 16); }
inline __m128 _mm_add_ps(__m128 a, __m128 b) {
  __m128 r; for (int i = 0; i < 4; ++i) r.set_f(i, a.f(i) + b.f(i)); return r;
}
inline __m128 _mm_add_ss(__m128 a, __m128 b) { __m128 r = a; r.set_f(0, a.f(0) + b.f(0)); return r; }
inline __m128 _mm_movehl_ps(__m128 a, __m128 b) {
  __m128 r = a; r.set_f(0, b.f(2)); r.set_f(1, b.f(3)); return r;
}
inline __m128 _mm_movehdup_ps(__m128 a) {
  __m128 r; r.set_f(0, a.f(1)); r.set_f(1, a.f(1)); r.set_f(2, a.f(3)); r.set_f(3, a.f(3)); return r;
}
inline float _mm_cvtss_f32(__m128 a) { return a.f(0); }
// 256-bit
inline __m256 _mm256_loadu_ps(const float* p) { return fake::load<32>(p); }
inline __m256i _mm256_loadu_si256(const __m256i* p) { return fake::load<32>(p); }
inline void _mm256_storeu_ps(float* p, __m256 v) { std::memcpy(p, v.b, 32); }
inline void _mm256_storeu_si256(__m256i* p, __m256i v) { std::memcpy(p, v.b, 32); }
inline __m256 _mm256_setzero_ps() { return fake::zero<32>(); }
inline __m256 _mm256_set1_ps(float x) { return fake::set1<32>(x); }
inline __m256 _mm256_fmadd_ps(__m256 a, __m256 b, __m256 c) { return fake::fma(a, b, c); }
inline __m256 _mm256_add_ps(__m256 a, __m256 b) {
  __m256 r; for (int i = 0; i < 8; ++i) r.set_f(i, a.f(i) + b.f(i)); return r;
}
inline __m256i _mm256_cvtepu16_epi32(__m128i a) { return fake::widen_u16(a); }
inline __m256i _mm256_slli_epi32(__m256i a, int n) { return fake::shl32(a, n); }
inline __m256 _mm256_castsi256_ps(__m256i a) { return a; }
inline __m256 _mm256_castpd_ps(__m256d a) { return a; }
inline __m128 _mm256_castps256_ps128(__m256 a) { return fake::part<16>(a, 0); }
inline __m128 _mm256_extractf128_ps(__m256 a, int i) { return fake::part<16>(a, 16 * i); }
inline __m128bh _mm256_cvtneps_pbh(__m256 a) { return fake::cvtneps<8>(a); }
// 512-bit
inline __m512 _mm512_loadu_ps(const float* p) { return fake::load<64>(p); }
inline __m512i _mm512_loadu_si512(const void* p) { return fake::load<64>(p); }
inline __m512i _mm512_maskz_loadu_epi16(__mmask32 k, const void* p) {
  __m512i r = fake::zero<64>();
  for (int i = 0; i < 32; ++i)
    if (k >> i & 1) { uint16_t h; std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2); r.set_h(i, h); }
  return r;
}
inline void _mm512_storeu_ps(float* p, __m512 v) { std::memcpy(p, v.b, 64); }
inline __m512 _mm512_setzero_ps() { return fake::zero<64>(); }
inline __m512 _mm512_set1_ps(float x) { return fake::set1<64>(x); }
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) { return fake::fma(a, b, c); }
inline __m512i _mm512_cvtepu16_epi32(__m256i a) { return fake::widen_u16(a); }
inline __m512i _mm512_slli_epi32(__m512i a, unsigned n) { return fake::shl32(a, int(n)); }
inline __m512 _mm512_castsi512_ps(__m512i a) { return a; }
inline __m512d _mm512_castps_pd(__m512 a) { return a; }
inline __m256 _mm512_castps512_ps256(__m512 a) { return fake::part<32>(a, 0); }
inline __m256d _mm512_extractf64x4_pd(__m512d a, int i) { return fake::part<32>(a, 32 * i); }
inline __m512 _mm512_zextps256_ps512(__m256 a) { return fake::part<64>(a, 0); }
inline __m256bh _mm512_cvtneps_pbh(__m512 a) { return fake::cvtneps<16>(a); }
inline __m512 _mm512_dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {  // as Intel's pseudocode
  __m512 r;
  for (int i = 0; i < 16; ++i) {
    float t = src.f(i) + fake::bf16_to_f(a.h(2 * i + 1)) * fake::bf16_to_f(b.h(2 * i + 1));
    r.set_f(i, t + fake::bf16_to_f(a.h(2 * i)) * fake::bf16_to_f(b.h(2 * i)));
  }
  return r;
}
