#pragma once
/// \file jit.h
/// Low-rank fine-tuning of TorchScript modules (torch::jit::Module), e.g. a
/// model exported from Python with `torch.jit.save` and loaded in C++ with
/// `torch::jit::load`. No adapter layers are added: the optimizer only sees
/// the module's parameters, so the module (and its saved file) keep their
/// structure.
///
///     #include <gradlora/gradlora.h>
///     #include <gradlora/jit.h>
///
///     torch::jit::Module model = torch::jit::load("model.pt");
///     gradlora::LowRankOptimizer opt(gradlora::named_parameters(model),
///                                    gradlora::Config::from_yaml_file("configs/torchscript.yaml"));
///     gradlora::set_requires_grad(model, opt);  // optional: no gradients for frozen weights
///     model.train();
///     for (...) {
///       opt.zero_grad();
///       torch::Tensor loss = loss_fn(model.forward({x}).toTensor(), y);
///       loss.backward();
///       opt.step();
///     }
///     model.save("model.finetuned.pt");
///
/// This header includes <torch/script.h> (heavy); it is therefore not part of
/// the umbrella header gradlora.h.

#include <gradlora/optimizer.h>

#include <torch/ordered_dict.h>
#include <torch/script.h>

#include <set>
#include <string>

namespace gradlora {

/// The parameters of a scripted module and of all its submodules, keyed by the
/// dotted names Python shows for the same module
/// (`encoder.layers.0.self_attn.in_proj_weight`), in the same order (a
/// module's own parameters, then its submodules' in registration order), so the
/// `match:` patterns of a Config written against the Python model select the
/// same tensors. The tensors alias the module's: updating them in place (as
/// LowRankOptimizer::step does) updates the module.
///
/// A tensor reachable under several names (tied weights, a submodule shared by
/// two parents) is listed once, under the first name, as Python's
/// `named_parameters()` does.
torch::OrderedDict<std::string, torch::Tensor> named_parameters(const torch::jit::Module& module);

/// Sets `requires_grad` on every parameter of `module`: true for the
/// parameters `opt` trains (any method but `frozen`), false for the frozen
/// ones, so that backward does not compute gradients nobody reads. Needed when
/// the module was saved with gradients switched off (e.g. after
/// `requires_grad_(False)` in Python), since a parameter without a gradient is
/// never updated. Throws std::invalid_argument when `opt` does not know a
/// parameter of `module` (it was built from another module).
///
/// The flags are stored by `module.save()`; call `set_requires_grad(module,
/// true)` before saving if the saved model should have them all on. With
/// `fuse_into_backward`, call `set_requires_grad(module, true)` before building
/// the optimizer: its hooks go only on parameters that require a gradient.
void set_requires_grad(const torch::jit::Module& module, const LowRankOptimizer& opt);

/// Sets `requires_grad` of every parameter of `module` to `on`.
void set_requires_grad(const torch::jit::Module& module, bool on);

/// Paths of the submodules of a scripted or traced module that were
/// `torch.nn.Embedding` in Python, recognised by their qualified type name
/// (`__torch__.torch.nn.modules.sparse.Embedding`, with TorchScript's
/// `___torch_mangle_N` parts ignored), for AdapterOptions::embedding_modules.
/// A module of another class (a subclass, a custom embedding) is not found:
/// name it in embedding_modules by hand.
std::set<std::string> embedding_modules(const torch::jit::Module& module);

}  // namespace gradlora
