// Checksums of checkpoints: the hash's guarantee, damaged tensors and metadata
// named in the error, and one flipped byte at hundreds of places spread over
// every record of a checkpoint file — each load is refused or restores the
// undamaged state exactly, never changed data.
#include "ckpt_util.h"

#include <gradlora/checkpoint.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <set>

#include <sys/wait.h>
#include <unistd.h>

namespace gradlora::ckpt_test {
namespace {

namespace fs = std::filesystem;

// ------------------------------------------------------------- the hash

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

// Every single-byte change (all 255 other values at a few positions, one other
// value at every position) changes the hash, for lengths with every tail size.
TEST(Checksum, EverySingleByteChangeChangesTheHash) {
  for (size_t n :
       {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{31}, size_t{32}, size_t{33}, size_t{100}, size_t{1027}}) {
    SCOPED_TRACE(n);
    const std::string base = random_bytes(n, static_cast<uint32_t>(n));
    const uint64_t h = detail::checksum64(base.data(), base.size());
    std::set<uint64_t> seen{h};
    for (size_t i = 0; i < n; ++i) {
      std::string s = base;
      s[i] = static_cast<char>(s[i] ^ static_cast<char>(1 + i % 255));
      const uint64_t g = detail::checksum64(s.data(), s.size());
      EXPECT_NE(g, h) << "byte " << i;
      seen.insert(g);
    }
    EXPECT_EQ(seen.size(), n + 1) << "two different single-byte changes collide";
    for (size_t i : {size_t{0}, n / 2, n - 1}) {
      for (int x = 1; x < 256; ++x) {
        std::string s = base;
        s[i] = static_cast<char>(s[i] ^ x);
        EXPECT_NE(detail::checksum64(s.data(), s.size()), h) << "byte " << i << " xor " << x;
      }
    }
  }
}

// Bits that a plain multiply-xor would cancel (the top bit of two consecutive
// words of one lane), the length, the seed and zeroed blocks all count.
TEST(Checksum, CancellingPatternsLengthAndSeedChangeTheHash) {
  const std::string base = random_bytes(256, 5);
  const uint64_t h = detail::checksum64(base.data(), base.size());
  std::string s = base;
  s[7] = static_cast<char>(s[7] ^ 0x80);    // bit 63 of word 0 (lane 0)
  s[39] = static_cast<char>(s[39] ^ 0x80);  // bit 63 of word 4 (lane 0 again)
  EXPECT_NE(detail::checksum64(s.data(), s.size()), h);
  const std::string zeros(64, '\0');
  EXPECT_NE(detail::checksum64(zeros.data(), 64), detail::checksum64(zeros.data(), 63));
  EXPECT_NE(detail::checksum64(base.data(), 256, 1), h);
  std::string z = base;
  std::memset(&z[96], 0, 64);  // the damage: 64 bytes zeroed
  EXPECT_NE(detail::checksum64(z.data(), z.size()), h);
}

TEST(Checksum, TensorChecksumCoversDtypeShapeAndLayout) {
  const torch::Tensor t = torch::arange(12, torch::kFloat).reshape({3, 4});
  const uint64_t h = detail::tensor_checksum(t);
  EXPECT_EQ(detail::tensor_checksum(t.clone()), h);
  EXPECT_EQ(detail::tensor_checksum(t.t().contiguous().t()), h) << "the same values in another memory layout";
  EXPECT_NE(detail::tensor_checksum(t.reshape({4, 3})), h);
  EXPECT_NE(detail::tensor_checksum(t.view(torch::kInt)), h);
  torch::Tensor u = t.clone();
  u[2][3] = std::nextafter(11.0f, 12.0f);
  EXPECT_NE(detail::tensor_checksum(u), h);
  torch::Tensor z = t.clone();
  z[0][0] = -0.0f;  // equal to 0.0 as a number, not as bytes
  EXPECT_NE(detail::tensor_checksum(z), h);
}

// ------------------------------------------------ a checkpoint under test

const char* kYaml =
    "seed: 7\noptimizer:\n  type: adamw\n  lr: 0.01\n  weight_decay: 0.05\ntargets:\n"
    "  - match: \"fc1.weight\"\n    method: lora\n    rank: 3\n    init: symmetric\n"
    "  - match: \"fc2.weight\"\n    method: random\n    rank: 2\n    resample_every: 5\n"
    "  - match: \"*.bias\"\n    method: full\n";

CheckpointExtras trainer_like_extras() {
  return {{"step", c10::IValue(int64_t{3})},
          {"loss_sum", c10::IValue(1.625)},
          {"hash", c10::IValue(std::string("5e1f"))},
          {"metrics", c10::IValue(std::string("step,loss\n1,0.9\n2,0.8\n"))}};
}

// Writes a small checkpoint (3 steps of kYaml) with trainer-like extras.
void write_checkpoint(const std::string& path) {
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  train(net, opt, 0, 3);
  save_checkpoint(opt, *net, path, trainer_like_extras());
}

// Everything a load restores, as raw bytes by name: parameters, buffers, every
// optimizer state tensor (with dtype and shape), step and skipped counts,
// learning rates, extras.
std::map<std::string, std::string> restored_bytes(LowRankOptimizer& opt, const torch::nn::Module& net,
                                                  const CheckpointExtras& extras) {
  std::map<std::string, std::string> out;
  auto put = [&](const std::string& name, const torch::Tensor& t) {
    const torch::Tensor c = t.detach().cpu().contiguous();
    std::string b = fmt::format("{} [{}] ", c10::toString(c.scalar_type()), fmt::join(c.sizes(), ","));
    b.append(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
    out[name] = b;
  };
  for (const auto& p : net.named_parameters()) put("param." + p.key(), p.value());
  for (const auto& b : net.named_buffers()) put("buffer." + b.key(), b.value());
  for (const auto& name : opt.names()) {
    for (const auto& kv : opt.state_tensors(name)) put("state." + name + "." + kv.first, kv.second);
  }
  for (const auto& name : opt.names()) {
    if (opt.method_of(name) != Method::frozen) {
      put("steps." + name, torch::tensor(opt.projector(name).steps(), torch::kLong));
    }
  }
  put("step_count", torch::tensor(opt.step_count(), torch::kLong));
  put("skipped_count", torch::tensor(opt.skipped_count(), torch::kLong));
  std::vector<double> lrs;
  for (const auto& g : opt.param_groups()) lrs.push_back(g.options().get_lr());
  put("lrs", torch::tensor(lrs, torch::kDouble));
  for (const auto& [k, v] : extras) {
    std::string b = v.tagKind() + " ";
    if (v.isInt()) {
      b += std::to_string(v.toInt());
    } else if (v.isDouble()) {
      const double d = v.toDouble();
      b.append(reinterpret_cast<const char*>(&d), sizeof(d));
    } else if (v.isString()) {
      b += v.toStringRef();
    } else {
      b += "?";
    }
    out["extra." + k] = b;
  }
  return out;
}

// What the trainer does on --resume: the extras, then the model and optimizer,
// into a fresh model (other initial weights) and a fresh optimizer; then one more
// step, whose result also depends on what no accessor shows (the inner rule's own
// step counts, the resample schedule).
std::map<std::string, std::string> resume_from(const std::string& path) {
  const CheckpointExtras extras = read_checkpoint_extras(path);
  Net net = make_net(77);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  load_checkpoint(opt, *net, path);
  std::map<std::string, std::string> out = restored_bytes(opt, *net, extras);
  // The step's gradients are fixed tensors, not backward()'s: LibTorch 2.x refuses
  // autograd in a forked child of a process that already ran it.
  int64_t k = 0;
  for (auto& p : net->parameters()) {
    auto gen = at::detail::createCPUGenerator(900 + k++);
    p.mutable_grad() = at::randn(p.sizes(), gen, p.options());
  }
  opt.step();
  for (auto& [key, v] : restored_bytes(opt, *net, {})) out["after one more step: " + key] = v;
  return out;
}

// Expects `fn` to throw CheckpointError whose message holds every fragment.
template <typename Fn>
void expect_checkpoint_error(Fn&& fn, std::initializer_list<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

// The offset of `needle` in `hay` (exactly once), or npos.
size_t find_once(const std::string& hay, const std::string& needle) {
  const size_t at = hay.find(needle);
  if (at == std::string::npos || hay.find(needle, at + 1) != std::string::npos) return std::string::npos;
  return at;
}

std::string tensor_bytes(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().cpu().contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
}

class Damaged : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir("integrity");
    path_ = dir_ + "/checkpoint.pt";
    write_checkpoint(path_);
    good_ = read_bytes(path_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `bytes` to <dir>/damaged.pt and returns its path.
  std::string write_damaged(const std::string& bytes) {
    const std::string p = dir_ + "/damaged.pt";
    write_bytes(p, bytes);
    return p;
  }

  std::string dir_, path_, good_;
};

// The damage: 64 bytes zeroed in the middle of a model tensor's data, and
// one flipped byte in an optimizer state tensor: refused, naming file and tensor,
// and neither the model nor the optimizer changes.
TEST_F(Damaged, TensorDataIsRefusedNamingFileAndTensor) {
  Net src = make_net(1);
  LowRankOptimizer src_opt(src->named_parameters(), quiet(kYaml));
  train(src, src_opt, 0, 3);
  const std::string weight = tensor_bytes(src->fc(1)->weight);
  const size_t w = find_once(good_, weight);
  ASSERT_NE(w, std::string::npos) << "the weight's bytes are stored as one record";
  std::string zeroed = good_;
  std::memset(&zeroed[w + weight.size() / 2 - 32], 0, 64);  // 64 bytes at the middle of the record
  const std::string p = write_damaged(zeroed);

  Net net = make_net(2);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  train(net, opt, 0, 2);
  const auto before = snapshot(opt, *net);
  expect_checkpoint_error([&] { load_checkpoint(opt, *net, p); },
                          {"damaged.pt", "model parameter 'fc1.weight' fails its checksum"});
  expect_identical(before, snapshot(opt, *net));

  // The largest state tensor of fc2.weight (its bytes occur once in the file).
  std::string key, state;
  for (const auto& kv : src_opt.state_tensors("fc2.weight")) {
    if (tensor_bytes(kv.second).size() > state.size()) key = kv.first, state = tensor_bytes(kv.second);
  }
  const size_t s = find_once(good_, state);
  ASSERT_NE(s, std::string::npos) << key;
  std::string flipped = good_;
  flipped[s + 1] = static_cast<char>(flipped[s + 1] ^ 0xFF);
  write_damaged(flipped);
  expect_checkpoint_error([&] { load_checkpoint(opt, *net, p); }, {"damaged.pt", "'fc2.weight'", "fails its checksum"});
  expect_identical(before, snapshot(opt, *net));
}

// A changed metadata value (the extras' text) is refused by the trainer's first
// read, read_checkpoint_extras, as well as by load_checkpoint.
TEST_F(Damaged, MetadataIsRefusedByExtrasAndLoad) {
  const size_t m = find_once(good_, "step,loss\n1,0.9");
  ASSERT_NE(m, std::string::npos);
  std::string bytes = good_;
  bytes[m + 11] = '7';  // "0.9" → "0.7": still a valid string
  const std::string p = write_damaged(bytes);
  expect_checkpoint_error([&] { read_checkpoint_extras(p); }, {"damaged.pt", "metadata", "fails its checksum"});
  Net net = make_net(2);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  expect_checkpoint_error([&] { load_checkpoint(opt, *net, p); }, {"damaged.pt", "fails its checksum"});
  // The undamaged file reads back the extras as written.
  const CheckpointExtras x = read_checkpoint_extras(path_);
  EXPECT_EQ(x.at("metrics").toStringRef(), trainer_like_extras().at("metrics").toStringRef());
  EXPECT_EQ(x.at("loss_sum").toDouble(), 1.625);
}

// torch::save(opt) / torch::load(opt) go through the same LowRankOptimizer::save /
// load and so verify the optimizer's checksums too.
TEST_F(Damaged, TorchLoadOfOptimizerVerifiesChecksums) {
  Net src = make_net(1);
  LowRankOptimizer src_opt(src->named_parameters(), quiet(kYaml));
  train(src, src_opt, 0, 3);
  torch::save(src_opt, dir_ + "/opt.pt");
  const std::string bytes = read_bytes(dir_ + "/opt.pt");
  std::string state;  // the largest state tensor of fc1.weight
  for (const auto& kv : src_opt.state_tensors("fc1.weight")) {
    if (tensor_bytes(kv.second).size() > state.size()) state = tensor_bytes(kv.second);
  }
  const size_t s = find_once(bytes, state);
  ASSERT_NE(s, std::string::npos);
  std::string flipped = bytes;
  flipped[s] = static_cast<char>(flipped[s] ^ 0x01);
  write_bytes(dir_ + "/opt_damaged.pt", flipped);
  Net net = make_net(2);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  train(net, opt, 0, 2);
  const auto before = snapshot(opt, *net);
  try {
    torch::load(opt, dir_ + "/opt_damaged.pt");
    ADD_FAILURE() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'fc1.weight' fails its checksum"), std::string::npos) << e.what();
  }
  expect_identical(before, snapshot(opt, *net));
}

// A file of the format without checksums (version 1) is refused, saying why.
TEST_F(Damaged, FormatWithoutChecksumsIsRefused) {
  torch::serialize::OutputArchive a;
  a.write("gradlora_checkpoint", c10::IValue(int64_t{1}));
  a.write("has_model", c10::IValue(false));
  a.save_to(dir_ + "/v1.pt");
  Net net = make_net(2);
  LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
  expect_checkpoint_error([&] { load_checkpoint(opt, *net, dir_ + "/v1.pt"); },
                          {"v1.pt", "version 1 carries no checksums"});
  expect_checkpoint_error([&] { read_checkpoint_extras(dir_ + "/v1.pt"); }, {"v1.pt", "no checksums"});
}

// ------------------------------------------------------ one flipped byte

// A region of a zip file, from its own layout (parsed here, independently of
// LibTorch's reader).
struct Region {
  std::string kind;  // "local header", "file name", "extra/padding", "data", "central directory", ...
  std::string record;
  size_t begin = 0, end = 0;
};

uint64_t le(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b.at(at + i));
  return v;
}

// The regions of a zip archive: every local header, file name, extra field
// (LibTorch's alignment padding), data record, central directory entry and end
// record, and whatever lies between them.
std::vector<Region> zip_regions(const std::string& b) {
  std::vector<Region> r;
  const size_t eocd = b.rfind(std::string("PK\x05\x06", 4));
  if (eocd == std::string::npos) throw std::runtime_error("no end of central directory record");
  uint64_t entries = le(b, eocd + 10, 2), cd_size = le(b, eocd + 12, 4), cd_off = le(b, eocd + 16, 4);
  const size_t loc = b.rfind(std::string("PK\x06\x07", 4), eocd);
  if (loc != std::string::npos && loc + 20 == eocd) {  // zip64
    const size_t z = le(b, loc + 8, 8);
    entries = le(b, z + 32, 8);
    cd_size = le(b, z + 40, 8);
    cd_off = le(b, z + 48, 8);
    r.push_back({"zip64 end record", "", z, loc});
    r.push_back({"zip64 locator", "", loc, eocd});
  }
  r.push_back({"end record", "", eocd, b.size()});
  size_t at = cd_off;
  for (uint64_t i = 0; i < entries; ++i) {
    if (le(b, at, 4) != 0x02014b50) throw std::runtime_error(fmt::format("no central entry at {}", at));
    const size_t n = le(b, at + 28, 2), m = le(b, at + 30, 2), k = le(b, at + 32, 2);
    const std::string name = b.substr(at + 46, n);
    uint64_t csize = le(b, at + 20, 4), off = le(b, at + 42, 4);
    // zip64 extra field: the 8-byte values that are 0xFFFFFFFF in the fixed part.
    for (size_t e = at + 46 + n; e + 4 <= at + 46 + n + m;) {
      const size_t id = le(b, e, 2), len = le(b, e + 2, 2);
      if (id == 1) {
        size_t f = e + 4;
        if (le(b, at + 24, 4) == 0xFFFFFFFF) f += 8;  // uncompressed size
        if (csize == 0xFFFFFFFF) csize = le(b, f, 8), f += 8;
        if (off == 0xFFFFFFFF) off = le(b, f, 8);
      }
      e += 4 + len;
    }
    r.push_back({"central directory", name, at, at + 46 + n + m + k});
    const size_t ln = le(b, off + 26, 2), lm = le(b, off + 28, 2);
    r.push_back({"local header", name, off, off + 30});
    r.push_back({"file name", name, off + 30, off + 30 + ln});
    if (lm) r.push_back({"extra/padding", name, off + 30 + ln, off + 30 + ln + lm});
    const size_t data = off + 30 + ln + lm;
    if (csize) r.push_back({"data", name, data, data + csize});
    at += 46 + n + m + k;
  }
  if (at != cd_off + cd_size) throw std::runtime_error("central directory size mismatch");
  // Anything not covered (data descriptors, gaps).
  std::sort(r.begin(), r.end(), [](const Region& a, const Region& c) { return a.begin < c.begin; });
  // What lies between: the data descriptor that follows a record's data when bit 3
  // of its flags is set (LibTorch's writer sets it), anything else.
  std::vector<Region> all;
  size_t pos = 0;
  for (const auto& x : r) {
    if (x.begin > pos) {
      const bool descriptor = !all.empty() && all.back().kind == "data";
      all.push_back(
          {descriptor ? "data descriptor" : "between records", descriptor ? all.back().record : "", pos, x.begin});
    }
    all.push_back(x);
    pos = std::max(pos, x.end);
  }
  if (pos < b.size()) all.push_back({"between records", "", pos, b.size()});
  return all;
}

// Positions to damage: in every record (i-th in the file) the middle of its file
// name, data and data descriptor, the first or last byte of its data, and one of
// the fields a reader uses in its local header, padding and central directory
// entry (a different one for each record, so that every field gets hit across
// the records); every field of the end records; and a stride over the whole file.
std::vector<std::pair<size_t, const Region*>> flip_positions(const std::vector<Region>& regions, size_t size) {
  std::map<size_t, const Region*> at;
  std::map<std::string, size_t> index;  // record → its position in the file
  for (const auto& r : regions) {
    if (!r.record.empty()) index.emplace(r.record, index.size());
  }
  auto region_of = [&](size_t p) -> const Region* {
    for (const auto& r : regions) {
      if (p >= r.begin && p < r.end) return &r;
    }
    return nullptr;
  };
  for (const auto& r : regions) {
    const size_t len = r.end - r.begin, i = r.record.empty() ? 0 : index.at(r.record);
    std::vector<size_t> fields;
    if (r.kind == "local header") {
      fields = {0, 4, 6, 8, 10, 14, 18, 22, 26, 28};  // signature, version, flags, method, time, crc, sizes, lengths
      fields = {fields[i % fields.size()]};
    } else if (r.kind == "central directory") {
      fields = {0, 6, 8, 10, 16, 20, 24, 28, 30, 42, 46 + (len - 46) / 2};  // ..., local offset, name
      fields = {fields[i % fields.size()]};
    } else if (r.kind == "extra/padding") {
      fields = {0, 1, 2, 3, len / 2, len - 1};  // id, length, padding
      fields = {fields[i % fields.size()]};
    } else if (r.kind == "data") {
      fields = {len / 2, i % 2 ? len - 1 : 0};
    } else if (r.kind == "end record" || r.kind == "zip64 end record" || r.kind == "zip64 locator") {
      for (size_t f = 0; f < len; f += 4) fields.push_back(f);
      fields.push_back(len - 1);
    } else {
      fields = {len / 2};  // file name, data descriptor, gaps
    }
    for (size_t f : fields) {
      if (f < len) at[r.begin + f] = &r;
    }
  }
  const size_t stride = std::max<size_t>(1, size / 100);
  for (size_t p = stride / 2; p < size; p += stride) at[p] = region_of(p);
  return {at.begin(), at.end()};
}

enum Outcome : int { kRefused = 10, kIdentical = 11, kSilent = 12, kOtherError = 13, kErrorWithoutName = 14 };

// Loads `path` the way the trainer resumes and classifies the result against
// `reference` (the undamaged file's restore).
int classify_load(const std::string& path, const std::map<std::string, std::string>& reference) {
  try {
    return resume_from(path) == reference ? kIdentical : kSilent;
  } catch (const CheckpointError& e) {
    return std::string(e.what()).find(path) != std::string::npos ? kRefused : kErrorWithoutName;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: not a CheckpointError: %s\n", path.c_str(), e.what());
    return kOtherError;
  } catch (...) {
    return kOtherError;
  }
}

// Flips (xor 0xFF) the byte at each position in turn and loads the file in a
// forked child (a crash or hang of the reader then shows as such and does not
// take the test down).
TEST_F(Damaged, OneFlippedByteAnywhereIsRefusedOrChangesNothing) {
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);  // as in the children: the same reduction order
  const std::map<std::string, std::string> reference = resume_from(path_);
  torch::set_num_threads(threads);
  // The reference has teeth: a fresh model and optimizer differ from it.
  {
    Net net = make_net(77);
    LowRankOptimizer opt(net->named_parameters(), quiet(kYaml));
    ASSERT_NE(restored_bytes(opt, *net, {}), reference);
  }
  const std::vector<Region> regions = zip_regions(good_);
  const auto positions = flip_positions(regions, good_.size());
  ASSERT_GE(positions.size(), 200u);
  const std::string p = dir_ + "/flipped.pt";

  std::map<std::string, std::map<std::string, int>> by_kind;  // kind → outcome → count
  std::map<std::string, int> total;
  std::vector<std::string> failures;
  std::set<std::string> records_hit, ignored_data;
  for (const auto& [pos, region] : positions) {
    std::string bytes = good_;
    bytes[pos] = static_cast<char>(bytes[pos] ^ 0xFF);
    write_bytes(p, bytes);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0) << "fork failed";
    if (child == 0) {
      ::alarm(60);
      torch::set_num_threads(1);
      ::_exit(classify_load(p, reference));
    }
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    std::string outcome;
    if (WIFSIGNALED(status)) {
      outcome = fmt::format("crashed (signal {})", WTERMSIG(status));
    } else {
      switch (WEXITSTATUS(status)) {
        case kRefused:
          outcome = "refused";
          break;
        case kIdentical:
          outcome = "identical";
          break;
        case kSilent:
          outcome = "silent";
          break;
        case kOtherError:
          outcome = "other exception";
          break;
        case kErrorWithoutName:
          outcome = "error without file name";
          break;
        default:
          outcome = fmt::format("exit {}", WEXITSTATUS(status));
      }
    }
    const std::string kind = region ? region->kind : "?";
    if (region) records_hit.insert(region->record);
    if (region && kind == "data" && outcome == "identical") ignored_data.insert(region->record);
    ++by_kind[kind][outcome];
    ++total[outcome];
    if (outcome != "refused" && outcome != "identical") {
      failures.push_back(fmt::format("byte {} ({} of '{}'): {}", pos, kind, region ? region->record : "", outcome));
    }
  }

