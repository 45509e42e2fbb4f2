// pianist-jax native CPU kernel: top-p (nucleus) draws, one per row, by inverse CDF.
//
//   probs [B, n] float32 (a softmax), u [B] uniform in [0, 1), top_p [B] -> index [B] int32
//
// The same rule as render_core.sample's XLA search: the nucleus is every id whose probability
// is >= the largest value v for which the ids >= v hold at least top_p of the mass (ties at v
// all kept; everything when even all ids hold less); the drawn id is the largest m whose kept
// mass below m is <= u * (kept mass), stepped forward to the next kept id if m holds none. Only
// the order of the float32 sums differs, so a draw can differ from XLA's only when a sum lands
// within rounding of its bound.
//
// Why: XLA finds the threshold and the draw by 12 rounds of a 16-way search, each a masked sum
// over [B, 16, n]: for the 5,000 time ids at batch 8, about 2 ms of a 7-8 ms decoding step.
// Here: a 2,048-bucket histogram of the probabilities' top bits, a sort of the one bucket the
// threshold falls in, and two passes for the kept mass and the draw: a few microseconds a row.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;  // probabilities are >= 0, so the bit patterns order like the values
}

int32_t draw(const float* p, int64_t n, float u, float top_p, std::vector<uint32_t>& bucket) {
  constexpr int kShift = 20, kBuckets = 1 << (31 - kShift);
  float mass[kBuckets] = {};
  for (int64_t i = 0; i < n; ++i) mass[bits_of(p[i]) >> kShift] += p[i];
  uint32_t threshold = 0;  // everything, unless some value v gathers top_p above it
  float above = 0.0f;
  bool found = false;
  for (int k = kBuckets - 1; k >= 0 && !found; --k) {
    if (above + mass[k] < top_p) {
      above += mass[k];
      continue;
    }
    bucket.clear();  // the threshold is in bucket k: walk its values from the top
    for (int64_t i = 0; i < n; ++i)
      if ((bits_of(p[i]) >> kShift) == static_cast<uint32_t>(k)) bucket.push_back(bits_of(p[i]));
    std::sort(bucket.begin(), bucket.end(), std::greater<uint32_t>());
    for (size_t j = 0; j < bucket.size() && !found;) {
      float value;
      std::memcpy(&value, &bucket[j], sizeof value);
      size_t e = j;
      for (; e < bucket.size() && bucket[e] == bucket[j]; ++e) above += value;  // ties at once
      if (above >= top_p) threshold = bucket[j], found = true;
      j = e;
    }
    // (not found: the bucket's sum reached top_p but its values, summed one by one, did not
    // quite; carry on below it)
  }
  float kept = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    if (bits_of(p[i]) >= threshold) kept += p[i];
  const float target = u * kept;
  int64_t m = 0;
  float below = 0.0f;  // kept mass of ids < i
  for (int64_t i = 0; i < n && below <= target; ++i) {
    m = i;
    if (bits_of(p[i]) >= threshold) below += p[i];
  }
  if (bits_of(p[m]) >= threshold && p[m] > 0.0f) return static_cast<int32_t>(m);
  for (int64_t i = m; i < n; ++i)  // the next kept id (none: 0, as XLA's argmax of no hits)
    if (bits_of(p[i]) >= threshold && p[i] > 0.0f) return static_cast<int32_t>(i);
  return 0;
}

ffi::Error Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> u,
                  ffi::Buffer<ffi::F32> top_p, ffi::ResultBuffer<ffi::S32> out) {
  const auto d = probs.dimensions();
  if (d.size() != 2 || u.element_count() != d[0] || top_p.element_count() != d[0] ||
      out->element_count() != d[0] || d[1] < 1)
    return ffi::Error::InvalidArgument("pianist sample: need probs [B, n], u [B], top_p [B]");
  const int64_t B = d[0], n = d[1];
  const int64_t parts = std::clamp<int64_t>(pool.num_threads(), 1, B);
  run_parts(pool, parts, [&](int64_t t) {
    thread_local std::vector<uint32_t> bucket;
    for (int64_t b = t; b < B; b += parts)
      out->typed_data()[b] = draw(probs.typed_data() + b * n, n, u.typed_data()[b],
                                  top_p.typed_data()[b], bucket);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PianistSample, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
