// pianist-jax native CPU kernel: one decoding step of grouped-query attention, float32 AVX2.
//
//   out[B, T, H, D] = softmax_s(mask ? cap * tanh(scale * q . k_s / cap) : -FLT_MAX) . v_s
//   q [B, T, H, D], keys [B*KV, D, S], values [B*KV, S, D], mask [B, T, S] (bool)
//
// Why: XLA:CPU's batched attention products read the caches at about half the speed of
// streaming them, and read the whole buffer although causal decoding only sees the positions
// up to the current one. This kernel stops at the last position any query may see, streams
// each (batch, kv head)'s keys and values once for all its g * T queries, and splits the
// (batch, kv head) pairs over XLA's intra-op thread pool. Needs D % 16 == 0 (the caller
// checks). A fully masked row attends uniformly, as XLA's softmax over -FLT_MAX does.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Shape {
  int64_t B, T, H, D, KV, S;
};

// One (batch row b, kv head kv): its g * T queries against keys/values [0, end).
void one_pair(const Shape& sh, int64_t b, int64_t kv, const float* q, const float* keys,
              const float* values, const bool* mask, float* out, float scale, float cap) {
  const int64_t g = sh.H / sh.KV, G = g * sh.T, D = sh.D, S = sh.S;
  const float* K = keys + (b * sh.KV + kv) * D * S;
  const float* V = values + (b * sh.KV + kv) * S * D;
  const bool* mk = mask + b * sh.T * S;
  int64_t end = 0;  // one past the last position any of these queries may see
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t s = S - 1; s >= end; --s)
      if (mk[t * S + s]) { end = s + 1; break; }
  std::vector<char> blind(sh.T);  // a query that sees nothing attends uniformly (as XLA does)
  for (int64_t t = 0; t < sh.T; ++t)
    blind[t] = std::none_of(mk + t * S, mk + (t + 1) * S, [](bool v) { return v; });
  if (std::any_of(blind.begin(), blind.end(), [](char v) { return v; })) end = S;
  const int64_t end8 = (end + 7) / 8 * 8;
  thread_local std::vector<float> buf;
  buf.assign(G * end8 + G * D, 0.0f);
  float* L = buf.data();             // [G, end8] logits, then probabilities
  float* acc = L + G * end8;         // [G, D] weighted values
  std::vector<float> qs(G * D);      // the queries, scaled
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t j = 0; j < g; ++j)
      for (int64_t d = 0; d < D; ++d)
        qs[(t * g + j) * D + d] = scale * q[((b * sh.T + t) * sh.H + kv * g + j) * D + d];
  // logits: blocks of 512 positions (G * 2 KiB stay in L1) x all D rows of the keys
  for (int64_t s0 = 0; s0 < end; s0 += 512) {
    const int64_t s1 = std::min(end, s0 + 512);
    for (int64_t d = 0; d < D; ++d) {
      const float* krow = K + d * S;
      for (int64_t i = 0; i < G; ++i) {
        const __m256 c = _mm256_set1_ps(qs[i * D + d]);
        float* li = L + i * end8;
        int64_t s = s0;
        for (; s + 8 <= s1; s += 8)
          _mm256_storeu_ps(li + s, _mm256_fmadd_ps(c, _mm256_loadu_ps(krow + s),
                                                   _mm256_loadu_ps(li + s)));
        for (; s < s1; ++s) li[s] += qs[i * D + d] * krow[s];
      }
    }
  }
  // soft cap, mask, softmax (unnormalised; divided at the end)
  std::vector<float> total(G);
  for (int64_t i = 0; i < G; ++i) {
    float* li = L + i * end8;
    const bool* mrow = mk + (i / g) * S;
    if (blind[i / g]) {
      std::fill(li, li + end8, 0.0f);
      std::fill(li, li + end, 1.0f);
      total[i] = static_cast<float>(end);
      continue;
    }
    float m = -FLT_MAX;
    for (int64_t s = 0; s < end8; s += 8) {
      __m256 x = _mm256_loadu_ps(li + s);
      if (cap > 0.0f)
        x = _mm256_mul_ps(tanh256(_mm256_mul_ps(x, _mm256_set1_ps(1.0f / cap))),
                          _mm256_set1_ps(cap));
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, x);
      for (int k = 0; k < 8; ++k)
        if (s + k >= end || !mrow[s + k]) tmp[k] = -FLT_MAX;
      x = _mm256_load_ps(tmp);
      _mm256_storeu_ps(li + s, x);
      m = std::max(m, hmax(x));
    }
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
  // weighted values: 16 columns (one cache line) per pass over the rows, G <= 4 at a time
  for (int64_t i0 = 0; i0 < G; i0 += 4) {
    const int64_t gi = std::min<int64_t>(4, G - i0);
    for (int64_t c = 0; c < D; c += 16) {
      __m256 a[4][2];
      for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
      for (int64_t s = 0; s < end; ++s) {
        const __m256 v0 = _mm256_loadu_ps(V + s * D + c), v1 = _mm256_loadu_ps(V + s * D + c + 8);
        for (int64_t i = 0; i < gi; ++i) {
          const __m256 p = _mm256_broadcast_ss(L + (i0 + i) * end8 + s);
          a[i][0] = _mm256_fmadd_ps(p, v0, a[i][0]);
          a[i][1] = _mm256_fmadd_ps(p, v1, a[i][1]);
        }
      }
      for (int64_t i = 0; i < gi; ++i) {
        const __m256 inv = _mm256_set1_ps(1.0f / total[i0 + i]);
        _mm256_storeu_ps(acc + (i0 + i) * D + c, _mm256_mul_ps(a[i][0], inv));
        _mm256_storeu_ps(acc + (i0 + i) * D + c + 8, _mm256_mul_ps(a[i][1], inv));
      }
    }
  }
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t j = 0; j < g; ++j)
      std::copy(acc + (t * g + j) * D, acc + (t * g + j + 1) * D,
                out + ((b * sh.T + t) * sh.H + kv * g + j) * D);
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                  ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::PRED> mask,
                  ffi::ResultBuffer<ffi::F32> out, float scale, float cap) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument("pianist attend: need q [B,T,H,D], keys [N,D,S], values [N,S,D]");
  Shape sh{qd[0], qd[1], qd[2], qd[3], kd[0] / qd[0], kd[2]};
  if (sh.D % 16 || kd[1] != sh.D || vd[1] != sh.S || vd[2] != sh.D || sh.KV * sh.B != kd[0] ||
      sh.H % sh.KV || mask.element_count() != sh.B * sh.T * sh.S)
    return ffi::Error::InvalidArgument("pianist attend: inconsistent shapes");
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* vp = values.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t pairs = sh.B * sh.KV;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, pairs);
  run_parts(pool, threads, [&](int64_t t) {
    for (int64_t p = t; p < pairs; p += threads)
      one_pair(sh, p / sh.KV, p % sh.KV, qp, kp, vp, mp, op, scale, cap);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("cap"));
