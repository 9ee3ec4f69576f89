// The arguments of nthr::native_advantages in one struct (filled in one place, set_advantages_params in
// advantages.cpp), and the scratch and scheduling rules shared by the native ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

// MKL's thread-local thread count (weak: null where torch is built without MKL). MKL called inside a parallel
// team still splits a small GEMM's inner dimension as if it had the process's threads, which changes bits.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace nthr {

// While this lives on a thread, that thread's BLAS calls and ATen ops use one thread, as at a thread count
// of 1 (OpenMP's thread count is a per-thread setting, and at::get_num_threads() reads it).
struct SerialThread {
  int prev_blas = 0, prev_omp = 0;
  SerialThread() {
    if (MKL_Set_Num_Threads_Local) prev_blas = MKL_Set_Num_Threads_Local(1);
#ifdef _OPENMP
    prev_omp = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~SerialThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_blas);
#ifdef _OPENMP
    omp_set_num_threads(prev_omp);
#endif
  }
  SerialThread(const SerialThread&) = delete;
  SerialThread& operator=(const SerialThread&) = delete;
};

// Rows read through an index (weight rows by token id, hidden rows by position) are prefetched this many rows
// ahead, one prefetch per cache line: the hardware prefetcher cannot guess the next row, and the row loops
// waited on memory.
constexpr int64_t kPrefetchRows = 4;

// Scratch is split into kWorkers equal slices whatever the thread count, so every block size (and with it
// every reduction order) depends on the inputs and scratch_elems alone: the same bits at any thread count.
// At most kWorkers threads work at once; each holds at most ~6 float32 buffers of one slice.
constexpr int64_t kWorkers = 8;

// Grow-only float32 scratch from the ATen CPU allocator (memory profilers see it); reused from one work item
// to the next by the same worker, so large buffers are not mapped and faulted in again for every group.
struct Scratch {
  at::Tensor t;
  float* get(int64_t n) {
    n = std::max<int64_t>(n, 1);
    if (!t.defined() || t.numel() < n) t = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    return t.data_ptr<float>();
  }
};

struct AdvantagesParams {
  // Read in place, any floating dtype and strides. hidden [N, d] (packed) or [R, L, d] (padded); exactly one
  // of weight [V, d] (lm_head_weight) and logits (hidden's leading dims, then V) is defined.
  at::Tensor hidden, weight, logits;

  // Canonical token list of the validated batch, [n] each: token t lives at hidden[tok_a[t]] or
  // hidden[tok_a[t], tok_b[t]] (tok_b null when packed); tok_ids[t] its id, tok_resp[t] its response;
  // logprobs[t] its old log-probability (null: log Z from the weight or the logits).
  const int64_t* tok_a = nullptr;
  const int64_t* tok_b = nullptr;
  const int64_t* tok_ids = nullptr;
  const int64_t* tok_resp = nullptr;
  const float* logprobs = nullptr;

  // Per response [n_resp]: group, positive reward, advantage. Per group [n_groups]: active, eta (float64).
  const int64_t* resp_group = nullptr;
  const bool* positive = nullptr;
  const float* adv = nullptr;
  const bool* group_active = nullptr;
  const double* eta = nullptr;

  // Sizes.
  int64_t n_tokens = 0, n_resp = 0, n_groups = 0, d = 0, vocab = 0;

  // Options (validated by nthr_kernels/core/checks.py; the op re-checks what could crash it).
  float temperature = 1.0f;
  double beta = 1.0;
  bool anchor_others = false;  // "others": response i's own tokens leave its own anchor
  bool score_positive = false;  // also score positive tokens (not needed for the threshold)

  // Scratch: float32 elements per worker slice (scratch_elems / kWorkers, at least d).
  int64_t slice = 0;

  // Outputs: scores, selected, token_adv [n]; tau [n_groups] (filled for active groups).
  float* scores = nullptr;
  bool* selected = nullptr;
  float* token_adv = nullptr;
  float* tau = nullptr;

  std::vector<at::Tensor> keep;  // owners of the converted inputs the pointers above point into
};

// The threads for_each_item runs on: torch's thread count, at most kWorkers.
inline int64_t worker_count() { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), kWorkers)); }

// One piece of shared work (Team::share): sub-items 0 .. n-1 of fn, claimed one at a time by the owner and the
// helpers; the first exception stops the claiming and is rethrown by the owner.
struct TeamTask {
  void (*call)(const void* fn, int64_t i, int64_t w) = nullptr;
  const void* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;

  void run(int64_t w) {
    for (int64_t i = next++; i < n; i = next++) {
      try {
        call(fn, i, w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;
      }
    }
  }
};

// The workers of one for_each_item: a worker that has run out of items helps the others with the sub-items they
// share (share() below) until every worker is out of items, so that a long last item does not leave the other
// threads idle (two workers, medium shape: the last group kept one thread waiting 4 to 14 ms of a 90 to 125 ms
// call). Each sub-item runs wholly on one thread and does the same arithmetic whichever thread runs it: sharing
// changes which thread computes a value, never the value.
// Only workers that have started count: a worker that runs late, or never (a thread that could not start, an
// OpenMP team smaller than asked for, which runs two workers one after the other), is never waited for.
class Team {
 public:
  explicit Team(int64_t workers) : slots_(workers), users_(workers) {}

