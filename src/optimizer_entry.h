#pragma once
// LowRankOptimizer's per-parameter record, shared by the optimizer's source files
// (construction and step, report, checkpoints).
#include <gradlora/optimizer.h>

#include <torch/csrc/autograd/function.h>
#include <torch/torch.h>

#include <memory>
#include <string>

namespace gradlora {

// Fused mode: a pre-hook on the parameter's gradient accumulator projects the
// gradient as soon as autograd has summed it and returns an undefined tensor,
// so the accumulator never stores the full gradient in .grad. The link is
// cleared when the optimizer goes away; the hook then lets gradients through.
//
// What the hook accumulated must be dropped by any zero_grad() — the optimizer's
// (called through torch::optim::Optimizer&, which cannot be overridden in 2.x) or
// the module's — without gradlora overriding anything. So the hook leaves a
// placeholder in the parameter's .grad: an empty tensor of the parameter's dtype
// and device. zero_grad() either resets it (set_to_none) or zeroes it in place,
// which bumps its version counter; either way the next backward or step() sees
// that the placeholder is gone or touched and starts afresh. The placeholder
// holds no data, so gradient-norm utilities count it as zero.
struct FusedLink {
  LowRankOptimizer::Entry* entry = nullptr;
  bool norms = false;        // max_grad_norm is set: the hook takes each gradient's norm
  bool diagnostics = false;  // Config::diagnostics: the hook measures energy_kept
};

struct LowRankOptimizer::Entry {
  std::string name;
  torch::Tensor param;
  Method method;  // frozen until the selection says otherwise
  size_t group = 0;
  int64_t target_index = -1;  // -1: default
  std::unique_ptr<Projector> projector;
  std::unique_ptr<InnerRule> inner;
  // fused mode
  std::shared_ptr<torch::autograd::Node> accumulator;  // held, or the hook is lost with it
  std::shared_ptr<FusedLink> link;
  torch::Tensor placeholder;         // what the hook leaves in param.grad
  int64_t placeholder_version = -1;  // its version counter when the hook left it
  torch::Tensor grad_norm;           // max_grad_norm: ‖G‖ of the gradient the hook projected
  int64_t backwards = 0;             // gradients the hook projected since the last step
  torch::Tensor energy;              // diagnostics: energy_kept of the last projection (undefined: not known)

  /// True while the projected gradients accumulated since the last step() are
  /// still wanted: the placeholder is in .grad and nobody zeroed it.
  bool accumulating() const {
    if (!placeholder.defined() || !param.grad().defined()) return false;
    return param.grad().unsafeGetTensorImpl() == placeholder.unsafeGetTensorImpl() &&
           static_cast<int64_t>(placeholder._version()) == placeholder_version;
  }
  void leave_placeholder() {
    placeholder = torch::empty({0}, param.options().requires_grad(false));
    placeholder_version = static_cast<int64_t>(placeholder._version());
    param.mutable_grad() = placeholder;
  }
  void remove_placeholder() {
    if (placeholder.defined() && param.grad().defined() &&
        param.grad().unsafeGetTensorImpl() == placeholder.unsafeGetTensorImpl()) {
      param.mutable_grad() = torch::Tensor();
    }
    placeholder = torch::Tensor();
    placeholder_version = -1;
  }
};

}  // namespace gradlora
