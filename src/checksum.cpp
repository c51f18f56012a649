// The checksum of checkpoint contents: a 64-bit word-wise hash (checkpoint.h).
//
// Definition (docs/checkpoints.md): the input is read as 8-byte little-endian
// words w_0, w_1, ...; the last n mod 8 bytes, if any, form one more word,
// zero-padded. Word j goes to lane j mod 4. Each lane starts at
// seed + (l + 1)·K1 and takes a word as
//
//     h ← rotl((h ⊕ w)·K1, 29)
//
// The lanes are then folded into one value the same way (h ← seed·K2, then
// each lane as a word, in order), the length n is taken as a last word, and
// the result goes through a finaliser of xor-shifts and odd multiplications.
//
// Why a single changed byte always changes the result: for fixed other words,
// each step is a bijection of the word (xor with h, multiplication by an odd
// constant modulo 2^64 and a rotation are all invertible) and of the state
// (same argument), the fold is a bijection of each lane's final state, and the
// finaliser is a bijection. So a change confined to one word — any single
// byte, any bits of one aligned 8-byte group — gives another hash, always, not
// merely with high probability. Four independent lanes keep four
// multiplications in flight: the loop runs at memory speed.
#include "checksum.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <cstring>
#include <stdexcept>

namespace gradlora::detail {

namespace {

constexpr uint64_t kK1 = 0x9E3779B97F4A7C15ull;  // odd: 2^64 / golden ratio
constexpr uint64_t kK2 = 0xD6E8FEB86659FD93ull;  // odd
constexpr uint64_t kK3 = 0xA0761D6478BD642Full;  // odd
constexpr int kRot = 29;
constexpr size_t kLanes = 4;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t mix(uint64_t h, uint64_t w) { return rotl((h ^ w) * kK1, kRot); }

// Little-endian load of 8 bytes, whatever the host's byte order.
inline uint64_t load_le(const unsigned char* p) {
  uint64_t w = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(&w, p, 8);
#else
  for (int i = 7; i >= 0; --i) w = (w << 8) | p[i];
#endif
  return w;
}

}  // namespace

uint64_t checksum64(const void* data, size_t n, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t lane[kLanes];
  for (size_t l = 0; l < kLanes; ++l) lane[l] = seed + (l + 1) * kK1;
  const size_t words = n / 8;
  size_t j = 0;
  for (; j + kLanes <= words; j += kLanes) {
    lane[0] = mix(lane[0], load_le(p + 8 * j));
    lane[1] = mix(lane[1], load_le(p + 8 * j + 8));
    lane[2] = mix(lane[2], load_le(p + 8 * j + 16));
    lane[3] = mix(lane[3], load_le(p + 8 * j + 24));
  }
  for (; j < words; ++j) lane[j % kLanes] = mix(lane[j % kLanes], load_le(p + 8 * j));
  if (const size_t tail = n % 8) {
    unsigned char last[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(last, p + 8 * words, tail);
    lane[words % kLanes] = mix(lane[words % kLanes], load_le(last));
  }
  uint64_t h = seed * kK2;
  for (size_t l = 0; l < kLanes; ++l) h = mix(h, lane[l]);
  h = mix(h, static_cast<uint64_t>(n));
  h ^= h >> 32;
  h *= kK2;
  h ^= h >> 29;
  h *= kK3;
  h ^= h >> 32;
  return h;
}

uint64_t tensor_checksum(const torch::Tensor& t) {
  if (!t.defined()) return checksum64(nullptr, 0, 0x7F);
  // The header: dtype, number of dimensions, sizes.
  std::vector<int64_t> head{static_cast<int64_t>(t.scalar_type()), t.dim()};
  for (const int64_t s : t.sizes()) head.push_back(s);
  const uint64_t seed = checksum64(head.data(), head.size() * sizeof(int64_t), 0);
  // The elements in row-major order, as they lie in memory (a contiguous CPU copy
  // where needed; none for a contiguous CPU tensor).
  const torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
  const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
  return checksum64(bytes ? c.data_ptr() : nullptr, bytes, seed);
}

void MetaChecksum::tag(char t) { bytes_.push_back(static_cast<unsigned char>(t)); }

void MetaChecksum::word(uint64_t w) {
  for (int i = 0; i < 8; ++i) bytes_.push_back(static_cast<unsigned char>(w >> (8 * i)));
}

MetaChecksum& MetaChecksum::add(int64_t v) {
  tag('i');
  word(static_cast<uint64_t>(v));
  return *this;
}

MetaChecksum& MetaChecksum::add(double v) {
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(w));
  tag('d');
  word(w);
  return *this;
}

MetaChecksum& MetaChecksum::add(bool v) {
  tag('b');
  bytes_.push_back(v ? 1 : 0);
  return *this;
}

MetaChecksum& MetaChecksum::add(const std::string& v) {
  tag('s');
  word(v.size());
  bytes_.insert(bytes_.end(), v.begin(), v.end());
  return *this;
}

MetaChecksum& MetaChecksum::add(const c10::IValue& v) {
  if (v.isNone()) {
    tag('n');
  } else if (v.isBool()) {
    add(v.toBool());
  } else if (v.isInt()) {
    add(v.toInt());
  } else if (v.isDouble()) {
    add(v.toDouble());
  } else if (v.isString()) {
    add(v.toStringRef());
  } else if (v.isTensor()) {
    tag('t');
    word(tensor_checksum(v.toTensor()));
  } else if (v.isList()) {
    const auto list = v.toListRef();
    tag('l');
    word(list.size());
    for (const auto& e : list) add(e);
  } else {
    throw std::invalid_argument(fmt::format("values of type {} are not supported", v.tagKind()));
  }
  return *this;
}

uint64_t MetaChecksum::value() const { return checksum64(bytes_.data(), bytes_.size(), 0x4D455441); }

std::string hex(uint64_t h) { return fmt::format("{:#018x}", h); }

}  // namespace gradlora::detail
