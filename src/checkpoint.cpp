// Crash-safe checkpoints of a model and its LowRankOptimizer (checkpoint.h).
#include <gradlora/checkpoint.h>

#include "checksum.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace gradlora {

namespace {

// 2: the model tensors and the metadata carry checksums (1 had none).
constexpr int64_t kCheckpointVersion = 2;

std::function<void(size_t)>& write_hook() {
  static std::function<void(size_t)> hook;
  return hook;
}

std::string errno_text() { return std::strerror(errno); }

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Owns a file descriptor and the temporary file until it is renamed.
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw CheckpointError(fmt::format("cannot create '{}': {}", path_, errno_text()));
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!renamed_) ::unlink(path_.c_str());
  }

  void write_all(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw CheckpointError(fmt::format("cannot write '{}': {}", path_, errno_text()));
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
  }

  void commit(const std::string& final_path) {
    if (::fsync(fd_) != 0) throw CheckpointError(fmt::format("cannot flush '{}': {}", path_, errno_text()));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw CheckpointError(fmt::format("cannot close '{}': {}", path_, errno_text()));
    if (::rename(path_.c_str(), final_path.c_str()) != 0) {
      throw CheckpointError(fmt::format("cannot rename '{}' to '{}': {}", path_, final_path, errno_text()));
    }
    renamed_ = true;
    // Make the rename itself durable. Failing here is not fatal: the data is in place.
    const int dir = ::open(parent_dir(final_path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
      ::fsync(dir);
      ::close(dir);
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool renamed_ = false;
};

// The model's parameters and buffers in the order and with the names
// torch::nn::Module::save writes them (children that are not serializable are
// skipped), dotted from the top.
void collect_model_tensors(const torch::nn::Module& model, const std::string& prefix,
                           std::vector<std::pair<std::string, torch::Tensor>>& out) {
  for (const auto& p : model.named_parameters(/*recurse=*/false)) {
    if (p.value().defined()) out.emplace_back(prefix + p.key(), p.value());
  }
  for (const auto& b : model.named_buffers(/*recurse=*/false)) {
    if (b.value().defined()) out.emplace_back(prefix + b.key(), b.value());
  }
  for (const auto& c : model.named_children()) {
    if (c.value()->is_serializable()) collect_model_tensors(*c.value(), prefix + c.key() + ".", out);
  }
}

// A model tensor of the file paired with the model's tensor of the same name.
struct ModelPair {
  std::string name;
  torch::Tensor dst, src;
};

// What save_checkpoint() writes beside the model and the optimizer sections,
// verified against its checksum.
struct Header {
  bool has_model = false;
  std::map<std::string, uint64_t> model_sums;  // model tensor name → checksum
  CheckpointExtras extras;
};

// Walks `model` like torch::nn::Module::save does and pairs each parameter and
// buffer with the tensor of the same name in `archive`, listing what is missing
// or does not fit. Verifies each tensor read against its checksum in `sums`
// (throws CheckpointError naming `path` and the tensor). Changes nothing.
void match_module(const torch::nn::Module& model, torch::serialize::InputArchive& archive, const std::string& prefix,
                  const std::string& path, const std::map<std::string, uint64_t>& sums, std::vector<ModelPair>& pairs,
                  std::vector<std::string>& problems) {
  std::set<std::string> known;
  auto match_tensor = [&](const std::string& key, const torch::Tensor& dst, const char* kind) {
    known.insert(key);
    const std::string name = prefix + key;
    if (!dst.defined()) return;
    torch::Tensor src;
    if (!archive.try_read(key, src, std::string(kind) == "buffer")) {
      problems.push_back(fmt::format("model {} '{}' is not in the checkpoint", kind, name));
      return;
    }
    const auto sum = sums.find(name);
    if (sum == sums.end()) {
      throw CheckpointError(
          fmt::format("checkpoint '{}' is damaged: model {} '{}' has no checksum in the file", path, kind, name));
    }
    const uint64_t got = detail::tensor_checksum(src);
    if (got != sum->second) {
      throw CheckpointError(
          fmt::format("checkpoint '{}' is damaged: model {} '{}' fails its checksum (stored {}, computed {})", path,
                      kind, name, detail::hex(sum->second), detail::hex(got)));
    }
    if (src.sizes() != dst.sizes()) {
      problems.push_back(fmt::format("model {} '{}' has shape [{}] in the checkpoint, [{}] here", kind, name,
                                     fmt::join(src.sizes(), ", "), fmt::join(dst.sizes(), ", ")));
    } else if (src.scalar_type() != dst.scalar_type()) {
      problems.push_back(fmt::format("model {} '{}' has dtype {} in the checkpoint, {} here", kind, name,
                                     c10::toString(src.scalar_type()), c10::toString(dst.scalar_type())));
    } else {
      pairs.push_back({name, dst, src});
    }
  };
  for (const auto& p : model.named_parameters(/*recurse=*/false)) match_tensor(p.key(), p.value(), "parameter");
  for (const auto& b : model.named_buffers(/*recurse=*/false)) match_tensor(b.key(), b.value(), "buffer");
  for (const auto& c : model.named_children()) {
    if (!c.value()->is_serializable()) continue;
    known.insert(c.key());
    torch::serialize::InputArchive sub;
    if (!archive.try_read(c.key(), sub)) {
      problems.push_back(fmt::format("model module '{}' is not in the checkpoint", prefix + c.key()));
      continue;
    }
    match_module(*c.value(), sub, prefix + c.key() + ".", path, sums, pairs, problems);
  }
  // Tensors in the file that the model does not have (another architecture).
  for (const auto& key : archive.keys()) {
    if (known.count(key)) continue;
    c10::IValue v;
    if (archive.try_read(key, v) && v.isTensor()) {
      problems.push_back(fmt::format("checkpoint has model tensor '{}', the model has not", prefix + key));
    }
  }
}

// Runs `fn` (which reads `path`); any exception other than CheckpointError — a
// damaged archive makes LibTorch's reader throw c10::Error and others — comes
// out as CheckpointError naming the file.
template <typename Fn>
auto guarded_read(const std::string& path, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const CheckpointError&) {
    throw;
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': corrupt or incomplete ({})", path, e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': corrupt or incomplete ({})", path, e.what()));
  }
}

torch::serialize::InputArchive read_archive(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw CheckpointError(fmt::format("checkpoint '{}': cannot be opened: {}", path, errno_text()));
  }
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    throw CheckpointError(
        fmt::format("checkpoint '{}': corrupt or truncated file ({})", path, e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': corrupt or truncated file ({})", path, e.what()));
  }
  c10::IValue v;
  bool ok = false;
  try {
    ok = archive.try_read("gradlora_checkpoint", v) && v.isInt();
  } catch (const std::exception&) {
    ok = false;
  }
  if (!ok) {
    throw CheckpointError(fmt::format(
        "checkpoint '{}': not written by gradlora::save_checkpoint (no 'gradlora_checkpoint' key); an optimizer "
        "saved with torch::save(opt, path) loads with torch::load(opt, path)",
        path));
  }
  if (v.toInt() == 1) {
    throw CheckpointError(
        fmt::format("checkpoint '{}': format version 1 carries no checksums and is not supported (expected {}): its "
                    "contents cannot be verified",
                    path, kCheckpointVersion));
  }
  if (v.toInt() != kCheckpointVersion) {
    throw CheckpointError(fmt::format("checkpoint '{}': format version {} is not supported (expected {})", path,
                                      v.toInt(), kCheckpointVersion));
  }
  return archive;
}

// Reads and verifies the header: has_model, the model tensors' checksums and the
// extras, hashed in the order save_impl wrote them.
Header read_header(torch::serialize::InputArchive& archive, const std::string& path) {
  Header h;
  detail::MetaChecksum meta;
  meta.add(kCheckpointVersion);
  c10::IValue v;
  archive.read("has_model", v);
  h.has_model = v.toBool();
  meta.add(h.has_model);
  archive.read("model_tensors", v);
  meta.add(v);
  std::vector<std::string> names;
  for (const auto& n : v.toListRef()) names.push_back(n.toStringRef());
  archive.read("model_checksums", v);
  meta.add(v);
  const std::vector<int64_t> sums = v.toIntVector();
  if (sums.size() != names.size()) {
    throw CheckpointError(
        fmt::format("checkpoint '{}' is damaged: {} model tensors and {} checksums", path, names.size(), sums.size()));
  }
  for (size_t i = 0; i < names.size(); ++i) h.model_sums[names[i]] = detail::from_stored(sums[i]);
  torch::serialize::InputArchive e;
  if (archive.try_read("extras", e)) {
    e.read("keys", v);
    meta.add(v);
    for (const auto& k : v.toListRef()) {
      c10::IValue x;
      e.read(k.toStringRef(), x);
      meta.add(x);
      h.extras[k.toStringRef()] = x;
    }
  } else {
    meta.add(c10::IValue());
  }
  archive.read("checksum", v);
  const uint64_t stored = detail::from_stored(v.toInt()), computed = meta.value();
  if (stored != computed) {
    throw CheckpointError(fmt::format(
        "checkpoint '{}' is damaged: its metadata (model tensor list and checksums, extras) fails its checksum "
        "(stored {}, computed {})",
        path, detail::hex(stored), detail::hex(computed)));
  }
  return h;
}

void save_impl(const LowRankOptimizer& opt, const torch::nn::Module* model, const std::string& path,
               const CheckpointExtras& extras = {}) {
  // The header values go into `meta` in the order read_header() reads them.
  detail::MetaChecksum meta;
  torch::serialize::OutputArchive archive;
  archive.write("gradlora_checkpoint", c10::IValue(kCheckpointVersion));
  archive.write("has_model", c10::IValue(model != nullptr));
  meta.add(kCheckpointVersion).add(model != nullptr);
  c10::List<std::string> names;
  c10::List<int64_t> sums;
  if (model) {
    torch::serialize::OutputArchive m(archive.compilation_unit());
    model->save(m);
    archive.write("model", m);
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    collect_model_tensors(*model, "", tensors);
    for (const auto& [name, t] : tensors) {
      names.push_back(name);
      sums.push_back(detail::to_stored(detail::tensor_checksum(t)));
    }
  }
  archive.write("model_tensors", c10::IValue(names));
  archive.write("model_checksums", c10::IValue(sums));
  meta.add(c10::IValue(names)).add(c10::IValue(sums));
  torch::serialize::OutputArchive o(archive.compilation_unit());
  opt.save(o);
  archive.write("optimizer", o);
  if (!extras.empty()) {
    torch::serialize::OutputArchive e(archive.compilation_unit());
    c10::List<std::string> keys;
    for (const auto& [key, value] : extras) keys.push_back(key);
    meta.add(c10::IValue(keys));
    for (const auto& [key, value] : extras) {
      try {
        meta.add(value);
      } catch (const std::invalid_argument& err) {
        throw CheckpointError(fmt::format("cannot write '{}': extra '{}': {}", path, key, err.what()));
      }
      e.write(key, value);
    }
    e.write("keys", c10::IValue(keys));
    archive.write("extras", e);
  } else {
    meta.add(c10::IValue());
  }
  archive.write("checksum", c10::IValue(detail::to_stored(meta.value())));
  write_file_atomically(path, [&](const std::function<void(const void*, size_t)>& sink) {
    // LibTorch's zip writer must never see a failing sink (it would throw from a
    // destructor): remember the first error, swallow the rest, rethrow afterwards.
    std::exception_ptr error;
    archive.save_to([&](const void* data, size_t n) -> size_t {
      if (error) return n;
      try {
        sink(data, n);
      } catch (...) {
        error = std::current_exception();
      }
      return n;
    });
    if (error) std::rethrow_exception(error);
  });
}

void load_impl(LowRankOptimizer& opt, torch::nn::Module* model, const std::string& path) {
  torch::serialize::InputArchive archive = read_archive(path);
  std::vector<ModelPair> pairs;
  std::vector<std::string> problems;
  torch::serialize::InputArchive opt_archive;
  guarded_read(path, [&] {
    const Header header = read_header(archive, path);
    if (model) {
      torch::serialize::InputArchive m;
      if (!header.has_model || !archive.try_read("model", m)) {
        problems.push_back("the checkpoint holds no model (saved with save_checkpoint(opt, path))");
      } else {
        match_module(*model, m, "", path, header.model_sums, pairs, problems);
      }
    }
    if (!archive.try_read("optimizer", opt_archive)) problems.push_back("the checkpoint holds no optimizer");
  });
  if (!problems.empty()) {
    throw CheckpointError(fmt::format("checkpoint '{}' does not fit this model ({} problem(s)):\n  {}", path,
                                      problems.size(), fmt::join(problems, "\n  ")));
  }
  // The optimizer verifies its checksums and validates everything before it changes anything.
  try {
    opt.load(opt_archive);
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': corrupt or incomplete ({})", path, e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': {}", path, e.what()));
  }
  // Checksums, shapes and dtypes are checked: the copies cannot fail.
  torch::NoGradGuard guard;
  for (auto& p : pairs) p.dst.copy_(p.src);
}

}  // namespace

