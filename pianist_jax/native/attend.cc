// pianist-jax native CPU kernel: one decoding step of grouped-query attention (AVX2 + FMA, or
// AVX-512 for the two passes over the cache).
//
//   out[B, T, H, D] = softmax_s(mask ? cap * tanh(scale * q . k_s / cap) : -FLT_MAX) . v_s
//   q [B, T, H, D] float32, keys and values [B*KV, S, D] float32 or bfloat16 (both the same;
//   uint16 is read as bfloat16 bits), mask [B, T, S] (bool); all arithmetic in float32.
//
// Why: decoding reads the whole visible cache at every step, so this is a streaming problem.
// XLA:CPU's batched attention products read the caches at about half the speed of streaming
// them, and read the whole buffer although causal decoding only sees the positions up to the
// current one. This kernel stops at the last position any query may see, reads each (batch,
// kv head)'s keys and values once, in memory order, for all its g * T queries, prefetches
// kAhead positions ahead (the hardware prefetcher stops at 4 KiB pages), and splits the
// (batch, kv head) pairs over XLA's intra-op thread pool. bfloat16 caches halve the bytes;
// they are widened to float32 on the fly. Needs D % 16 == 0 (the caller checks).
// A fully masked row attends uniformly, as XLA's softmax over -FLT_MAX does.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// [sum(a[0]), ..., sum(a[7])]
inline __m256 sum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

constexpr int64_t kAhead = 64;  // prefetch distance in positions (32 KiB of float32 rows)
constexpr int kRows = kLanes == 16 ? 8 : 4;  // key rows per logits pass (2 x kRows sums)

// Ask for `bytes` from `p` into L1 (the hardware prefetcher stops at 4 KiB pages).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

inline __m256 exp256(__m256 x) {  // Cephes-style exp, ~1 ulp over the float range
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                              _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline __m256 tanh256(__m256 x) {  // sign(x) * (1 - 2 / (exp(2|x|) + 1))
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 e = exp256(_mm256_add_ps(ax, ax));
  const __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                 _mm256_div_ps(_mm256_set1_ps(2.0f),
                                               _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_or_ps(t, sign);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// logits L[i, s] = q_i . k_s for the G queries qs [G, D] (scaled) and positions [0, end).
template <typename E>
void logits(const float* qs, const E* K, float* L, int64_t G, int64_t D, int64_t end,
            int64_t end8) {
  // 8 positions (8 contiguous key rows) at a time
  int64_t s = 0;
  for (; s + 8 <= end; s += 8) {
    if (s + kAhead + 8 <= end) prefetch(K + (s + kAhead) * D, 8 * D * int64_t{sizeof(E)});
    // two queries x kRows rows = independent sums per pass (full FMA throughput), each key
    // element widened once per query pair
    for (int64_t i0 = 0; i0 < G; i0 += 2) {
      const bool two = i0 + 1 < G;
      const float* q0p = qs + i0 * D;
      const float* q1p = two ? q0p + D : q0p;
      __m256 a0[8], a1[8];
      for (int h = 0; h < 8; h += kRows) {
        Vec x[kRows], y[kRows];
        for (int r = 0; r < kRows; ++r) x[r] = y[r] = vzero();
        const E* k = K + (s + h) * D;
        for (int64_t d = 0; d < D; d += kLanes) {
          const Vec qa = vload(q0p + d), qb = vload(q1p + d);
          for (int r = 0; r < kRows; ++r) {
            const Vec kr = vload(k + r * D + d);
            x[r] = vfma(qa, kr, x[r]);
            y[r] = vfma(qb, kr, y[r]);
          }
        }
        for (int r = 0; r < kRows; ++r) a0[h + r] = fold8(x[r]), a1[h + r] = fold8(y[r]);
      }
      _mm256_storeu_ps(L + i0 * end8 + s, sum8(a0));
      if (two) _mm256_storeu_ps(L + (i0 + 1) * end8 + s, sum8(a1));
    }
  }
  for (; s < end; ++s)
    for (int64_t i = 0; i < G; ++i) {
      Vec a = vzero();
      for (int64_t d = 0; d < D; d += kLanes)
        a = vfma(vload(qs + i * D + d), vload(K + s * D + d), a);
      L[i * end8 + s] = vsum(a);
    }
}

#if defined(__AVX512BF16__)
// bfloat16 keys (the AMX build): the queries rounded to bfloat16 once, then every 32 values of a
// key row are one VDPBF16PS per query, without widening them (the products as XLA's bfloat16
// attention takes them, summed in float32): measured ~1.4x faster per call at batch 8.
inline void logits(const float* qs, const uint16_t* K, float* L, int64_t G, int64_t D,
                   int64_t end, int64_t end8) {
  if (D % 32) return logits<uint16_t>(qs, K, L, G, D, end, end8);
  thread_local std::vector<uint16_t> qv;
  qv.resize(G * D);
  for (int64_t i = 0; i < G * D; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qv.data() + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(qs + i)));
  auto dot = [&](const uint16_t* q, const uint16_t* k) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + d),
                           (__m512bh)_mm512_loadu_si512(k + d));
    return a;
  };
  int64_t s = 0;
  for (; s + 8 <= end; s += 8) {
    if (s + kAhead + 8 <= end) prefetch(K + (s + kAhead) * D, 8 * D * 2);
    for (int64_t i0 = 0; i0 < G; i0 += 2) {
      const bool two = i0 + 1 < G;
      const uint16_t* q0 = qv.data() + i0 * D;
      const uint16_t* q1 = two ? q0 + D : q0;
      __m512 x[8], y[8];
      for (int r = 0; r < 8; ++r) x[r] = y[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh qa = (__m512bh)_mm512_loadu_si512(q0 + d),
                       qb = (__m512bh)_mm512_loadu_si512(q1 + d);
        for (int r = 0; r < 8; ++r) {
          const __m512bh kr = (__m512bh)_mm512_loadu_si512(K + (s + r) * D + d);
          x[r] = _mm512_dpbf16_ps(x[r], qa, kr);
          y[r] = _mm512_dpbf16_ps(y[r], qb, kr);
        }
      }
      __m256 a0[8], a1[8];
      for (int r = 0; r < 8; ++r) a0[r] = fold8(x[r]), a1[r] = fold8(y[r]);
      _mm256_storeu_ps(L + i0 * end8 + s, sum8(a0));
      if (two) _mm256_storeu_ps(L + (i0 + 1) * end8 + s, sum8(a1));
    }
  }
  for (; s < end; ++s)
    for (int64_t i = 0; i < G; ++i) L[i * end8 + s] = vsum(dot(qv.data() + i * D, K + s * D));
}
#endif

