// ChunkPool: runs fn(chunk) for chunk in [0, n) on the calling thread plus helper threads,
// without a barrier that waits for every thread to show up.
//
// Why not at::parallel_for: its OpenMP region ends in a barrier that waits for all threads.
// On a machine shared with other jobs (2 cores, several busy processes) a helper thread is
// often descheduled for a whole time slice (ms), and every one of the ~150 parallel regions
// of a batch-1 decode step can wait for it: measured 220-300 ms steps instead of ~25 ms.
// Here chunks are claimed from a shared counter, and the caller waits only for chunks that
// were claimed: a helper that is not running claims nothing and the caller does its share.
//
// Lifecycle: one process-wide pool, created on first use and never destroyed (its helpers are
// detached; between jobs they spin ~4000 pauses (tens of us: the Python gap between two
// kernels of a step), then sleep in a futex wait). The pool grows to
// at::get_num_threads() - 1 helpers, the largest count seen; with one thread the caller runs
// every chunk inline. After fork() the child has no helpers and the caller runs every chunk.
//
// Invariants: `state` packs (epoch 32 bits | chunks 16 bits | next chunk 16 bits); a chunk is
// claimed by a CAS on it, so a helper holding a stale epoch can never claim a chunk of a later
// job. `fn_` is written before the job's epoch is published (release) and read only after a
// successful claim (acquire), and the caller returns only when all `chunks` are done, so no
// helper runs `fn_` after run() has returned. One job at a time: run() holds `run_lock_`.
// Determinism: which thread runs a chunk varies; what a chunk computes must not depend on it.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPLITSERVE_PAUSE() _mm_pause()
#else
#define SPLITSERVE_PAUSE() ((void)0)
#endif

namespace splitserve {

class ChunkPool {
 public:
  static constexpr int64_t kMaxChunks = 0xFFFF;

  static ChunkPool& get() {
    static ChunkPool* pool = new ChunkPool();  // leaked on purpose: helpers outlive static destructors
    return *pool;
  }

  // Runs fn(c) for every c in [0, chunks) (chunks <= kMaxChunks); returns when all have run.
  void run(int64_t chunks, const std::function<void(int64_t)>& fn) {
    if (chunks <= 0) return;
    const int threads = at::get_num_threads();
    if (threads <= 1 || chunks == 1 || at::in_parallel_region()) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    if (openmp_.load(std::memory_order_relaxed)) {  // see set_openmp: torch's threads are the hot ones
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) fn(c);
      });
      return;
    }
    std::lock_guard<std::mutex> guard(run_lock_);
    ensure_helpers(threads - 1);
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = ++epoch_;
    state_.store((epoch << 32) | (static_cast<uint64_t>(chunks) << 16), std::memory_order_release);
    signal_.fetch_add(1, std::memory_order_release);
    signal_.notify_all();
    work();
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 1024) {
        SPLITSERVE_PAUSE();
      } else {
        std::this_thread::yield();  // a helper was descheduled mid-chunk: let it run
      }
    }
  }

  // Which threads run the next jobs: true (default) torch's OpenMP threads (at::parallel_for,
  // static split, ending in its barrier), false this pool's helpers. It follows the library the
  // step's linears use: NativeKernels.linear (engine/models/layers.py) sets false for a linear
  // it streams through the native kernel and true for one that runs oneDNN / MKL; a model
  // without native linears (MoE, TP shards) keeps the default, as every torch op it runs uses
  // OpenMP. After a oneDNN linear OpenMP's workers spin for a while, and on a 2-core machine a
  // helper of this pool running beside a spinning OpenMP worker gets half a core (measured:
  // paged decode attention 3x slower inside a 64-row decode step than alone). Output never
  // depends on it: a chunk computes the same values on any thread.
  static void set_openmp(bool on) { openmp_.store(on, std::memory_order_relaxed); }
  static bool uses_openmp() { return openmp_.load(std::memory_order_relaxed); }

 private:
  ChunkPool() = default;
  static inline std::atomic<bool> openmp_{true};

  // Claim and run chunks of the current job until none are left.
  void work() {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t n = (s >> 16) & 0xFFFF, next = s & 0xFFFF;
      if (next >= n) return;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*fn_)(static_cast<int64_t>(next));
        done_.fetch_add(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void ensure_helpers(int want) {
    while (helpers_ < want) {
      std::thread([this] { helper_loop(); }).detach();
      ++helpers_;
    }
  }

  void helper_loop() {
    uint32_t seen = signal_.load(std::memory_order_acquire);
    for (;;) {
      for (int spins = 0; spins < 4000 && signal_.load(std::memory_order_acquire) == seen; ++spins) SPLITSERVE_PAUSE();
      signal_.wait(seen, std::memory_order_acquire);  // returns at once if it changed
      seen = signal_.load(std::memory_order_acquire);
      work();
    }
  }

  std::mutex run_lock_;
  int helpers_ = 0;
  uint64_t epoch_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> signal_{0};
};

}  // namespace splitserve
