// The two kinds of model a run trains, behind LanguageModel.
#include "language_model.h"

#include "run_loop.h"
#include "trainer.h"

#include <gradlora/adapter.h>
#include <gradlora/checkpoint.h>
#include <gradlora/jit.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>
#include <vector>

namespace gradlora::app {

namespace fs = std::filesystem;

torch::Device LanguageModel::device() const {
  const auto params = named_parameters();
  return params.is_empty() ? torch::Device(torch::kCPU) : params.begin()->value().device();
}

torch::Tensor LanguageModel::loss(const torch::Tensor& windows) {
  const int64_t T = windows.size(1) - 1;
  torch::Tensor out = logits(windows.slice(1, 0, T));
  return torch::nn::functional::cross_entropy(out.reshape({-1, out.size(-1)}).to(torch::kFloat),
                                              windows.slice(1, 1, T + 1).reshape({-1}));
}

void LanguageModel::zero_grad() {
  for (const auto& kv : named_parameters()) {
    torch::Tensor g = kv.value().mutable_grad();
    if (g.defined()) g.zero_();
  }
}

namespace {

// ----------------------------------------------------------- the built-in model

class Builtin final : public LanguageModel {
 public:
  explicit Builtin(CharTransformer m) : m_(std::move(m)) { vocab_ = kVocab; }
  torch::OrderedDict<std::string, torch::Tensor> named_parameters() const override { return m_->named_parameters(); }
  torch::Tensor logits(const torch::Tensor& tokens) override { return m_->forward(tokens); }
  void set_training(bool on) override { m_->train(on); }
  torch::nn::Module& state_module() override { return *m_; }
  void save(const std::string& path) override {
    torch::serialize::OutputArchive a;
    m_->save(a);
    std::ostringstream bytes;
    a.save_to(bytes);
    write_file_atomic(path, bytes.str());
  }
  std::string describe() const override {
    const ModelSettings& m = m_->settings_;
    return fmt::format("{}, {} layers, d_model {}, {} heads, context {}, mlp_ratio {}", m.type, m.layers, m.d_model,
                       m.heads, m.context, m.mlp_ratio);
  }
  std::set<std::string> embedding_modules() const override { return gradlora::embedding_modules(*m_); }
  CharTransformer m_;
};

// ------------------------------------------------------------ a TorchScript file

/// An nn::Module tree that holds the scripted module's own parameter and
/// buffer tensors under the same names (checkpoints walk nn::Modules).
std::shared_ptr<torch::nn::Module> mirror(const torch::jit::Module& m) {
  auto out = std::make_shared<torch::nn::Module>();
  for (const auto& p : m.named_parameters(/*recurse=*/false)) {
    if (p.value.defined()) out->register_parameter(p.name, p.value, p.value.requires_grad());
  }
  for (const auto& b : m.named_buffers(/*recurse=*/false)) {
    if (b.value.defined()) out->register_buffer(b.name, b.value);
  }
  for (const auto& c : m.named_children()) out->register_module(c.name, mirror(c.value));
  return out;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

/// What an exception from the TorchScript interpreter says in one line: its
/// last "...Error: ..." line (the Python-side error) rather than the traceback.
std::string error_summary(const std::exception& e) {
  const auto* c10e = dynamic_cast<const c10::Error*>(&e);
  const std::string msg = c10e ? c10e->what_without_backtrace() : e.what();
  std::string best;
  std::istringstream lines(msg);
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty() && line[0] != ' ' && line.find("Error: ") != std::string::npos) best = line;
  }
  return best.empty() ? first_line(msg) : best;
}

class Scripted final : public LanguageModel {
 public:
  Scripted(torch::jit::Module m, std::string path, int64_t context)
      : m_(std::move(m)), path_(std::move(path)), context_(context) {
    for (const auto& p : m_.named_parameters(/*recurse=*/true)) requires_grad_[p.name] = p.value.requires_grad();
    for (const auto& sub : m_.named_modules()) training_[sub.name] = sub.value.is_training();
    mirror_ = mirror(m_);
    params_ = gradlora::named_parameters(m_);
  }
  torch::OrderedDict<std::string, torch::Tensor> named_parameters() const override { return params_; }

