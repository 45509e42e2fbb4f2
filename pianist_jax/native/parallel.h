// pianist-jax native kernels: split work over XLA's intra-op CPU thread pool.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

// work(0) .. work(parts - 1): part 0 on the calling thread, the others on the pool; returns
// when all are done (so `work` may capture locals by reference).
template <typename F>
void run_parts(xla::ffi::ThreadPool& pool, int64_t parts, const F& work) {
  std::atomic<int64_t> pending{parts - 1};
  for (int64_t t = 1; t < parts; ++t)
    pool.Schedule([&work, &pending, t] {
      work(t);
      pending.fetch_sub(1, std::memory_order_release);
    });
  work(0);
  while (pending.load(std::memory_order_acquire) > 0) _mm_pause();
}
