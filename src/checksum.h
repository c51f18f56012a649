#pragma once
// Checksums of checkpoint contents (checkpoint.h, docs/checkpoints.md): the
// canonical byte form of metadata values, hashed with detail::checksum64.
#include <gradlora/checkpoint.h>

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace gradlora::detail {

/// Accumulates values in a canonical byte form (a type tag, then the value:
/// integers and doubles as their 8 bytes, strings as length + bytes, lists as
/// count + elements, tensors as their tensor_checksum) and hashes them.
class MetaChecksum {
 public:
  MetaChecksum& add(int64_t v);
  MetaChecksum& add(double v);
  MetaChecksum& add(bool v);
  MetaChecksum& add(const std::string& v);
  MetaChecksum& add(const char* v) { return add(std::string(v)); }
  /// None, bool, int, double, string, tensor and (nested) lists of those; throws
  /// std::invalid_argument naming the type for anything else.
  MetaChecksum& add(const c10::IValue& v);
  uint64_t value() const;

 private:
  void tag(char t);
  void word(uint64_t w);
  std::vector<unsigned char> bytes_;
};

/// A checksum as a checkpoint stores it (an int64 with the same bits) and back.
inline int64_t to_stored(uint64_t h) {
  int64_t s = 0;
  static_assert(sizeof(s) == sizeof(h));
  std::memcpy(&s, &h, sizeof(h));
  return s;
}
inline uint64_t from_stored(int64_t s) {
  uint64_t h = 0;
  std::memcpy(&h, &s, sizeof(h));
  return h;
}

/// "0x0123456789abcdef".
std::string hex(uint64_t h);

}  // namespace gradlora::detail
