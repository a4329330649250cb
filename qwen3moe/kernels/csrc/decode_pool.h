// The decode kernels' fork-join thread pool (included by decode_layer.cc; kernels/build.py hashes
// csrc/*.h into the library's cache key, so editing this file rebuilds the kernels).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include <omp.h>

// A tiny fork-join pool in which the calling thread takes part. OpenMP's barriers wait for every
// team thread, so on a loaded 2-core machine a descheduled thread stalls each of the ~40 parallel
// phases of a decode step; here the caller claims chunks itself and only waits for chunks a
// helper has already started. Helpers spin a while (the next kernel of a step follows within a
// fraction of a millisecond), then sleep. Helpers = omp_get_max_threads() - 1 (OMP_NUM_THREADS is honoured).
class Pool {
 public:
  static Pool &get() {
    // Never destroyed: helpers may still be parked at exit. `pool` is an STB_GNU_UNIQUE symbol, so
    // every kernel library including this header shares one pool, whose helpers run the code of
    // the library that called get() first; kernels/build.py links with -z nodelete so that code
    // is never unmapped under them (a dlclose at exit did that: SIGSEGV after the run).
    static Pool *pool = new Pool();
    return *pool;
  }

  int threads() const { return helpers_ + 1; }

  // fn(i) for every i in [0, n). A second concurrent caller (MindSpore may run independent ops
  // at once) runs its loop alone instead of sharing the helpers.
  template <class F>
  void run(int64_t n, F &&fn) {
    std::unique_lock<std::mutex> mine(run_mu_, std::try_to_lock);
    if (helpers_ == 0 || n <= 1 || !mine.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    Job job;
    job.n = n;
    job.ctx = &fn;
    job.call = [](void *ctx, int64_t i) { (*static_cast<F *>(ctx))(i); };
    job.seq = ++counter_;
    current_.store(&job);
    seq_.store(job.seq);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(&job);
    for (int64_t k = 0; job.done.load() < n; ++k) wait_step(k);
    current_.store(nullptr);
    for (int64_t k = 0; busy_.load() > 0; ++k) wait_step(k);  // no helper still holds &job
  }

 private:
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    uint64_t seq = 0;
    void *ctx = nullptr;
    void (*call)(void *, int64_t) = nullptr;
  };

  Pool() {
    const int t = omp_get_max_threads();
    helpers_ = t > 1 ? t - 1 : 0;
    for (int i = 0; i < helpers_; ++i) std::thread([this] { loop(); }).detach();
  }

  static inline void spin_pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

  // The caller waiting for a chunk a helper started: spin briefly (the chunk usually ends within
  // tens of us), then yield the core each round: under load the helper may have been descheduled
  // mid-chunk, possibly onto the core this caller is spinning on.
  static inline void wait_step(int64_t k) {
    if (k < 4096)
      spin_pause();
    else
      std::this_thread::yield();
  }

  static void work(Job *job) {
    for (int64_t i = job->next.fetch_add(1); i < job->n; i = job->next.fetch_add(1)) {
      job->call(job->ctx, i);
      job->done.fetch_add(1);
    }
  }

  void loop() {
    uint64_t last = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
      for (int64_t k = 1; seq_.load() == last; ++k) {
        spin_pause();
        if (k % 64 == 0 && std::chrono::steady_clock::now() > until) break;
      }
      if (seq_.load() == last) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return seq_.load() != last; });
        sleeping_.fetch_sub(1);
        continue;
      }
      const uint64_t seen = seq_.load();
      busy_.fetch_add(1);
      Job *job = current_.load();  // alive until busy_ drops: its caller waits for that
      if (job != nullptr && job->seq != last) {
        last = job->seq;
        work(job);
      } else if (job == nullptr) {
        last = seen;
      }
      busy_.fetch_sub(1);
    }
  }

  // the next kernel of a decode step starts within this: MindSpore takes ~0.1-0.2 ms between two
  // ops on the 2-core Intel VM, and a helper asleep by then is woken (futex) late for the next op's
  // first phase (a 48-layer b1 step: 1-5% faster than with 50 us, bench/RESULTS.md run 11)
  static const int64_t kSpinUs = 400;
  int helpers_ = 0;
  uint64_t counter_ = 0;
  std::atomic<Job *> current_{nullptr};
  std::atomic<uint64_t> seq_{0};
  std::atomic<int> busy_{0}, sleeping_{0};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
};
