// A minimal parallel-for over [0, n) in contiguous chunks, on a persistent pool of threads.
//
// The pool's threads are started once (per process, per thread count) and wait between calls,
// so a call costs a wake-up, not a thread start: the kernels are called hundreds of times per
// training step and per decoded token, many of them for well under a millisecond of work.
// The calling thread runs chunks too. A call made while the pool is busy (from a chunk, or from
// a second application thread) runs its chunks on the calling thread instead.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

namespace lowtune::cpu {

int num_threads();

// Runs chunk(c) for every c in [0, chunks), spread over up to num_threads() threads (the
// caller among them). Rethrows the first exception a chunk threw, after every chunk finished.
void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& chunk);

// Calls body(begin, end) on up to num_threads() disjoint chunks of [0, n); chunk sizes are
// multiples of `grain` (except the last), and depend only on n, grain and num_threads().
inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  const int64_t nt = std::min<int64_t>(num_threads(), units);
  if (nt <= 1) { body(0, n); return; }
  const int64_t per = (units + nt - 1) / nt;
  const int64_t chunks = (units + per - 1) / per;
  parallel_chunks(chunks, [&](int64_t t) { body(t * per * grain, std::min(n, (t + 1) * per * grain)); });
}

}  // namespace lowtune::cpu