  // Worker starts on the items (before its first).
  void join() { ++busy_; }

  // Workers the team may have.
  int64_t size() const { return static_cast<int64_t>(slots_.size()); }

  // fn(i, x) for every i in [0, n) on the owner w and on any helper x (its worker index).
  template <typename F>
  void share(int64_t w, int64_t n, const F& fn) {
    TeamTask t;
    t.call = [](const void* f, int64_t i, int64_t x) { (*static_cast<const F*>(f))(i, x); };
    t.fn = &fn;
    t.n = n;
    slots_[w].store(&t);
    t.run(w);
    slots_[w].store(nullptr);  // a helper holding users_[w] may still run a sub-item it claimed: wait for it
    while (users_[w].load() > 0) std::this_thread::yield();
    if (t.error) std::rethrow_exception(t.error);
  }

  // Worker w has no item left: run the sub-items the others share until no started worker has an item left.
  void help(int64_t w) {
    --busy_;
    while (busy_.load() > 0) {
      bool worked = false;
      for (size_t s = 0; s < slots_.size(); ++s) {
        if (slots_[s].load(std::memory_order_relaxed) == nullptr) continue;
        ++users_[s];  // before the load: once the owner sees users_ at 0 with its slot empty, no helper holds the task
        if (TeamTask* t = slots_[s].load()) {
          t->run(w);
          worked = true;
        }
        --users_[s];
      }
      if (!worked) std::this_thread::yield();
    }
  }

 private:
  std::atomic<int64_t> busy_{0};
  std::vector<std::atomic<TeamTask*>> slots_;
  std::vector<std::atomic<int64_t>> users_;
};

// The Team and worker index of the for_each_item item running on this thread (null outside one).
inline thread_local Team* tl_team = nullptr;
inline thread_local int64_t tl_worker = 0;

// Whether share() below can hand sub-items to other threads: inside a for_each_item(..., help = true) of more than
// one worker.
inline bool team_shares() { return tl_team != nullptr && tl_team->size() > 1; }

// fn(i, w) for every i in [0, n): on this thread, and on the workers of the running for_each_item that run out of
// items while sub-items are left (w: the worker running sub-item i, whose scratch it may use). fn must give the
// same result for i whichever worker runs it and write nothing another sub-item reads or writes.
template <typename F>
void share(int64_t n, const F& fn) {
  if (n <= 0) return;
  if (n == 1 || !team_shares()) {
    for (int64_t i = 0; i < n; ++i) fn(i, tl_worker);
    return;
  }
  tl_team->share(tl_worker, n, fn);
}

// Runs fn(i, w) for every i in [0, n) on workers w in [0, worker_count()), handing items out one at a time
// (uneven items and busy cores leave no thread idle); with help, a worker out of items then runs sub-items that
// the items still running share() (Team). Each item's bits do not depend on the thread count or on which worker
// ran it: BLAS and ATen run single-threaded inside (SerialThread), as at one thread.
// The workers are the threads of ATen's own pool (one at::parallel_for region; with ATen's OpenMP backend
// that needs this file compiled with -fopenmp, and the runtime is ATen's, found through libtorch_cpu).
// Private threads competed with that pool: OpenMP team threads spin for milliseconds after every parallel
// ATen op (the validation's, the caller's), and the op ran 10-20 % slower and far more variably beside
// them. Only where at::parallel_for is serial here (a compiler without OpenMP) do plain threads run.
template <typename F>
void for_each_item(int64_t n, const F& fn, bool help = false) {
  if (n <= 0) return;
  const int64_t workers = std::min(worker_count(), n);
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  const bool alone = workers <= 1 || at::in_parallel_region(), helping = help && !alone;
  std::optional<Team> team;  // only where workers help
  if (helping) team.emplace(workers);
  auto work = [&](int64_t w) {
    SerialThread serial;
    c10::ParallelGuard guard(true);
    at::internal::ThreadIdGuard tid(static_cast<int>(w));
    Team* const outer_team = tl_team;
    const int64_t outer_worker = tl_worker;
    tl_team = helping ? &*team : nullptr;
    tl_worker = w;
    if (helping) team->join();
    try {
      for (int64_t i = next++; i < n; i = next++) fn(i, w);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = n;  // the other workers stop after their current item
    }
    if (helping) team->help(w);  // sub-items' exceptions reach their owner (Team::share), never here
    tl_team = outer_team;
    tl_worker = outer_worker;
  };
  if (alone) {
    work(0);
  } else {
#ifdef INTRA_OP_PARALLEL
    at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) work(w);
    });
#else
    // A thread that cannot start (std::system_error at a process or cgroup thread limit, or bad_alloc of its
    // state) is not fatal: the items run on the threads that did, the caller's among them, with the same
    // bits. No exception may leave here while a started thread is joinable (std::terminate); reserve()
    // keeps emplace_back from reallocating, so nothing else can throw once the first thread runs.
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(workers - 1));
    for (int64_t w = 1; w < workers; ++w) {
      try {
        pool.emplace_back(work, w);
      } catch (...) {
        break;
      }
    }
    work(0);
    for (auto& t : pool) t.join();
#endif
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace nthr
