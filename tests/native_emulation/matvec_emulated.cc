// Test-only driver: pianist_jax/native/matvec.cc compiled against the scalar stand-in
// immintrin.h beside this file (-D__AVX512F__ [-D__AVX512BF16__] selects the build's paths),
// run against a float64 reference over row counts, lengths and output ranges that reach every
// block size, tail and prefetch clamp. Prints one line per failure; exits 1 if any.
#include "matvec.cc"

#include <random>
#include <vector>

static int failures = 0;

template <typename X, typename W>
void check(const char* what, int64_t M, int64_t I, int64_t O, int64_t o0, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> xf(M * I), wf(O * I), y(M * O, -7.0f);
  std::vector<W> w(O * I);
  for (auto& v : xf) v = normal(rng);
  for (int64_t i = 0; i < O * I; ++i) {
    float v = normal(rng);
    if constexpr (std::is_same_v<W, uint16_t>) { w[i] = fake::f_to_bf16(v); v = fake::bf16_to_f(w[i]); }
    else w[i] = v;
    wf[i] = v;
  }
  std::vector<X> x(M * I);
  std::vector<float> xr = xf;  // the rows as the kernel multiplies them
  if constexpr (std::is_same_v<X, uint16_t>) {
#if defined(__AVX512BF16__)
    round_bf16(xf.data(), x.data(), M * I);
    for (int64_t i = 0; i < M * I; ++i) xr[i] = fake::bf16_to_f(fake::f_to_bf16(xf[i]));
#endif
  } else {
    x = xf;
  }
  fake::prefetch_lo = reinterpret_cast<const char*>(w.data());
  fake::prefetch_hi = reinterpret_cast<const char*>(w.data() + O * I);
  all_rows<X, W>(x.data(), w.data(), y.data(), M, I, O, o0, O);
  fake::prefetch_lo = fake::prefetch_hi = nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      double want = -7.0;
      if (o >= o0) {
        want = 0;
        for (int64_t i = 0; i < I; ++i) want += double(xr[m * I + i]) * wf[o * I + i];
      }
      const double got = y[m * O + o];
      if (std::abs(got - want) > 1e-5 * std::abs(want) + 1e-5 * std::sqrt(double(I))) {
        if (failures++ < 20)
          std::printf("%s M=%ld I=%ld O=%ld o0=%ld: y[%ld, %ld] = %g, want %g\n", what, long(M),
                      long(I), long(O), long(o0), long(m), long(o), got, want);
      }
    }
}

int main() {
  std::mt19937 rng(0);
  long cases = 0;
  for (int64_t M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 19})
    for (int64_t I : {8, 16, 24, 32, 40, 48, 56, 96, 136})
      for (int64_t O : {1, 2, 3, 5, 8, 13, 30})
        for (int64_t o0 : {int64_t{0}, O / 3}) {
          check<float, float>("float32 weights", M, I, O, o0, rng);
          check<float, uint16_t>("bfloat16 weights, float32 rows", M, I, O, o0, rng);
#if defined(__AVX512BF16__)
          check<uint16_t, uint16_t>("bfloat16 weights, bfloat16 rows", M, I, O, o0, rng);
#endif
          ++cases;
        }
  // the rounding itself: ties to even, both widths of the loop
  std::vector<float> t = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5f, 1e-3f, 3.14159f,
                          1.0f + 1.0f / 512, 65504.0f, -0.0f, 7, 8, 9, 10, 11, 12, 13, 14,
                          1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 1, 2, 3, 4, 5, 6};
#if defined(__AVX512BF16__)
  std::vector<uint16_t> tb(t.size());
  round_bf16(t.data(), tb.data(), int64_t(t.size()));
  const uint16_t want0[] = {0x3F80, 0x3F82};  // 1 + 1/256 ties down to 1, 1 + 3/256 up
  for (int k : {0, 16})
    for (int j = 0; j < 2; ++j)
      if (tb[k + j] != want0[j]) {
        ++failures;
        std::printf("round_bf16[%d] = %#x, want %#x\n", k + j, tb[k + j], want0[j]);
      }
#endif
  std::printf("%ld cases, %ld prefetches, %d failures\n", cases, fake::prefetches, failures);
  return failures ? 1 : 0;
}
