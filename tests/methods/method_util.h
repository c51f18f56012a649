#pragma once
// Helpers of the galore / hadamard tests: one weight matrix trained on a seeded
// linear-regression problem, so that every gradient depends on the trajectory.
#include <gradlora/gradlora.h>

#include "test_util.h"  // test_devices, GRADLORA_SKIP_IF_UNAVAILABLE, the one-weight model

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <sstream>
#include <string>
#include <utility>

namespace gradlora::method_testing {

/// Batch `t` of the regression problem y = W·x (X is b×m, Y is b×n), in double, on the CPU.
inline std::pair<torch::Tensor, torch::Tensor> batch(int64_t t, int64_t n, int64_t m, int64_t b = 16) {
  auto gen = at::detail::createCPUGenerator(700 + static_cast<uint64_t>(t));
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor X = at::randn({b, m}, gen, opts);
  torch::Tensor Y = at::randn({b, n}, gen, opts);
  return {X, Y};
}

/// Mean-squared-error loss 0.5/b·‖X·Wᵀ − Y‖² of batch t (differentiable in W), on W's device.
inline torch::Tensor loss(const torch::Tensor& W, int64_t t) {
  auto [X, Y] = batch(t, W.size(0), W.size(1));
  torch::Tensor D = torch::mm(X.to(W.scalar_type()).to(W.device()), W.t()) - Y.to(W.scalar_type()).to(W.device());
  return D.square().sum() * (0.5 / static_cast<double>(X.size(0)));
}

/// Its gradient in closed form, (X·Wᵀ − Y)ᵀ·X / b, with plain tensor ops, on W's device.
inline torch::Tensor grad(const torch::Tensor& W, int64_t t) {
  auto [X0, Y0] = batch(t, W.size(0), W.size(1));
  const torch::Tensor X = X0.to(W.device()), Y = Y0.to(W.device());
  torch::Tensor Wd = W.detach().to(torch::kDouble);
  return torch::mm((torch::mm(X, Wd.t()) - Y).t(), X).div_(static_cast<double>(X.size(0))).to(W.scalar_type());
}

/// A seeded n×m weight, on the CPU (move it with .to(device)).
inline torch::Tensor weight(int64_t n, int64_t m, torch::ScalarType dtype = torch::kDouble, uint64_t seed = 3) {
  return testing::seeded_randn({n, m}, seed).mul_(0.5).to(dtype);
}

using testing::single_weight;  // the parameter list of a one-weight "model" named `w`

/// A quiet config with one target `w` of the given method.
inline Config config(Method method, InnerType type, double lr, double weight_decay, int64_t rank) {
  Config c;
  c.log_report = false;
  c.optimizer.type = type;
  c.optimizer.lr = lr;
  c.optimizer.weight_decay = weight_decay;
  Target t;
  t.match = "w";
  t.method = method;
  t.rank = rank;
  c.targets = {t};
  return c;
}

using testing::max_abs_diff;

/// Round trip through LibTorch's serialize archives (what torch::save / torch::load do).
inline void copy_state(const torch::optim::Optimizer& from, torch::optim::Optimizer& to) {
  std::stringstream buf;
  torch::serialize::OutputArchive out;
  from.save(out);
  out.save_to(buf);
  torch::serialize::InputArchive in;
  in.load_from(buf);
  to.load(in);
}

}  // namespace gradlora::method_testing
