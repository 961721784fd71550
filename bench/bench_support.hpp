#pragma once
// Timing helpers shared by the CPU benches.

#include <algorithm>
#include <ctime>
#include <vector>

namespace xqbench {

/// Process CPU time in seconds. The CPU benches are single-threaded, so CPU time is what Google
/// Benchmark's rates use too, and it stays meaningful on a machine shared with other work.
inline double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

/// Median CPU time of `f` over `reps` runs (after one warm-up), in seconds: for baselines
/// measured in the same run as the benchmark they are compared with.
template <class F>
double median_seconds(F&& f, int reps = 5) {
  f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double a = cpu_seconds();
    f();
    t.push_back(cpu_seconds() - a);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace xqbench
