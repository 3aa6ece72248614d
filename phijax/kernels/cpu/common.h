// What phijax's XLA:CPU FFI kernels share: fp32 vectors in GCC's vector extensions (g++
// -march=native picks the width: one AVX-512 register per 16 lanes), a vector exp, and a
// parallel loop over the FFI thread pool. Built by phijax/kernels/cpu_ffi.py.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace phijax_cpu {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads/stores
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

inline v16 splat(float x) { return v16{} + x; }

// exp for x <= 0 (values minus their maximum); 0 below the fp32 range. Cephes' expf polynomial
// after reduction by ln 2, about 1 ulp.
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.0f);
  vi16 under = x < lo;
  x = x < lo ? lo : x;
  v16 n = x * 1.44269504088896341f + 12582912.0f;  // round to nearest by the 1.5 * 2^23 trick
  n = n - 12582912.0f;
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v16 y = p * r * r + r + 1.0f;
  vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  y = y * (v16)e;
  return under ? splat(0.0f) : y;
}

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }

// Row helpers over x[0, n): 16 lanes at a time, then the tail.

inline float row_max(const float* x, int64_t n) {
  v16 m = splat(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 y = load(x + j);
    m = y > m ? y : m;
  }
  float r = -INFINITY;
  for (int v = 0; v < 16; ++v) r = std::max(r, m[v]);
  for (; j < n; ++j) r = std::max(r, x[j]);
  return r;
}

// x[j] = exp(x[j] * scale - sub) in place (sub >= every x[j] * scale); returns their sum.
inline float exp_row(float* x, int64_t n, float scale, float sub) {
  v16 acc = splat(0.0f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 e = vexp(load(x + j) * scale - sub);
    store(x + j, e);
    acc += e;
  }
  float total = 0.0f;
  for (int v = 0; v < 16; ++v) total += acc[v];
  for (; j < n; ++j) total += (x[j] = std::exp(x[j] * scale - sub));
  return total;
}

// sum_j x[j] * y[j]
inline float dot(const float* x, const float* y, int64_t n) {
  v16 acc = splat(0.0f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += load(x + j) * load(y + j);
  float s = 0.0f;
  for (int v = 0; v < 16; ++v) s += acc[v];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// Runs fn(item) for item in [0, n) on the caller and the FFI thread pool. The caller works too
// and waits only for items that started, so a pool busy with the caller's own siblings cannot
// deadlock it.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, fn]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      fn(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

}  // namespace phijax_cpu
