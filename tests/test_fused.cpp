// Fused in-backward mode: projection inside backward(), identical results,
// no full gradient stored, exact micro-batch accumulation.
#include "test_util.h"

using namespace gradlora;
using namespace gradlora::testing;  // the shared test helpers (test_util.h)

namespace {

constexpr const char* kTargets = R"(
optimizer: {type: adamw, lr: 0.01, weight_decay: 0.05}
targets:
  - {match: fc1.weight, method: lora, rank: 3, init: symmetric}
  - {match: fc2.weight, method: random, rank: 2, resample_every: 2, on_resample: transfer}
  - {match: "*.bias", method: full}
)";

struct TrainResult {
  std::vector<torch::Tensor> weights;
  int64_t steps = 0;
  double lr = 0;
};

TrainResult train(bool fused, int micro_batches, torch::Device device, int steps = 10) {
  Mlp m = make_mlp(torch::kDouble, device);
  Config c = quiet(std::string(kTargets) + (fused ? "fuse_into_backward: true\n" : ""));
  LowRankOptimizer opt(m->named_parameters(), c);
  torch::optim::StepLR sched(opt, 3, 0.5);
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    for (int k = 0; k < micro_batches; ++k) {
      auto [x, y] = batch(i * micro_batches + k, torch::kDouble, device);
      torch::mse_loss(m->forward(x), y).backward();
      if (fused) {
        // At most an empty placeholder, never the full gradient.
        EXPECT_EQ(m->fc(1)->weight.grad().defined() ? m->fc(1)->weight.grad().numel() : 0, 0)
            << "fused mode must not store the full gradient";
        EXPECT_EQ(m->fc(2)->weight.grad().defined() ? m->fc(2)->weight.grad().numel() : 0, 0);
        EXPECT_TRUE(m->fc(1)->bias.grad().defined()) << "full parameters keep their gradient";
      }
    }
    opt.step();
    sched.step();
  }
  TrainResult r;
  for (const auto& p : m->parameters()) r.weights.push_back(p.detach().clone());
  r.steps = opt.step_count();
  r.lr = opt.param_groups()[0].options().get_lr();
  EXPECT_EQ(opt.projector("fc1.weight").steps(), steps);
  return r;
}

// Fused and non-fused runs compared on the same device.
class Fused : public ::testing::TestWithParam<torch::Device> {};

}  // namespace

TEST_P(Fused, SameWeightsAsNonFused) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  TrainResult a = train(false, 1, device), b = train(true, 1, device);
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i) EXPECT_TRUE(torch::equal(a.weights[i], b.weights[i])) << i;
  EXPECT_EQ(a.steps, b.steps);
  EXPECT_DOUBLE_EQ(a.lr, b.lr);
}

TEST_P(Fused, MicroBatchAccumulationIsExact) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  // Three backward() per step: fused accumulates projected gradients, the
  // plain mode projects the accumulated gradient. Linear, so equal to rounding.
  TrainResult a = train(false, 3, device), b = train(true, 3, device);
  for (size_t i = 0; i < a.weights.size(); ++i) EXPECT_LE(max_abs_diff(a.weights[i], b.weights[i]), 1e-12) << i;
  // And accumulation is not a no-op: one micro-batch per step differs.
  TrainResult c = train(true, 1, device);
  EXPECT_GT(max_abs_diff(c.weights[0], b.weights[0]), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Devices, Fused, ::testing::ValuesIn(test_devices()), DeviceName());

TEST(Fused, ZeroGradDropsUnsteppedProjections) {
  // Through the optimizer's zero_grad, and by zeroing the gradient in place (LibTorch 1.13's
  // only behaviour, set_to_none=false in 2.x): that bumps the placeholder's version counter,
  // and the hook must start afresh then too.
  for (bool in_place : {false, true}) {
    SCOPED_TRACE(in_place ? "grad zeroed in place" : "opt.zero_grad()");
    Mlp m = make_mlp();
    LowRankOptimizer opt(m->named_parameters(), quiet("fuse_into_backward: true\n"
                                                      "targets: [{match: fc1.weight, rank: 2, init: symmetric}]"));
    const torch::Tensor w = m->fc(1)->weight.detach().clone();
    auto [x, y] = batch(0);
    torch::mse_loss(m->forward(x), y).backward();
    if (in_place) {
      ASSERT_TRUE(m->fc(1)->weight.grad().defined());
      m->fc(1)->weight.mutable_grad().zero_();
    } else {
      opt.zero_grad();
    }
    opt.step();  // nothing pending: nothing moves
    EXPECT_TRUE(torch::equal(m->fc(1)->weight, w));
    EXPECT_EQ(opt.projector("fc1.weight").steps(), 0);
  }
}

namespace {

// backward(x1), zero_grad() through the base class, backward(x2), step(): the weights must
// equal those of an unfused backward(x2), step(). `zero` selects how the gradients are dropped.
enum class Zero { optimizer_base, module, none };

std::vector<torch::Tensor> zeroed_between_backwards(bool fused, Zero zero) {
  Mlp m = make_mlp(torch::kDouble);
  LowRankOptimizer opt(m->named_parameters(),
                       quiet(std::string(kTargets) + (fused ? "fuse_into_backward: true\n" : "")));
  torch::optim::Optimizer& base = opt;  // what a generic training loop holds
  for (int i = 0; i < 4; ++i) {
    auto [x1, y1] = batch(100 + i, torch::kDouble);
    torch::mse_loss(m->forward(x1), y1).backward();
    if (zero == Zero::optimizer_base) base.zero_grad();
    if (zero == Zero::module) m->zero_grad();
    if (zero == Zero::none && !fused) {
      // the reference: only x2's gradient reaches the step
      for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
    }
    auto [x2, y2] = batch(200 + i, torch::kDouble);
    torch::mse_loss(m->forward(x2), y2).backward();
    base.step();
    base.zero_grad();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

}  // namespace

TEST(Fused, ZeroGradThroughTheBaseClassDropsEarlierBackwards) {
  const auto reference = zeroed_between_backwards(false, Zero::none);
  for (Zero z : {Zero::optimizer_base, Zero::module}) {
    const auto fused = zeroed_between_backwards(true, z);
    for (size_t i = 0; i < reference.size(); ++i) {
      EXPECT_LE(max_abs_diff(fused[i], reference[i]), 1e-12)
          << "tensor " << i << ", zero_grad of the " << (z == Zero::module ? "module" : "optimizer");
    }
  }
  // Control: without a zero_grad between the two backward passes, fused mode accumulates both.
  const auto kept = zeroed_between_backwards(true, Zero::none);
  EXPECT_GT(max_abs_diff(kept[0], reference[0]), 1e-6);
}

TEST(Fused, GradientsFlowNormallyAfterTheOptimizerIsGone) {
  Mlp m = make_mlp();
  {
    LowRankOptimizer opt(m->named_parameters(), quiet("fuse_into_backward: true\n"
                                                      "targets: [{match: fc1.weight, rank: 2}]"));
  }
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  EXPECT_TRUE(m->fc(1)->weight.grad().defined());
}
