// Crash-safe checkpoints of a model and its LowRankOptimizer (checkpoint.h).
#include <gradlora/checkpoint.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace gradlora {

namespace {

constexpr int64_t kCheckpointVersion = 1;

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

// Walks `model` like torch::nn::Module::save does and pairs each parameter and
// buffer with the tensor of the same name in `archive`, listing what is missing
// or does not fit. Changes nothing.
void match_module(const torch::nn::Module& model, torch::serialize::InputArchive& archive, const std::string& prefix,
                  std::vector<std::pair<torch::Tensor, torch::Tensor>>& pairs, std::vector<std::string>& problems) {
  std::set<std::string> known;
  auto match_tensor = [&](const std::string& key, const torch::Tensor& dst, const char* kind) {
    known.insert(key);
    const std::string name = prefix + key;
    if (!dst.defined()) return;
    torch::Tensor src;
    if (!archive.try_read(key, src, std::string(kind) == "buffer")) {
      problems.push_back(fmt::format("model {} '{}' is not in the checkpoint", kind, name));
    } else if (src.sizes() != dst.sizes()) {
      problems.push_back(fmt::format("model {} '{}' has shape [{}] in the checkpoint, [{}] here", kind, name,
                                     fmt::join(src.sizes(), ", "), fmt::join(dst.sizes(), ", ")));
    } else if (src.scalar_type() != dst.scalar_type()) {
      problems.push_back(fmt::format("model {} '{}' has dtype {} in the checkpoint, {} here", kind, name,
                                     c10::toString(src.scalar_type()), c10::toString(dst.scalar_type())));
    } else {
      pairs.emplace_back(dst, src);
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
    match_module(*c.value(), sub, prefix + c.key() + ".", pairs, problems);
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
  }
  c10::IValue v;
  bool ok = false;
  try {
    ok = archive.try_read("gradlora_checkpoint", v) && v.isInt();
  } catch (const c10::Error&) {
    ok = false;
  }
  if (!ok) {
    throw CheckpointError(fmt::format(
        "checkpoint '{}': not written by gradlora::save_checkpoint (no 'gradlora_checkpoint' key); an optimizer "
        "saved with torch::save(opt, path) loads with torch::load(opt, path)",
        path));
  }
  if (v.toInt() != kCheckpointVersion) {
    throw CheckpointError(fmt::format("checkpoint '{}': format version {} is not supported (expected {})", path,
                                      v.toInt(), kCheckpointVersion));
  }
  return archive;
}

void save_impl(const LowRankOptimizer& opt, const torch::nn::Module* model, const std::string& path,
               const CheckpointExtras& extras = {}) {
  torch::serialize::OutputArchive archive;
  archive.write("gradlora_checkpoint", c10::IValue(kCheckpointVersion));
  archive.write("has_model", c10::IValue(model != nullptr));
  if (model) {
    torch::serialize::OutputArchive m(archive.compilation_unit());
    model->save(m);
    archive.write("model", m);
  }
  torch::serialize::OutputArchive o(archive.compilation_unit());
  opt.save(o);
  archive.write("optimizer", o);
  if (!extras.empty()) {
    torch::serialize::OutputArchive e(archive.compilation_unit());
    c10::List<std::string> keys;
    for (const auto& [key, value] : extras) {
      keys.push_back(key);
      e.write(key, value);
    }
    e.write("keys", c10::IValue(keys));
    archive.write("extras", e);
  }
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
  std::vector<std::pair<torch::Tensor, torch::Tensor>> pairs;
  std::vector<std::string> problems;
  torch::serialize::InputArchive opt_archive;
  try {
    if (model) {
      c10::IValue has_model;
      torch::serialize::InputArchive m;
      if (!archive.try_read("has_model", has_model) || !has_model.isBool() || !has_model.toBool() ||
          !archive.try_read("model", m)) {
        problems.push_back("the checkpoint holds no model (saved with save_checkpoint(opt, path))");
      } else {
        match_module(*model, m, "", pairs, problems);
      }
    }
    if (!archive.try_read("optimizer", opt_archive)) problems.push_back("the checkpoint holds no optimizer");
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': corrupt or incomplete ({})", path, e.what_without_backtrace()));
  }
  if (!problems.empty()) {
    throw CheckpointError(fmt::format("checkpoint '{}' does not fit this model ({} problem(s)):\n  {}", path,
                                      problems.size(), fmt::join(problems, "\n  ")));
  }
  // The optimizer validates everything before it changes anything.
  try {
    opt.load(opt_archive);
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("checkpoint '{}': {}", path, e.what()));
  }
  // Shapes and dtypes are checked: the copies cannot fail.
  torch::NoGradGuard guard;
  for (auto& [dst, src] : pairs) dst.copy_(src);
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
  CheckpointExtras out;
  try {
    torch::serialize::InputArchive e;
    if (!archive.try_read("extras", e)) return out;
    c10::IValue keys;
    e.read("keys", keys);
    for (const auto& k : keys.toListRef()) {
      c10::IValue v;
      e.read(k.toStringRef(), v);
      out[k.toStringRef()] = v;
    }
  } catch (const c10::Error& err) {
    throw CheckpointError(
        fmt::format("checkpoint '{}': corrupt or incomplete extras ({})", path, err.what_without_backtrace()));
  }
  return out;
}

void load_checkpoint(LowRankOptimizer& opt, torch::nn::Module& model, const std::string& path) {
  load_impl(opt, &model, path);
}

void load_checkpoint(LowRankOptimizer& opt, const std::string& path) { load_impl(opt, nullptr, path); }

namespace detail {
void set_write_hook(std::function<void(size_t)> hook) { write_hook() = std::move(hook); }
}  // namespace detail

}  // namespace gradlora
