// TorchScript modules as a source of named parameters.
#include <gradlora/jit.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/script.h>

#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace gradlora {

namespace {

struct Collector {
  torch::OrderedDict<std::string, torch::Tensor> out;
  std::unordered_set<const void*> modules_seen;
  std::unordered_map<const void*, std::string> tensors_seen;

  // Python's order: named_modules() is a pre-order walk (a module shared by two
  // parents is visited once), and each module lists its own parameters.
  void visit(const torch::jit::Module& module, const std::string& prefix) {
    if (!modules_seen.insert(module._ivalue().get()).second) return;
    for (const auto& p : module.named_parameters(/*recurse=*/false)) {
      const std::string name = prefix + p.name;
      auto [it, fresh] = tensors_seen.emplace(p.value.unsafeGetTensorImpl(), name);
      if (!fresh) {
        spdlog::info("gradlora: parameter '{}' is the same tensor as '{}'; it is listed once, as '{}'", name,
                     it->second, it->second);
        continue;
      }
      out.insert(name, p.value);
    }
    for (const auto& child : module.named_children()) visit(child.value, prefix + child.name + ".");
  }
};

}  // namespace

torch::OrderedDict<std::string, torch::Tensor> named_parameters(const torch::jit::Module& module) {
  Collector c;
  c.visit(module, "");
  return std::move(c.out);
}

void set_requires_grad(const torch::jit::Module& module, const LowRankOptimizer& opt) {
  const auto params = named_parameters(module);
  // Look every name up first, so that an unknown one changes nothing.
  const std::vector<std::string> names = opt.names();
  const std::unordered_set<std::string> known(names.begin(), names.end());
  std::vector<bool> trained;
  trained.reserve(params.size());
  for (const auto& item : params) {
    if (!known.count(item.key())) {
      throw std::invalid_argument(fmt::format(
          "gradlora::set_requires_grad(): the optimizer has no parameter named '{}' (was it built from another "
          "module?)",
          item.key()));
    }
    trained.push_back(opt.method_of(item.key()) != Method::frozen);
  }
  size_t i = 0;
  for (const auto& item : params) item.value().requires_grad_(trained[i++]);
}

std::set<std::string> embedding_modules(const torch::jit::Module& module) {
  std::set<std::string> out;
  for (const auto& item : module.named_modules()) {
    if (item.name.empty()) continue;  // the module itself
    const auto type_name = item.value.type()->name();
    if (!type_name) continue;
    // Drop the `___torch_mangle_N` atoms TorchScript inserts when a class name repeats.
    std::string name;
    for (const auto& atom : type_name->atoms()) {
      if (atom.rfind("___torch_mangle_", 0) == 0) continue;
      name += (name.empty() ? "" : ".") + atom;
    }
    if (name == "__torch__.torch.nn.modules.sparse.Embedding") out.insert(item.name);
  }
  return out;
}

void set_requires_grad(const torch::jit::Module& module, bool on) {
  for (const auto& p : module.parameters(/*recurse=*/true)) p.requires_grad_(on);
}

}  // namespace gradlora
