// pianist-jax native CPU kernel: y[M, O] = x[M, I] . w[O, I]^T (AVX2 + FMA, or AVX-512); x and
// y float32, w float32 or bfloat16 (widened to float32 on the fly: half the bytes to stream).
// Builds with AVX512-BF16 (avx512bf16, amx) take bfloat16 weights without widening: the rows
// are rounded to bfloat16 once per call and every pair of products is one lane of a
// VDPBF16PS, summed in float32 (as XLA's bfloat16 products and the AMX kernel round them);
// at batch 8 the widening float32 path was bound by arithmetic, not by reading the weights.
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
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kAheadBlocks = 2;  // prefetch distance, in blocks of R weight rows

// bfloat16 rows (AVX512-BF16 builds) are held in registers: fewer left for the sums.
template <typename X>
constexpr bool kRowsInRegisters = std::is_same_v<X, uint16_t>;

// R weight rows [o, o + R) against M input rows: R * M accumulators (<= 12 of 16 ymm for
// AVX2, <= 24 of 32 zmm for AVX-512, the rest for the loads), and the same columns of the
// rows kAheadBlocks blocks on prefetched (from memory, 8 rows streamed at 10 GB/s without it,
// 17-18 GB/s with it: the hardware prefetcher fell behind the arithmetic).
// X = float: float32 rows, x read from L1 as the FMA's memory operand, weights widened.
// X = uint16_t (builds with AVX512-BF16, bfloat16 weights): rows already rounded to bfloat16,
// 32 columns of the M rows held in registers, every 32 values of a weight row one VDPBF16PS
// per row, nothing widened (x as a memory operand: 1.45x slower with the weights in cache,
// the loads were the bottleneck).
template <typename X, typename W, int M, int R>
void block(const X* x, const W* w, float* y, int64_t I, int64_t O, int64_t o) {
  Vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  const W* ahead = w + std::min(o + kAheadBlocks * R, O - R) * I;  // the last block: itself
  auto prefetch = [&](int64_t k) {
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + r * I + k), _MM_HINT_T0);
  };
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (kRowsInRegisters<X>) {
    for (; k + 32 <= I; k += 32) {
      prefetch(k);
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * I + k);
      for (int r = 0; r < R; ++r) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (o + r) * I + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    if (k < I) {  // the last 8, 16 or 24 columns (zeros past the row add nothing)
      const __mmask32 tail = (__mmask32)((1u << (I - k)) - 1);
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * I + k);
      for (int r = 0; r < R; ++r) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (o + r) * I + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
  } else
#endif
  {
    for (; k + kLanes <= I; k += kLanes) {
      prefetch(k);
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
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(acc[r][m]);
}

template <typename X, typename W, int M, int R>
void rows(const X* x, const W* w, float* y, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + R <= o1; o += R) block<X, W, M, R>(x, w, y, I, O, o);
  for (; o < o1; ++o) block<X, W, M, 1>(x, w, y, I, O, o);
}

// More than 8 input rows: each block of 3 weight rows (2 when the rows are held in registers)
// is swept by groups of kGroup input rows (streamed from memory once, then read from L1).
#if defined(__AVX512F__)
constexpr int kGroup = 8;
#else
constexpr int kGroup = 4;
#endif
template <typename X, typename W>
void many_rows(const X* x, const W* w, float* y, int64_t M, int64_t I, int64_t O,
               int64_t o0, int64_t o1) {
  constexpr int R = kRowsInRegisters<X> ? 2 : 3;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    int64_t m = 0;
    for (; m + kGroup <= M; m += kGroup)
      block<X, W, kGroup, R>(x + m * I, w, y + m * O, I, O, o);
    for (; m < M; ++m) block<X, W, 1, R>(x + m * I, w, y + m * O, I, O, o);
  }
  for (; o < o1; ++o)
    for (int64_t m = 0; m < M; ++m) block<X, W, 1, 1>(x + m * I, w, y + m * O, I, O, o);
}

