// pianist-jax native CPU kernel on AMX (Intel Sapphire Rapids and later):
//   y[M, O] = bf16(x)[M, I] . w[O, I]^T, bfloat16 products summed in float32, M <= 16.
// w is packed once per window by native_kernels.pack_amx into the tile layout
// wp[O / 64][I / 32][4][16][16] (uint32 = two bfloat16 of one weight row; O padded with zero
// rows): tile (g, k, j) is the transpose of the 16 x 16 pairs of weight rows 64g + 16j.. and
// columns 32k.., as TDPBF16PS reads its second operand, and the four tiles one step of the
// loop reads are adjacent (one sequential stream, prefetched kAhead steps ahead).
//
// Why: at batch 8 the decoder's weight products did 8 x 2 flops per weight and were bound by
// arithmetic, not by streaming the weights (AVX-512: ~110 GFLOP/s on 2 cores). One tile
// product does 16 x 16 x 32 multiply-adds, so the rows ride along with the stream: the
// product costs about what reading the bfloat16 weights costs, for 1 row as for 16. The rows
// are rounded to bfloat16 first (so this serves bfloat16 models only, with float32 sums).
// Each output is the same sequence of tile products whatever M is (rows are independent in
// a tile product), so a row's result does not depend on the batch.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct TileConfig {  // the LDTILECFG memory layout (palette 1)
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: four 16-output blocks of sums (M x 16 float32); 4: the rows (M x 32 bfloat16);
// 5-7: weight blocks (16 pairs x 16 outputs)
void configure(int64_t m) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t < 5 ? m : 16);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

constexpr int64_t kAhead = 16;  // prefetch distance in loop steps (4 KiB each), into L2

// Groups of 64 outputs [g0, g1) for all M rows of xb (bfloat16 bits, [M, I]).
void groups(const uint16_t* xb, const uint32_t* wp, float* y, int64_t M, int64_t I, int64_t O,
            int64_t g0, int64_t g1) {
  configure(M);
  const int64_t kb = I / 32, stride = I * 2;
  alignas(64) float c[4][16 * 16];
  for (int64_t g = g0; g < g1; ++g) {
    const uint32_t* w = wp + g * kb * 1024;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < kb; ++k, w += 1024) {
      if (k + kAhead < kb || g + 1 < g1)  // (the next group's first steps follow on)
        for (int64_t line = 0; line < 4096; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w + kAhead * 1024) + line, _MM_HINT_T1);
      _tile_loadd(4, xb + k * 32, stride);
      _tile_loadd(5, w, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, w + 256, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, w + 512, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, w + 768, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    for (int j = 0; j < 4; ++j) {
      const int64_t o = g * 64 + j * 16, cols = std::min<int64_t>(16, O - o);
      for (int64_t m = 0; m < M && cols > 0; ++m)
        std::memcpy(y + m * O + o, c[j] + m * 16, cols * sizeof(float));
    }
  }
  _tile_release();
}

ffi::Error MatVecAmx(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> wp,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = wp.dimensions(), yd = y->dimensions();
  if (wd.size() != 5 || wd[2] != 4 || wd[3] != 16 || wd[4] != 16 || yd.size() != 2)
    return ffi::Error::InvalidArgument("pianist matvec_amx: need wp [O/64, I/32, 4, 16, 16]");
  const int64_t I = wd[1] * 32, M = yd[0], O = yd[1];
  if (M < 1 || M > 16 || x.element_count() != M * I || (O + 63) / 64 != wd[0])
    return ffi::Error::InvalidArgument("pianist matvec_amx: need x [M <= 16, I], y [M, O]");
  thread_local std::vector<uint16_t> xb;  // the rows rounded to bfloat16 (nearest even)
  xb.resize(M * I);
  const float* xp = x.typed_data();
  for (int64_t i = 0; i < M * I; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb.data() + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xp + i)));
  const int64_t n_groups = wd[0];
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  const int64_t parts = std::min(n_groups * I < 8192 ? 1 : threads, n_groups);  // small: 1
  const int64_t chunk = (n_groups + parts - 1) / parts;
  const uint16_t* xs = xb.data();
  run_parts(pool, (n_groups + chunk - 1) / chunk, [&](int64_t t) {
    groups(xs, wp.typed_data(), y->typed_data(), M, I, O, t * chunk,
           std::min(n_groups, (t + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

// Ask Linux for the AMX tile state (once per process); 1 when granted.
extern "C" int PianistAmxInit() {
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistMatVecAmx, MatVecAmx,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
