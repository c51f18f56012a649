// Method `hadamard` (FedPara, arXiv 2108.06098; LoHa): equivalence with autograd through the
// explicit parameterisation P = P0 + s·(A1·B1) ⊙ (A2·B2), rank beyond r, edge cases.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <tuple>

#include "method_util.h"

namespace gradlora {
namespace {

using namespace method_testing;  // the shared helpers (method_util.h)
using ::gradlora::testing::CaseAndDeviceName;
using ::gradlora::testing::test_devices;

Config hadamard_config(double lr, double wd, int64_t rank, double alpha, Init init, InnerType type = InnerType::adamw) {
  Config c = config(Method::hadamard, type, lr, wd, rank);
  c.optimizer.momentum = type == InnerType::sgd ? 0.9 : 0.0;
  c.targets[0].alpha = alpha;
  c.targets[0].init = init;
  return c;
}

/// One step of ours: autograd gives G = dL/dP, the optimizer does the rest.
void step(LowRankOptimizer& opt, torch::Tensor& W, int64_t t) {
  opt.zero_grad();
  loss(W, t).backward();
  opt.step();
}

// (dtype, init, alpha, tolerance, inner rule). AdamW is nearly blind to a constant factor on a
// gradient (m/√v), so SGD with momentum is there to pin down the scale s in the gradients.
// Both sides run on the device of the last dimension.
using HadamardCase = std::tuple<torch::ScalarType, Init, double, double, InnerType>;
class HadamardVsAutograd : public ::testing::TestWithParam<std::tuple<HadamardCase, torch::Device>> {};

TEST_P(HadamardVsAutograd, Over25Steps) {
  const auto [dtype, init, alpha, tol, type] = std::get<0>(GetParam());
  const torch::Device device = std::get<1>(GetParam());
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  const int64_t n = 10, m = 7, r = 3;
  const bool sgd = type == InnerType::sgd;
  const double lr = sgd ? 0.1 : 1e-2, wd = 0.01, s = alpha / r;
  torch::Tensor W = weight(n, m, dtype).to(device).requires_grad_();
  LowRankOptimizer opt(single_weight(W), hadamard_config(lr, wd, r, alpha, init, type));

  // The module-side reference: P = P0 − s·W1₀⊙W2₀ + s·(A1·B1)⊙(A2·B2), so the model is
  // unchanged at step 0 for either init, each factor offset + leaf with LibTorch's optimizer
  // (and its weight decay, toward 0) over the leaves. Init zero: offset 0, the leaf starts at
  // the factor (decay toward 0). Other inits: the offset is the factor's start and the leaf
  // starts at 0 (decay toward the start).
  auto st = opt.state_tensors("w");
  const bool anchored = init != Init::zero;
  torch::Tensor L[4], O[4];
  const char* names[] = {"A1", "B1", "A2", "B2"};
  for (int i = 0; i < 4; ++i) {
    const torch::Tensor v = st.at(names[i]).clone();
    O[i] = anchored ? v : torch::zeros_like(v);
    L[i] = (anchored ? torch::zeros_like(v) : v).requires_grad_();
  }
  auto factor = [&](int i) { return O[i] + L[i]; };
  if (init == Init::zero) EXPECT_EQ(factor(0).abs().max().item<double>(), 0.0);
  EXPECT_GT(factor(1).abs().min().item<double>(), 0.0);
  torch::Tensor base;
  {
    torch::NoGradGuard g;
    base = W.detach().clone() - s * torch::mm(factor(0), factor(1)) * torch::mm(factor(2), factor(3));
  }
  std::unique_ptr<torch::optim::Optimizer> ref_opt;
  const std::vector<torch::Tensor> leaves{L[0], L[1], L[2], L[3]};
  if (sgd) {
    ref_opt = std::make_unique<torch::optim::SGD>(leaves, torch::optim::SGDOptions(lr).momentum(0.9).weight_decay(wd));
  } else {
    ref_opt = std::make_unique<torch::optim::AdamW>(leaves, torch::optim::AdamWOptions(lr).weight_decay(wd));
  }
  auto ref_weight = [&] { return base + s * torch::mm(factor(0), factor(1)) * torch::mm(factor(2), factor(3)); };
  EXPECT_LT(max_abs_diff(ref_weight(), W), tol);

  for (int64_t t = 0; t < 25; ++t) {
    step(opt, W, t);
    ref_opt->zero_grad();
    loss(ref_weight(), t).backward();
    ref_opt->step();
  }
  torch::NoGradGuard g;
  EXPECT_GT(max_abs_diff(W.cpu(), weight(n, m, dtype)), 20 * tol);  // it moved
  EXPECT_LT(max_abs_diff(W, ref_weight()), tol);
  st = opt.state_tensors("w");
  EXPECT_LT(max_abs_diff(st.at("A1"), factor(0)), tol);
  EXPECT_LT(max_abs_diff(st.at("B2"), factor(3)), tol);
}

constexpr InnerType kAdamW = InnerType::adamw, kSgd = InnerType::sgd;
INSTANTIATE_TEST_SUITE_P(
    Inits, HadamardVsAutograd,
    ::testing::Combine(::testing::Values(std::make_tuple(torch::kDouble, Init::zero, 6.0, 1e-10, kAdamW),
                                         std::make_tuple(torch::kDouble, Init::symmetric, 4.5, 1e-10, kAdamW),
                                         std::make_tuple(torch::kFloat, Init::zero, 6.0, 1e-5, kAdamW),
                                         std::make_tuple(torch::kFloat, Init::symmetric, 3.0, 1e-5, kAdamW),
                                         std::make_tuple(torch::kDouble, Init::zero, 6.0, 1e-10, kSgd),
                                         std::make_tuple(torch::kDouble, Init::symmetric, 4.5, 1e-10, kSgd)),
                       ::testing::ValuesIn(test_devices())),
    CaseAndDeviceName());

TEST(Hadamard, UpdateRankExceedsRButNotRSquared) {
  const int64_t n = 12, m = 10, r = 2;
  torch::Tensor W = weight(n, m).requires_grad_();
  const torch::Tensor W0 = W.detach().clone();
  LowRankOptimizer opt(single_weight(W), hadamard_config(5e-2, 0.0, r, 2.0, Init::zero));
  for (int64_t t = 0; t < 30; ++t) step(opt, W, t);
  torch::Tensor S = torch::linalg_svdvals(W.detach() - W0);
  const int64_t rank = (S > 1e-9 * S[0].item<double>()).sum().item<int64_t>();
  EXPECT_GT(rank, r);
  EXPECT_LE(rank, r * r);
}

TEST(Hadamard, ReportNotesTheRowPanels) {
  torch::Tensor W = weight(12, 10);
  LowRankOptimizer opt(single_weight(W), hadamard_config(1e-3, 0.0, 2, 2.0, Init::zero));
  const ParamReport& p = opt.report().params.at(0);
  EXPECT_EQ(p.trainable, 2 * 2 * (12 + 10));
  EXPECT_NE(p.note.find("row panels for the 12x10 products"), std::string::npos) << p.note;
  EXPECT_NE(p.note.find("rank(dP) <= 4"), std::string::npos) << p.note;
  try {
    opt.factors("w");
    ADD_FAILURE() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("state_tensors"), std::string::npos) << e.what();
  }
}

TEST(Hadamard, CheckpointRoundTripContinuesIdentically) {
  torch::Tensor W1 = weight(9, 6).requires_grad_();
  const Config c = hadamard_config(1e-2, 0.01, 2, 4.0, Init::symmetric);
  LowRankOptimizer a(single_weight(W1), c);
  for (int64_t t = 0; t < 5; ++t) step(a, W1, t);
  torch::Tensor W2 = W1.detach().clone().requires_grad_();
  LowRankOptimizer b(single_weight(W2), c);
  method_testing::copy_state(a, b);
  for (int64_t t = 5; t < 10; ++t) {
    step(a, W1, t);
    step(b, W2, t);
  }
  EXPECT_TRUE(torch::equal(W1, W2)) << max_abs_diff(W1, W2);
}

// The row-panel maths against the formulas written out at full size, on a matrix wide
// enough for several panels (4096 doubles a row: 8 rows a panel, 20 rows).
TEST(Hadamard, RowPanelsEqualTheFullSizeFormulas) {
  const int64_t n = 20, m = 4096, r = 3;
  const auto o = torch::TensorOptions().dtype(torch::kDouble);
  auto gen = at::detail::createCPUGenerator(5);
  auto rnd = [&](std::vector<int64_t> shape) { return at::randn(shape, gen, o); };
  const torch::Tensor G = rnd({n, m}), A1 = rnd({n, r}), B1 = rnd({r, m}), A2 = rnd({n, r}), B2 = rnd({r, m});
  const double s = 0.7;
  const auto g = hadamard_factor_grads(G, A1, B1, A2, B2, s);
  const torch::Tensor H1 = G * A2.mm(B2), H2 = G * A1.mm(B1);
  EXPECT_LT(max_abs_diff(g[0], s * H1.mm(B1.t())), 1e-9);
  EXPECT_LT(max_abs_diff(g[1], s * A1.t().mm(H1)), 1e-9);
  EXPECT_LT(max_abs_diff(g[2], s * H2.mm(B2.t())), 1e-9);
  EXPECT_LT(max_abs_diff(g[3], s * A2.t().mm(H2)), 1e-9);
  const torch::Tensor A1n = A1 + 0.1 * rnd({n, r}), B1n = B1 + 0.1 * rnd({r, m});
  const torch::Tensor A2n = A2 + 0.1 * rnd({n, r}), B2n = B2 + 0.1 * rnd({r, m});
  const torch::Tensor P0 = rnd({n, m});
  torch::Tensor P = P0.clone();
  hadamard_write_back(P, {A1, B1, A2, B2}, {A1n, B1n, A2n, B2n}, s);
  const torch::Tensor expected = P0 + s * (A1n.mm(B1n) * A2n.mm(B2n) - A1.mm(B1) * A2.mm(B2));
  EXPECT_LT(max_abs_diff(P, expected), 1e-9);
  EXPECT_GT(max_abs_diff(P, P0), 1.0);  // the change is not small against the tolerance
}

}  // namespace
}  // namespace gradlora
