#pragma once
// What the benchmark programs share beyond their command lines: comma lists, the shape and
// rank lists they parse from them (an entry that does not parse exits with status 2, naming
// the option and the entry), wall-clock timing and medians.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::bench {

/// The non-empty items of s between separators.
inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

[[noreturn]] inline void fail(const std::string& program, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program.c_str(), what.c_str());
  std::exit(2);
}

/// The integer that is the whole of s, if it is at least 1; else 0.
inline int64_t positive(const std::string& s) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    return 0;
  }
  return used == s.size() && v >= 1 ? v : 0;
}

/// "2048x2048,4096x11008" as (rows, columns) pairs.
inline std::vector<std::pair<int64_t, int64_t>> parse_shapes(const std::string& program, const std::string& list) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const std::string& shape : split(list, ',')) {
    const std::vector<std::string> nm = split(shape, 'x');
    const int64_t n = nm.size() == 2 ? positive(nm[0]) : 0, m = nm.size() == 2 ? positive(nm[1]) : 0;
    if (n == 0 || m == 0) fail(program, "--shapes: '" + shape + "' is not NxM with integers N, M >= 1");
    out.emplace_back(n, m);
  }
  if (out.empty()) fail(program, "--shapes: no shape given");
  return out;
}

/// "8,32" as ranks.
inline std::vector<int64_t> parse_ranks(const std::string& program, const std::string& list) {
  std::vector<int64_t> out;
  for (const std::string& r : split(list, ',')) {
    out.push_back(positive(r));
    if (out.back() == 0) fail(program, "--ranks: '" + r + "' is not an integer >= 1");
  }
  if (out.empty()) fail(program, "--ranks: no rank given");
  return out;
}

inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

/// The wall-clock time of fn(), in ms.
template <typename Fn>
double time_ms(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return ms_since(t0);
}

/// The median (the upper one of an even count), 0 for none.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace gradlora::bench