// acc[i, :] = sum_s L[i, s] v_s over positions [0, end) (L zero past end, up to end8).
template <typename E>
void weighted_values(const float* L, const E* V, float* acc, int64_t G, int64_t D, int64_t end,
                     int64_t end8) {
  // in memory order: 4 value rows at a time (sequential reads), accumulated
  // into acc [G, D] (L1) for <= 2 queries at a time
  int64_t s4 = 0;
  for (; s4 + 4 <= end; s4 += 4) {
    if (s4 + kAhead + 4 <= end) prefetch(V + (s4 + kAhead) * D, 4 * D * int64_t{sizeof(E)});
    const E* v = V + s4 * D;
    for (int64_t i0 = 0; i0 < G; i0 += 2) {
      const bool two = i0 + 1 < G;
      const float* l0 = L + i0 * end8 + s4;
      const float* l1 = two ? l0 + end8 : l0;
      const Vec p00 = vset1(l0[0]), p01 = vset1(l0[1]), p02 = vset1(l0[2]), p03 = vset1(l0[3]);
      const Vec p10 = vset1(l1[0]), p11 = vset1(l1[1]), p12 = vset1(l1[2]), p13 = vset1(l1[3]);
      float* a0 = acc + i0 * D;
      float* a1 = two ? a0 + D : nullptr;
      for (int64_t c = 0; c < D; c += kLanes) {
        const Vec v0 = vload(v + c), v1 = vload(v + D + c), v2 = vload(v + 2 * D + c),
                  v3 = vload(v + 3 * D + c);
        Vec x = vload(a0 + c);
        x = vfma(p00, v0, x); x = vfma(p01, v1, x);
        x = vfma(p02, v2, x); x = vfma(p03, v3, x);
        vstore(a0 + c, x);
        if (two) {
          Vec y = vload(a1 + c);
          y = vfma(p10, v0, y); y = vfma(p11, v1, y);
          y = vfma(p12, v2, y); y = vfma(p13, v3, y);
          vstore(a1 + c, y);
        }
      }
    }
  }
  for (; s4 < end; ++s4)
    for (int64_t i = 0; i < G; ++i) {
      const Vec p = vset1(L[i * end8 + s4]);
      for (int64_t c = 0; c < D; c += kLanes)
        vstore(acc + i * D + c, vfma(p, vload(V + s4 * D + c), vload(acc + i * D + c)));
    }
}

