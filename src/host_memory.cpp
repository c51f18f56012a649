#include "host_memory.h"

#include <gradlora/optimizer.h>

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

namespace gradlora::detail {

namespace {

std::optional<double> g_override;

/// A number read from the start of a file (cgroup files), or nullopt ("max", missing).
std::optional<double> read_number(const char* path) {
  std::ifstream in(path);
  double v = 0;
  if (!(in >> v)) return std::nullopt;
  return v;
}

}  // namespace

void set_available_host_memory(std::optional<double> bytes) { g_override = bytes; }

std::optional<double> available_host_bytes() {
  if (g_override) return g_override;
  std::optional<double> avail;
  {
    std::ifstream in("/proc/meminfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("MemAvailable:", 0) != 0) continue;
      std::istringstream ss(line.substr(13));
      double kb = 0;
      if (ss >> kb) avail = kb * 1024;
      break;
    }
  }
  if (!avail) {  // no /proc: free pages (fewer than available: page cache not counted)
    const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) avail = static_cast<double>(pages) * static_cast<double>(page);
  }
  // A container's limit is lower than the machine's memory: cgroup v2, then v1.
  std::optional<double> limit = read_number("/sys/fs/cgroup/memory.max");
  std::optional<double> used = read_number("/sys/fs/cgroup/memory.current");
  if (!limit) {
    limit = read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    used = read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  }
  if (limit && used && *limit < 1e18) {  // v1 writes "no limit" as a huge number
    const double left = std::max(0.0, *limit - *used);
    avail = avail ? std::min(*avail, left) : left;
  }
  return avail;
}

}  // namespace gradlora::detail