void write_file_atomically(const std::string& path,
                           const std::function<void(const std::function<void(const void*, size_t)>& sink)>& produce) {
  TempFile tmp(fmt::format("{}.tmp.{}", path, static_cast<long>(::getpid())));
  size_t written = 0;
  auto sink = [&](const void* data, size_t n) {
    if (write_hook()) write_hook()(written);
    tmp.write_all(data, n);
    written += n;
  };
  try {
    produce(sink);
  } catch (const CheckpointError&) {
    throw;
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("cannot write '{}': {}", path, e.what()));
  }
  tmp.commit(path);
}

void save_checkpoint(const LowRankOptimizer& opt, const torch::nn::Module& model, const std::string& path) {
  save_impl(opt, &model, path);
}

void save_checkpoint(const LowRankOptimizer& opt, const std::string& path) { save_impl(opt, nullptr, path); }

void save_checkpoint(const LowRankOptimizer& opt, const torch::nn::Module& model, const std::string& path,
                     const CheckpointExtras& extras) {
  save_impl(opt, &model, path, extras);
}

CheckpointExtras read_checkpoint_extras(const std::string& path) {
  torch::serialize::InputArchive archive = read_archive(path);
  return guarded_read(path, [&] { return read_header(archive, path).extras; });
}

void load_checkpoint(LowRankOptimizer& opt, torch::nn::Module& model, const std::string& path) {
  load_impl(opt, &model, path);
}

void load_checkpoint(LowRankOptimizer& opt, const std::string& path) { load_impl(opt, nullptr, path); }

namespace detail {
void set_write_hook(std::function<void(size_t)> hook) { write_hook() = std::move(hook); }
}  // namespace detail

}  // namespace gradlora