#if defined(__AVX512BF16__)
// C = D / 32 chunks of 32 values; the sums of two queries stay in 4C registers.
template <int C>
void weighted_values_bf16(const uint16_t* pb, const uint16_t* V, float* acc, int64_t G,
                          int64_t end, int64_t end8) {
  constexpr int64_t D = 32 * C;
  for (int64_t i0 = 0; i0 < G; i0 += 2) {
    const bool two = i0 + 1 < G;
    const uint32_t* p0 = reinterpret_cast<const uint32_t*>(pb + i0 * end8);
    const uint32_t* p1 = two ? p0 + end8 / 2 : p0;
    __m512 lo0[C], hi0[C], lo1[C], hi1[C];
    for (int c = 0; c < C; ++c) lo0[c] = hi0[c] = lo1[c] = hi1[c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < end; s += 2) {  // positions s, s + 1: their values as pairs
      if (s + kAhead + 2 <= end) prefetch(V + (s + kAhead) * D, 2 * D * 2);
      const __m512bh w0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(p0[s / 2]));
      const __m512bh w1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(p1[s / 2]));
      for (int c = 0; c < C; ++c) {
        const __m512i a = _mm512_loadu_si512(V + s * D + 32 * c);
        const __m512i b = s + 1 < end ? _mm512_loadu_si512(V + (s + 1) * D + 32 * c)
                                      : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        lo0[c] = _mm512_dpbf16_ps(lo0[c], w0, lo); hi0[c] = _mm512_dpbf16_ps(hi0[c], w0, hi);
        lo1[c] = _mm512_dpbf16_ps(lo1[c], w1, lo); hi1[c] = _mm512_dpbf16_ps(hi1[c], w1, hi);
      }
    }
    // unpack*_epi16 interleave within 128-bit lanes: dword j of lo holds value 8 (j / 4) + j % 4
    // of the chunk, of hi that + 4
    alignas(64) float t[2][16];
    for (int q = 0; q < (two ? 2 : 1); ++q)
      for (int c = 0; c < C; ++c) {
        _mm512_store_ps(t[0], q ? lo1[c] : lo0[c]);
        _mm512_store_ps(t[1], q ? hi1[c] : hi0[c]);
        float* a = acc + (i0 + q) * D + 32 * c;
        for (int j = 0; j < 16; ++j)
          a[8 * (j / 4) + j % 4] = t[0][j], a[8 * (j / 4) + 4 + j % 4] = t[1][j];
      }
  }
}

// bfloat16 values (the AMX build): the weights rounded to bfloat16, two positions per
// VDPBF16PS (their value rows interleaved), as XLA's bfloat16 attention multiplies them.
inline void weighted_values(const float* L, const uint16_t* V, float* acc, int64_t G, int64_t D,
                            int64_t end, int64_t end8) {
  if (D != 32 && D != 64 && D != 128) return weighted_values<uint16_t>(L, V, acc, G, D, end, end8);
  thread_local std::vector<uint16_t> pb;  // L in bfloat16, end8 (even) per query
  pb.resize(G * end8);
  for (int64_t i = 0; i < G * end8; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(pb.data() + i),
                     (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(L + i)));
  if (D == 32) return weighted_values_bf16<1>(pb.data(), V, acc, G, end, end8);
  if (D == 64) return weighted_values_bf16<2>(pb.data(), V, acc, G, end, end8);
  weighted_values_bf16<4>(pb.data(), V, acc, G, end, end8);
}
#endif

struct Shape { int64_t B, T, H, D, KV, S; };

