// pianist-jax native CPU kernel: y[M, O] = x[M, I] . w[O, I]^T (AVX2 + FMA, or AVX-512); x and
// y float32, w float32 or bfloat16 (widened to float32 on the fly: half the bytes to stream).
//
// Why: the renderer's decoder multiplies a few rows (1-16: batch x tokens per step) by each
// weight matrix. XLA:CPU's kernels for 2-8 rows run at half the speed of streaming the
// weights; this one keeps every (weight row, input row) sum in a register while streaming
// contiguous weight rows once for up to 8 input rows; more rows sweep each block of 3
// weight rows (then in L1) by groups of 4 (AVX2) or 8 (AVX-512: 32 registers). Each output
// is the same sequence of fused multiply-adds whatever M is, so a row's result does not
// depend on the batch. Output rows are split over XLA's intra-op thread pool. Built and
// registered by pianist_jax/native_kernels.py (XLA FFI); the caller guarantees I % 8 == 0.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// R weight rows [o, o + R) against M input rows: R * M accumulators (<= 12 of 16 ymm for
// AVX2, <= 24 of 32 zmm for AVX-512, the rest for the loads).
template <typename W, int M, int R>
void block(const float* x, const W* w, float* y, int64_t I, int64_t O, int64_t o) {
  Vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  int64_t k = 0;
  for (; k + kLanes <= I; k += kLanes) {
    for (int r = 0; r < R; ++r) {
      const Vec wv = vload(w + (o + r) * I + k);
      for (int m = 0; m < M; ++m)  // x from L1, as a memory operand of the FMA
        acc[r][m] = vfma(wv, vload(x + m * I + k), acc[r][m]);
    }
  }
  if (k < I) {  // AVX-512 with I % 16 == 8: the last 8 columns in the low lanes
    for (int r = 0; r < R; ++r) {
      const Vec wv = vload_low(w + (o + r) * I + k);
      for (int m = 0; m < M; ++m) acc[r][m] = vfma(wv, vload_low(x + m * I + k), acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(acc[r][m]);
}

template <typename W, int M, int R>
void rows(const float* x, const W* w, float* y, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + R <= o1; o += R) block<W, M, R>(x, w, y, I, O, o);
  for (; o < o1; ++o) block<W, M, 1>(x, w, y, I, O, o);
}

// More than 8 input rows: each block of 3 weight rows is swept by groups of kGroup input rows
// (streamed from memory once, then read from L1).
#if defined(__AVX512F__)
constexpr int kGroup = 8;
#else
constexpr int kGroup = 4;
#endif
template <typename W>
void many_rows(const float* x, const W* w, float* y, int64_t M, int64_t I, int64_t O,
               int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 3 <= o1; o += 3) {
    int64_t m = 0;
    for (; m + kGroup <= M; m += kGroup) block<W, kGroup, 3>(x + m * I, w, y + m * O, I, O, o);
    for (; m < M; ++m) block<W, 1, 3>(x + m * I, w, y + m * O, I, O, o);
  }
  for (; o < o1; ++o)
    for (int64_t m = 0; m < M; ++m) block<W, 1, 1>(x + m * I, w, y + m * O, I, O, o);
}

// Weight rows [o0, o1) for all M input rows.
template <typename W>
void all_rows(const float* x, const W* w, float* y, int64_t M, int64_t I, int64_t O,
              int64_t o0, int64_t o1) {
  switch (M) {  // weight rows per block: as many sums as the registers hold
#if defined(__AVX512F__)
    case 1: return rows<W, 1, 8>(x, w, y, I, O, o0, o1);
    case 2: return rows<W, 2, 8>(x, w, y, I, O, o0, o1);
    case 3: return rows<W, 3, 6>(x, w, y, I, O, o0, o1);
    case 4: return rows<W, 4, 6>(x, w, y, I, O, o0, o1);
    case 5: return rows<W, 5, 4>(x, w, y, I, O, o0, o1);
    case 6: return rows<W, 6, 4>(x, w, y, I, O, o0, o1);
    case 7: return rows<W, 7, 3>(x, w, y, I, O, o0, o1);
    case 8: return rows<W, 8, 3>(x, w, y, I, O, o0, o1);
#else
    case 1: return rows<W, 1, 8>(x, w, y, I, O, o0, o1);
    case 2: return rows<W, 2, 4>(x, w, y, I, O, o0, o1);
    case 3: return rows<W, 3, 3>(x, w, y, I, O, o0, o1);
    case 4: return rows<W, 4, 2>(x, w, y, I, O, o0, o1);
    case 5: return rows<W, 5, 2>(x, w, y, I, O, o0, o1);
    case 6: return rows<W, 6, 2>(x, w, y, I, O, o0, o1);
    case 7: return rows<W, 7, 1>(x, w, y, I, O, o0, o1);
    case 8: return rows<W, 8, 1>(x, w, y, I, O, o0, o1);
#endif
    default: return many_rows<W>(x, w, y, M, I, O, o0, o1);
  }
}

template <typename W>
void run(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t I,
         int64_t O) {
  int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  if (O * I < (int64_t{1} << 16)) threads = 1;  // too small to be worth a hand-off
  const int64_t chunk = ((O + threads - 1) / threads + 23) / 24 * 24;  // whole row blocks
  run_parts(pool, (O + chunk - 1) / chunk, [&](int64_t t) {
    all_rows<W>(x, w, y, M, I, O, t * chunk, std::min(O, (t + 1) * chunk));
  });
}

ffi::Error MatVecT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % 8 != 0 || wd[1] == 0 || x.element_count() % wd[1] != 0 ||
      (w.element_type() != ffi::F32 && w.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(
        "pianist matvec_t: need w [O, I] float32 or bfloat16, I % 8 == 0, x [M, I]");
  const int64_t O = wd[0], I = wd[1], M = x.element_count() / I;
  if (w.element_type() == ffi::BF16)
    run(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(),
        M, I, O);
  else
    run(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(), M,
        I, O);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistMatVecT, MatVecT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
