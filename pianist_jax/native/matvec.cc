// pianist-jax native CPU kernel: y[M, O] = x[M, I] . w[O, I]^T in float32 (AVX2 + FMA).
//
// Why: the renderer's decoder multiplies a few rows (1-16: batch x tokens per step) by each
// weight matrix. XLA:CPU's kernels for 2-8 rows run at half the speed of streaming the
// weights; this one keeps every (weight row, input row) sum in a register while streaming
// contiguous weight rows once per group of <= 8 input rows. Each output is the same sequence
// of fused multiply-adds whatever M is, so a row's result does not depend on the batch.
// Output rows are split over XLA's intra-op thread pool. Built and registered by
// pianist_jax/native_kernels.py (XLA FFI); the caller guarantees I % 8 == 0.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R weight rows [o, o + R) against M input rows: R * M accumulators (<= 9 + loads in 16 ymm).
template <int M, int R>
void block(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < I; k += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * I + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + (o + r) * I + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * O + o + r] = hsum(acc[r][m]);
}

template <int M, int R>
void rows(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o0,
          int64_t o1) {
  int64_t o = o0;
  for (; o + R <= o1; o += R) block<M, R>(x, w, y, I, O, o);
  for (; o < o1; ++o) block<M, 1>(x, w, y, I, O, o);
}

using RowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

RowsFn rows_for(int64_t m) {
  switch (m) {
    case 1: return rows<1, 8>;
    case 2: return rows<2, 4>;
    case 3: return rows<3, 3>;
    case 4: return rows<4, 2>;
    case 5: return rows<5, 2>;
    case 6: return rows<6, 2>;
    case 7: return rows<7, 1>;
    default: return rows<8, 1>;
  }
}

// Weight rows [o0, o1) for every group of <= 8 input rows.
void all_groups(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O,
                int64_t o0, int64_t o1) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t g = std::min<int64_t>(8, M - m0);
    rows_for(g)(x + m0 * I, w, y + m0 * O, I, O, o0, o1);
  }
}

ffi::Error MatVecT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % 8 != 0 || wd[1] == 0 || x.element_count() % wd[1] != 0)
    return ffi::Error::InvalidArgument("pianist matvec_t: need w [O, I], I % 8 == 0, x [M, I]");
  const int64_t O = wd[0], I = wd[1], M = x.element_count() / I;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  if (O * I < (int64_t{1} << 16)) threads = 1;  // too small to be worth a hand-off
  const int64_t chunk = ((O + threads - 1) / threads + 7) / 8 * 8;
  run_parts(pool, (O + chunk - 1) / chunk, [&](int64_t t) {
    all_groups(xp, wp, yp, M, I, O, t * chunk, std::min(O, (t + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistMatVecT, MatVecT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