  std::cout << fmt::format("file {} bytes, {} zip regions\n", good_.size(), regions.size());
  for (const auto& [kind, outcomes] : by_kind) {
    std::vector<std::string> parts;
    for (const auto& [o, n] : outcomes) parts.push_back(fmt::format("{} {}", o, n));
    std::cout << fmt::format("  {:<18} {}\n", kind, fmt::join(parts, ", "));
  }
  std::cout << fmt::format("  records whose data the loader ignores: {}\n", fmt::join(ignored_data, ", "));
  const int silent = total["silent"];
  std::cout << fmt::format("positions {}, refused {}, identical {}, silent {}\n", positions.size(), total["refused"],
                           total["identical"], silent);
  RecordProperty("positions", static_cast<int>(positions.size()));
  RecordProperty("refused", total["refused"]);
  RecordProperty("identical", total["identical"]);
  RecordProperty("silent", silent);

  EXPECT_EQ(silent, 0);
  EXPECT_EQ(total["refused"] + total["identical"], static_cast<int>(positions.size()))
      << fmt::format("{}", fmt::join(failures, "\n"));
  // Every kind of region and every record of the file got damaged somewhere.
  for (const char* kind : {"local header", "file name", "extra/padding", "data", "central directory", "end record"}) {
    EXPECT_TRUE(by_kind.count(kind)) << kind;
  }
  for (const auto& r : regions) EXPECT_TRUE(by_kind.count(r.kind)) << r.kind;
  for (const auto& r : regions) {
    if (!r.record.empty()) EXPECT_TRUE(records_hit.count(r.record)) << r.record;
  }
  // Damage to the data of a tensor record (archive/data/<n>) is always refused: every
  // byte of it is a tensor's element.
  EXPECT_GT(by_kind["data"]["refused"], 0);
  for (const auto& r : ignored_data) EXPECT_EQ(r.find("/data/"), std::string::npos) << r << " ignored";
}

}  // namespace
}  // namespace gradlora::ckpt_test
