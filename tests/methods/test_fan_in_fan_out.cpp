// Target `fan_in_fan_out: true`: a weight stored (in, out), as GPT-2's Conv1D,
// is trained as its out×in transpose. Every low-rank method on the stored
// tensor must do what it does on an untransposed copy (out, in), step for step.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>

#include "method_util.h"

namespace gradlora {
namespace {

using namespace method_testing;  // the shared helpers (method_util.h)
using ::gradlora::testing::CaseAndDeviceName;
using ::gradlora::testing::test_devices;

constexpr int64_t kOutDim = 10, kInDim = 6;

struct FfioCase {
  const char* name;
  Method method;
  Init init;
  WriteBack writeback;
  torch::ScalarType dtype;
};

std::ostream& operator<<(std::ostream& os, const FfioCase& c) {
  return os << c.name << " init " << to_string(c.init) << " writeback " << to_string(c.writeback) << " "
            << c10::toString(c.dtype);
}

Config ffio_config(const FfioCase& c, bool fan_in_fan_out) {
  // SGD with momentum and a scale s = alpha / rank ≠ 1: the factor gradients carry s, so a
  // scale applied on the wrong side (or not at all) shows.
  Config cfg = config(c.method, InnerType::sgd, 0.05, 0.0, 3);
  cfg.optimizer.momentum = 0.9;
  Target& t = cfg.targets[0];
  t.alpha = 7.5;
  t.init = c.init;
  t.writeback = c.writeback;
  t.fan_in_fan_out = fan_in_fan_out;
  if (c.method == Method::random) t.options["resample_every"] = int64_t{2};
  if (c.method == Method::galore || c.method.name() == "apollo") t.options["update_proj_gap"] = int64_t{3};
  return cfg;
}

class FanInFanOut : public ::testing::TestWithParam<std::tuple<FfioCase, torch::Device>> {};

TEST_P(FanInFanOut, MatchesTheSameMethodOnTheUntransposedWeight) {
  const auto& [c, device] = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  // W is (out, in) as a Linear stores it; Wt holds the same values stored (in, out).
  torch::Tensor W = weight(kOutDim, kInDim, c.dtype).to(device).requires_grad_();
  torch::Tensor Wt = W.detach().t().contiguous().requires_grad_();
  const torch::Tensor W0 = W.detach().clone();
  LowRankOptimizer plain(single_weight(W), ffio_config(c, false));
  LowRankOptimizer ffio(single_weight(Wt), ffio_config(c, true));
  EXPECT_EQ(ffio.projector("w").rows(), kOutDim);
  EXPECT_EQ(ffio.projector("w").cols(), kInDim);
  for (int64_t t = 0; t < 7; ++t) {
    // The gradient of the stored tensor is in its stored layout: that of W, transposed.
    W.mutable_grad() = grad(W, t);
    Wt.mutable_grad() = grad(Wt.detach().t(), t).t().contiguous();
    plain.step();
    ffio.step();
  }
  EXPECT_GT(max_abs_diff(W, W0), 1e-2) << "training changed little";
  EXPECT_EQ(Wt.sizes(), (std::vector<int64_t>{kInDim, kOutDim})) << "the stored layout stays";
  EXPECT_LE(max_abs_diff(Wt.t(), W), 1e-6);
  if (c.method == Method::lora || c.method == Method::additive) {
    // The factors mean the same: A is out×r and B r×in in both.
    auto [A, B] = plain.projector("w").factors();
    auto [At, Bt] = ffio.projector("w").factors();
    EXPECT_EQ(At.sizes(), A.sizes());
    EXPECT_EQ(Bt.sizes(), B.sizes());
    EXPECT_LE(max_abs_diff(At, A), 1e-6);
    EXPECT_LE(max_abs_diff(Bt, B), 1e-6);
  }
}

const FfioCase kCases[] = {
    {"lora", Method::lora, Init::zero, WriteBack::incremental, torch::kFloat},
    {"lora", Method::lora, Init::zero, WriteBack::exact, torch::kFloat},
    {"lora", Method::lora, Init::symmetric, WriteBack::exact, torch::kDouble},
    {"lora", Method::lora, Init::symmetric, WriteBack::incremental, torch::kDouble},
    {"random", Method::random, Init::zero, WriteBack::incremental, torch::kDouble},
    {"random", Method::random, Init::zero, WriteBack::exact, torch::kFloat},  // master copy
    {"additive", Method::additive, Init::zero, WriteBack::incremental, torch::kDouble},
    {"additive", Method::additive, Init::zero, WriteBack::exact, torch::kFloat},
    {"galore", Method::galore, Init::zero, WriteBack::incremental, torch::kDouble},
    {"galore", Method::galore, Init::zero, WriteBack::exact, torch::kFloat},  // master copy
    {"hadamard", Method::hadamard, Init::symmetric, WriteBack::incremental, torch::kDouble},
    {"hadamard", Method::hadamard, Init::symmetric, WriteBack::exact, torch::kFloat},  // master copy
    {"apollo", Method("apollo"), Init::zero, WriteBack::incremental, torch::kDouble},
    {"apollo", Method("apollo"), Init::zero, WriteBack::exact, torch::kFloat},  // master copy
};

INSTANTIATE_TEST_SUITE_P(Methods, FanInFanOut,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::ValuesIn(test_devices())),
                         CaseAndDeviceName());

// bf16 weights with an exact write-back: P = round(P0 + s·A·B) by row panels of the transposed
// view. The factors follow the same trajectory; the weights agree to bf16's rounding.
TEST(FanInFanOut, Bf16ExactWriteBackGoesIntoTheStoredTensor) {
  const FfioCase c{"lora", Method::lora, Init::zero, WriteBack::exact, torch::kBFloat16};
  torch::Tensor W = weight(kOutDim, kInDim, c.dtype).requires_grad_();
  torch::Tensor Wt = W.detach().t().contiguous().requires_grad_();
  const void* storage = Wt.data_ptr();
  LowRankOptimizer plain(single_weight(W), ffio_config(c, false));
  LowRankOptimizer ffio(single_weight(Wt), ffio_config(c, true));
  for (int64_t t = 0; t < 5; ++t) {
    // One gradient for both: a bf16 rounding that differs once would otherwise change every later one.
    W.mutable_grad() = grad(W, t);
    Wt.mutable_grad() = W.grad().t().contiguous();
    plain.step();
    ffio.step();
  }
  EXPECT_EQ(Wt.data_ptr(), storage) << "written in place";
  auto [A, B] = plain.projector("w").factors();
  auto [At, Bt] = ffio.projector("w").factors();
  EXPECT_GT(A.abs().max().item<double>(), 1e-3);
  EXPECT_LE(max_abs_diff(At, A), 1e-5);
  EXPECT_LE(max_abs_diff(Bt, B), 1e-5);
  // One bf16 rounding of the same fp32 value: equal but where A·B differ in their last fp32 bits.
  EXPECT_LE(max_abs_diff(Wt.t(), W), 1.0 / 64);
  EXPECT_GE((Wt.t() == W).to(torch::kDouble).mean().item<double>(), 0.95);
}

// A checkpoint of a transposed weight does not load into an untransposed one of the same
// (square) shape: its factors mean the transposed matrix.
TEST(FanInFanOut, CheckpointSettingsNameIt) {
  const FfioCase c{"lora", Method::lora, Init::zero, WriteBack::incremental, torch::kFloat};
  torch::Tensor W = weight(6, 6, torch::kFloat).requires_grad_();
  LowRankOptimizer ffio(single_weight(W), ffio_config(c, true));
  LowRankOptimizer plain(single_weight(W.detach().clone().requires_grad_()), ffio_config(c, false));
  try {
    copy_state(ffio, plain);
    ADD_FAILURE() << "a fan_in_fan_out checkpoint loaded into an untransposed target";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("fan_in_fan_out true"), std::string::npos) << e.what();
  }
  LowRankOptimizer again(single_weight(W.detach().clone().requires_grad_()), ffio_config(c, true));
  EXPECT_NO_THROW(copy_state(ffio, again));
}

}  // namespace
}  // namespace gradlora
