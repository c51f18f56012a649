#pragma once
// Private to gradlora and its trainer: the host memory a process can still allocate.
#include <optional>

namespace gradlora::detail {

/// Bytes this process can still allocate on the host: MemAvailable of
/// /proc/meminfo (free pages where there is no /proc), lowered to the cgroup's
/// limit when there is one; nullopt when nothing can be read. A value set with
/// set_available_host_memory() replaces it.
std::optional<double> available_host_bytes();

}  // namespace gradlora::detail