// One (batch row b, kv head kv): its g * T queries against keys/values [0, end).
template <typename E>
void one_pair(const Shape& sh, int64_t b, int64_t kv, const float* q, const E* keys,
              const E* values, const bool* mask, float* out, float scale, float cap) {
  const int64_t g = sh.H / sh.KV, G = g * sh.T, D = sh.D, S = sh.S;
  const E* K = keys + (b * sh.KV + kv) * S * D;
  const E* V = values + (b * sh.KV + kv) * S * D;
  const bool* mk = mask + b * sh.T * S;
  int64_t end = 0;
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t s = S - 1; s >= end; --s)
      if (mk[t * S + s]) { end = s + 1; break; }
  bool any_blind = false;
  char blind[64];
  for (int64_t t = 0; t < sh.T; ++t) {
    blind[t] = std::none_of(mk + t * S, mk + (t + 1) * S, [](bool v) { return v; });
    any_blind |= blind[t];
  }
  if (any_blind) end = S;
  const int64_t end8 = (end + 7) / 8 * 8;
  thread_local std::vector<float> buf;
  buf.assign(G * end8 + 2 * G * D + G, 0.0f);
  float* L = buf.data();
  float* acc = L + G * end8;
  float* qs = acc + G * D;
  float* total = qs + G * D;
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t j = 0; j < g; ++j)
      for (int64_t d = 0; d < D; ++d)
        qs[(t * g + j) * D + d] = scale * q[((b * sh.T + t) * sh.H + kv * g + j) * D + d];
  logits(qs, K, L, G, D, end, end8);
  // the values' first rows are on their way while the softmax below computes
  prefetch(V, std::min(end, kAhead) * D * int64_t{sizeof(E)});
  for (int64_t i = 0; i < G; ++i) {
    float* li = L + i * end8;
    const bool* mrow = mk + (i / g) * S;
    if (blind[i / g]) {
      std::fill(li, li + end8, 0.0f);
      std::fill(li, li + end, 1.0f);
      total[i] = static_cast<float>(end);
      continue;
    }
    const __m256 lowest = _mm256_set1_ps(-FLT_MAX);
    __m256 mv = lowest;
    for (int64_t s = 0; s < end8; s += 8) {
      __m256 x = _mm256_loadu_ps(li + s);
      if (cap > 0.0f)
        x = _mm256_mul_ps(tanh256(_mm256_mul_ps(x, _mm256_set1_ps(1.0f / cap))),
                          _mm256_set1_ps(cap));
      if (s + 8 <= end) {  // 8 mask bytes at once: hidden positions -> -FLT_MAX
        int64_t bytes;
        std::memcpy(&bytes, mrow + s, 8);
        const __m256i hidden = _mm256_cmpeq_epi32(
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256());
        x = _mm256_blendv_ps(x, lowest, _mm256_castsi256_ps(hidden));
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, x);
        for (int k = 0; k < 8; ++k)
          if (s + k >= end || !mrow[s + k]) tmp[k] = -FLT_MAX;
        x = _mm256_load_ps(tmp);
      }
      _mm256_storeu_ps(li + s, x);
      mv = _mm256_max_ps(mv, x);
    }
    const float m = hmax(mv);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t s = 0; s < end8; s += 8) {
      const __m256 x = _mm256_loadu_ps(li + s);
      __m256 p = exp256(_mm256_sub_ps(x, _mm256_set1_ps(m)));
      p = _mm256_and_ps(p, _mm256_cmp_ps(x, _mm256_set1_ps(-FLT_MAX), _CMP_GT_OQ));
      _mm256_storeu_ps(li + s, p);
      sum = _mm256_add_ps(sum, p);
    }
    total[i] = hsum(sum);
  }
  weighted_values(L, V, acc, G, D, end, end8);
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t i = t * g + j;
      const float inv = 1.0f / total[i];
      float* o = out + ((b * sh.T + t) * sh.H + kv * g + j) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv;
    }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys,
                  ffi::AnyBuffer values, ffi::Buffer<ffi::PRED> mask,
                  ffi::ResultBuffer<ffi::F32> out, float scale, float cap) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument(
        "pianist attend: need q [B,T,H,D], keys [N,S,D], values [N,S,D]");
  const Shape sh{qd[0], qd[1], qd[2], qd[3], kd[0] / qd[0], kd[1]};
  const auto type = keys.element_type();
  if (sh.D % 16 || sh.T > 64 || kd[2] != sh.D || vd[1] != sh.S ||
      vd[2] != sh.D || sh.KV * sh.B != kd[0] || vd[0] != kd[0] || sh.H % sh.KV ||
      mask.element_count() != sh.B * sh.T * sh.S || values.element_type() != type ||
      (type != ffi::F32 && type != ffi::BF16 && type != ffi::U16))
    return ffi::Error::InvalidArgument("pianist attend: inconsistent shapes or types");
  const float* qp = q.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t pairs = sh.B * sh.KV;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, pairs);
  run_parts(pool, threads, [&](int64_t t) {
    for (int64_t p = t; p < pairs; p += threads) {
      if (type != ffi::F32)  // bfloat16, or its bits as uint16
        one_pair(sh, p / sh.KV, p % sh.KV, qp, static_cast<const uint16_t*>(keys.untyped_data()),
                 static_cast<const uint16_t*>(values.untyped_data()), mp, op, scale, cap);
      else
        one_pair(sh, p / sh.KV, p % sh.KV, qp, static_cast<const float*>(keys.untyped_data()),
                 static_cast<const float*>(values.untyped_data()), mp, op, scale, cap);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("cap"));