  torch::Tensor logits(const torch::Tensor& tokens) override {
    const c10::IValue out = m_.forward({tokens});
    torch::Tensor t;
    if (out.isTensor()) {
      t = out.toTensor();
    } else if (out.isTuple() && !out.toTupleRef().elements().empty() && out.toTupleRef().elements()[0].isTensor()) {
      t = out.toTupleRef().elements()[0].toTensor();
    } else if (out.isGenericDict()) {
      for (const auto& e : out.toGenericDict()) {
        if (e.key().isString() && e.key().toStringRef() == "logits" && e.value().isTensor()) t = e.value().toTensor();
      }
      if (!t.defined()) {
        throw SettingsError(fmt::format("model '{}': forward returned a dict without a tensor entry 'logits'", path_));
      }
    } else {
      throw SettingsError(fmt::format(
          "model '{}': forward returned {}; expected logits (batch, context, vocab), or a tuple whose first element "
          "or a dict whose 'logits' entry is that",
          path_, out.tagKind()));
    }
    if (t.dim() != 3 || t.size(0) != tokens.size(0) || t.size(1) != tokens.size(1) || !t.is_floating_point() ||
        (vocab_ > 0 && t.size(2) != vocab_)) {
      throw SettingsError(
          fmt::format("model '{}': forward of token ids ({}, {}) returned a {} tensor of shape [{}]; expected logits "
                      "(batch, context, vocab) = ({}, {}, {})",
                      path_, tokens.size(0), tokens.size(1), c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", "),
                      tokens.size(0), tokens.size(1), vocab_ > 0 ? std::to_string(vocab_) : "vocab"));
    }
    return t;
  }
  void set_training(bool on) override { m_.train(on); }
  torch::nn::Module& state_module() override { return *mirror_; }
  void save(const std::string& path) override {
    // The file keeps the flags the loaded one had: requires_grad (the trainer
    // switches gradients off for frozen parameters while it runs) and each
    // module's training mode.
    std::map<std::string, bool> grad_now, training_now;
    for (const auto& p : m_.named_parameters(/*recurse=*/true)) {
      grad_now[p.name] = p.value.requires_grad();
      p.value.set_requires_grad(requires_grad_.at(p.name));
    }
    for (auto sub : m_.named_modules()) {
      training_now[sub.name] = sub.value.is_training();
      sub.value.setattr("training", training_.at(sub.name));
    }
    std::ostringstream bytes;
    m_.save(bytes);
    for (const auto& p : m_.named_parameters(/*recurse=*/true)) p.value.set_requires_grad(grad_now.at(p.name));
    for (auto sub : m_.named_modules()) sub.value.setattr("training", training_now.at(sub.name));
    write_file_atomic(path, bytes.str());
  }
  std::string describe() const override {
    int64_t n = 0;
    for (const auto& kv : params_) n += kv.value().numel();
    return fmt::format("torchscript '{}' ({}), {} parameters in {} tensors, vocabulary {}, context {}", path_,
                       m_.type()->name() ? m_.type()->name()->qualifiedName() : "?", n, params_.size(), vocab_,
                       context_);
  }
  std::set<std::string> embedding_modules() const override { return gradlora::embedding_modules(m_); }
  void prepare_gradients(const LowRankOptimizer* opt) override {
    if (opt) {
      gradlora::set_requires_grad(m_, *opt);
    } else {
      gradlora::set_requires_grad(m_, true);
    }
  }
  void probe() {
    torch::NoGradGuard guard;
    const torch::Tensor ids = torch::zeros({2, context_}, torch::TensorOptions(torch::kInt64).device(device()));
    const bool was_training = m_.is_training();
    m_.eval();
    torch::Tensor t;
    try {
      t = logits(ids);
    } catch (const SettingsError&) {
      throw;
    } catch (const std::exception& e) {
      throw SettingsError(fmt::format(
          "model '{}': forward failed on token ids of shape (2, {}) (model.context = {}; is it longer than the "
          "model's maximum sequence length?): {}",
          path_, context_, context_, error_summary(e)));
    }
    m_.train(was_training);
    vocab_ = t.size(2);
  }
  torch::jit::Module m_;

 private:
  std::string path_;
  int64_t context_;
  std::map<std::string, bool> requires_grad_, training_;
  std::shared_ptr<torch::nn::Module> mirror_;
  torch::OrderedDict<std::string, torch::Tensor> params_;
};

}  // namespace

std::unique_ptr<LanguageModel> make_builtin_model(const Settings& s, uint64_t seed) {
  return std::make_unique<Builtin>(build_model(s, seed));
}

CharTransformer& builtin(LanguageModel& m) { return dynamic_cast<Builtin&>(m).m_; }

std::unique_ptr<LanguageModel> load_torchscript_model(const Settings& s) {
  const std::string& path = s.model.path;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    throw SettingsError(fmt::format("config key 'model.path': '{}' {}", path,
                                    fs::exists(path, ec) ? "is not a regular file" : "does not exist"));
  }
  const torch::Device device = training_device(s.training);
  torch::jit::Module m;
  try {
    m = torch::jit::load(path, device);
  } catch (const std::exception& e) {
    throw SettingsError(
        fmt::format("config key 'model.path': '{}' is not a TorchScript file (save one in Python with "
                    "torch.jit.script(model).save(path)): {}",
                    path, error_summary(e)));
  }
  if (!m.find_method("forward")) {
    throw SettingsError(fmt::format("config key 'model.path': the module in '{}' has no forward method", path));
  }
  auto model = std::make_unique<Scripted>(std::move(m), path, s.model.context);
  if (model->named_parameters().is_empty()) {
    throw SettingsError(fmt::format("config key 'model.path': the module in '{}' has no parameters", path));
  }
  model->probe();
  return model;
}

std::unique_ptr<LanguageModel> open_model(const Settings& s, uint64_t seed) {
  return s.model.torchscript() ? load_torchscript_model(s) : make_builtin_model(s, seed);
}

std::string file_checksum(const std::string& path) {
  // A run's settings hash is taken more than once (compare, then train_run): the
  // file is read once per (path, size, modification time), in 1 MiB pieces.
  static std::map<std::tuple<std::string, uintmax_t, int64_t>, std::string> done;
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  const int64_t mtime = ec ? 0 : static_cast<int64_t>(fs::last_write_time(path, ec).time_since_epoch().count());
  const auto key = std::make_tuple(path, ec ? uintmax_t{0} : size, mtime);
  if (auto it = done.find(key); it != done.end() && !ec) return it->second;
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buf(size_t{1} << 20);
  uint64_t h = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    if (n > 0) h = detail::checksum64(buf.data(), n, h);
  }
  std::string out = fmt::format("{:016x}", h);
  if (!ec) done[key] = out;
  return out;
}

}  // namespace gradlora::app
