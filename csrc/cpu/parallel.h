// A minimal parallel-for over [0, n) in contiguous chunks, on std::threads.
#pragma once
#include <cstdint>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

namespace lowtune::cpu {

int num_threads();

// Calls body(begin, end) on up to num_threads() disjoint chunks of [0, n); chunk sizes are
// multiples of `grain` (except the last). Rethrows the first exception a chunk threw.
inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  const int64_t nt = std::min<int64_t>(num_threads(), units);
  if (nt <= 1) { body(0, n); return; }
  const int64_t per = (units + nt - 1) / nt;
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(nt);
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t b = t * per * grain, e = std::min(n, (t + 1) * per * grain);
    if (b >= e) break;
    auto run = [&, t, b, e] { try { body(b, e); } catch (...) { errors[t] = std::current_exception(); } };
    if (t == nt - 1 || (t + 1) * per * grain >= n) run(); else pool.emplace_back(run);
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors) if (err) std::rethrow_exception(err);
}

}  // namespace lowtune::cpu