// Weight rows [o0, o1) for all M input rows.
template <typename X, typename W>
void all_rows(const X* x, const W* w, float* y, int64_t M, int64_t I, int64_t O,
              int64_t o0, int64_t o1) {
  switch (M) {  // weight rows per block: as many sums as the registers hold
#if defined(__AVX512F__)
    case 1: return rows<X, W, 1, 8>(x, w, y, I, O, o0, o1);
    case 2: return rows<X, W, 2, 8>(x, w, y, I, O, o0, o1);
    case 3: return rows<X, W, 3, 6>(x, w, y, I, O, o0, o1);
    case 4: return rows<X, W, 4, kRowsInRegisters<X> ? 5 : 6>(x, w, y, I, O, o0, o1);
    case 5: return rows<X, W, 5, 4>(x, w, y, I, O, o0, o1);
    case 6: return rows<X, W, 6, kRowsInRegisters<X> ? 3 : 4>(x, w, y, I, O, o0, o1);
    case 7: return rows<X, W, 7, 3>(x, w, y, I, O, o0, o1);
    case 8: return rows<X, W, 8, kRowsInRegisters<X> ? 2 : 3>(x, w, y, I, O, o0, o1);
#else
    case 1: return rows<X, W, 1, 8>(x, w, y, I, O, o0, o1);
    case 2: return rows<X, W, 2, 4>(x, w, y, I, O, o0, o1);
    case 3: return rows<X, W, 3, 3>(x, w, y, I, O, o0, o1);
    case 4: return rows<X, W, 4, 2>(x, w, y, I, O, o0, o1);
    case 5: return rows<X, W, 5, 2>(x, w, y, I, O, o0, o1);
    case 6: return rows<X, W, 6, 2>(x, w, y, I, O, o0, o1);
    case 7: return rows<X, W, 7, 1>(x, w, y, I, O, o0, o1);
    case 8: return rows<X, W, 8, 1>(x, w, y, I, O, o0, o1);
#endif
    default: return many_rows<X, W>(x, w, y, M, I, O, o0, o1);
  }
}

template <typename X, typename W>
void run(ffi::ThreadPool& pool, const X* x, const W* w, float* y, int64_t M, int64_t I,
         int64_t O) {
  int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  if (O * I < (int64_t{1} << 16)) threads = 1;  // too small to be worth a hand-off
  const int64_t chunk = ((O + threads - 1) / threads + 23) / 24 * 24;  // whole row blocks
  run_parts(pool, (O + chunk - 1) / chunk, [&](int64_t t) {
    all_rows<X, W>(x, w, y, M, I, O, t * chunk, std::min(O, (t + 1) * chunk));
  });
}

#if defined(__AVX512BF16__)
// n (% 8 == 0) float32 to bfloat16, rounded to nearest even (VCVTNEPS2BF16).
void round_bf16(const float* x, uint16_t* xb, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  for (; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xb + i),
                     (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(x + i)));
}
#endif

ffi::Error MatVecT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % 8 != 0 || wd[1] == 0 || x.element_count() % wd[1] != 0 ||
      (w.element_type() != ffi::F32 && w.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(
        "pianist matvec_t: need w [O, I] float32 or bfloat16, I % 8 == 0, x [M, I]");
  const int64_t O = wd[0], I = wd[1], M = x.element_count() / I;
  if (w.element_type() == ffi::BF16) {
    const auto* wb = static_cast<const uint16_t*>(w.untyped_data());
#if defined(__AVX512BF16__)
    thread_local std::vector<uint16_t> xb;  // the rows rounded to bfloat16
    xb.resize(M * I);
    round_bf16(x.typed_data(), xb.data(), M * I);
    run(pool, static_cast<const uint16_t*>(xb.data()), wb, y->typed_data(), M, I, O);
#else
    run(pool, x.typed_data(), wb, y->typed_data(), M, I, O);
#endif
  }
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
