// The threads behind parallel_chunks (parallel.h).
//
// Built with OpenMP (the default where the compiler has it): the chunks run in an OpenMP
// parallel region. PyTorch's CPU build runs its intra-op work on libgomp too, and the loader
// shares one libgomp between torch and this module, so both run on one team of threads. Two
// pools would fight over the cores: after each parallel region libgomp's threads spin (up to
// milliseconds) waiting for the next one, taking a core from any other pool's threads.
//
// Without OpenMP: a persistent pool of std::threads. One job at a time: the caller publishes
// (chunks, function), wakes the workers taking part, claims chunks itself from a shared
// counter, then waits until every worker taking part has finished. Workers spin briefly after a
// job (the next call usually follows within microseconds), then sleep on a futex
// (std::atomic::wait).
//
// Either way chunks are claimed dynamically, so a thread that starts late (the machine is
// busy) finds its share already taken rather than holding everyone up.
#include "parallel.h"

#include <unistd.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LT_PAUSE() _mm_pause()
#else
#define LT_PAUSE() ((void)0)
#endif

namespace lowtune::cpu {
namespace {

#if !defined(_OPENMP)
// Polls before sleeping: about 50-100 µs, longer than the gap between back-to-back kernel calls.
constexpr int kSpins = 2000;

thread_local bool t_in_job = false;  // a chunk is running on this thread: nested calls run inline

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { worker(i); });
    for (auto& t : threads_) t.detach();  // the pool lives until the process ends
  }
  int workers() const { return (int)threads_.size(); }

  // Runs the job with `helpers` workers besides the caller; false (nothing run) when the pool
  // is busy with another caller's job.
  bool try_run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    fn_ = &fn;
    chunks_ = chunks;
    error_ = nullptr;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(helpers, std::memory_order_relaxed);
    // The job word carries the number of workers taking part, so that a worker decides from
    // one atomic load whether (and in which job) it takes part.
    seq_ += 1;
    word_.store((seq_ << 8) | (uint64_t)helpers, std::memory_order_release);
    word_.notify_all();
    work();
    for (int i = 0;; ++i) {
      const int left = pending_.load(std::memory_order_acquire);
      if (left == 0) break;
      if (i < kSpins) LT_PAUSE(); else pending_.wait(left, std::memory_order_acquire);
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t w;
      for (int i = 0;; ++i) {
        w = word_.load(std::memory_order_acquire);
        if (w != seen) break;
        if (i < kSpins) LT_PAUSE(); else word_.wait(seen, std::memory_order_acquire);
      }
      seen = w;
      if (index >= (int)(w & 0xff)) continue;  // not taking part in this job
      work();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_all();
    }
  }

  void work() {
    t_in_job = true;
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks_) break;
      try {
        (*fn_)(c);
      } catch (...) {
        std::lock_guard<std::mutex> g(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    t_in_job = false;
  }

  std::vector<std::thread> threads_;
  std::mutex busy_;
  uint64_t seq_ = 0;
  std::atomic<uint64_t> word_{0};
  std::atomic<int> pending_{0};
  std::atomic<int64_t> next_{0};
  int64_t chunks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// The pool for this process with at least `workers` threads. A forked child has none of its
// parent's threads, so it starts its own (the parent's pool object is left as it is).
Pool* get_pool(int workers) {
  static std::mutex m;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> g(m);
  const pid_t pid = getpid();
  if (!pool || owner != pid || pool->workers() < workers) {
    pool = new Pool(std::min(workers, 255));  // never deleted: its threads run until exit
    owner = pid;
  }
  return pool;
}
#endif

// chunk(c) for every c, on the calling thread; the first exception is rethrown at the end.
void run_serial(int64_t chunks, const std::function<void(int64_t)>& chunk) {
  std::exception_ptr error;
  for (int64_t c = 0; c < chunks; ++c) {
    try {
      chunk(c);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

int g_threads = 0;  // set_num_threads; 0 = the default

}  // namespace

void set_num_threads(int n) { g_threads = n < 0 ? 0 : n; }

// Default: as many threads as torch uses (it sets OpenMP's thread count, to the physical cores
// unless told otherwise), or the hardware's count without OpenMP.
int num_threads() {
  if (g_threads > 0) return g_threads;
#if defined(_OPENMP)
  return std::max(1, omp_get_max_threads());
#else
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
#endif
}

const char* threading_backend() {
#if defined(_OPENMP)
  return "openmp";
#else
  return "threads";
#endif
}

void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& chunk) {
  if (chunks <= 0) return;
  const int threads = (int)std::min<int64_t>(std::min(num_threads(), 256), chunks);
#if defined(_OPENMP)
  if (threads <= 1 || omp_in_parallel()) return run_serial(chunks, chunk);
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) break;
      try {
        chunk(c);
      } catch (...) {  // nothing may leave an OpenMP region
        std::lock_guard<std::mutex> g(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  if (threads > 1 && !t_in_job && get_pool(std::min(num_threads(), 256) - 1)->try_run(chunks, threads - 1, chunk)) return;
  run_serial(chunks, chunk);
#endif
}

}  // namespace lowtune::cpu
