// The kernels' threads: parallel_for over work items on up to n threads, the caller's included.
// Threads are started per call (a call is milliseconds of work; no pool is kept between calls).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace ctalign::kernels::detail {

constexpr std::int64_t kMinParallelWork = 1 << 17;  // elements below which one thread does the call

// Calls fn(item, thread_index) for every item in [0, n_items) on up to n_threads threads (the
// caller's thread included), items handed out one at a time. Rethrows the first worker exception.
template <class Fn>
void parallel_for(std::int64_t n_items, int n_threads, Fn&& fn) {
  n_threads = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(n_threads, n_items)));
  if (n_threads <= 1) {
    for (std::int64_t i = 0; i < n_items; ++i) fn(i, 0);
    return;
  }
  std::atomic<std::int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int tid) {
    try {
      for (std::int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) fn(i, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n_items);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads - 1);
  try {
    for (int t = 1; t < n_threads; ++t) threads.emplace_back(worker, t);
  } catch (const std::system_error&) {
    // No more threads (a process or system limit): the threads started so far and this one share
    // the items. Leaving a started thread unjoined would std::terminate the process.
  }
  worker(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

// Threads for a call touching total_elements: requested (<= 0: one per hardware thread), or 1 for
// small calls.
inline int thread_count(int requested, std::int64_t total_elements) {
  if (requested <= 0) requested = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (total_elements < kMinParallelWork) return 1;
  return requested;
}

}  // namespace ctalign::kernels::detail
