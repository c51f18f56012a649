// Fused in-backward mode: projection inside backward(), identical results,
// no full gradient stored, exact micro-batch accumulation.
#include "test_util.h"

using namespace gradlora;
using gradlora::testing::batch;
using gradlora::testing::make_mlp;
using gradlora::testing::max_abs_diff;
using gradlora::testing::Mlp2;
using gradlora::testing::quiet;

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

TrainResult train(bool fused, int micro_batches, int steps = 10) {
  Mlp2 m = make_mlp(torch::kDouble);
  Config c = quiet(std::string(kTargets) + (fused ? "fuse_into_backward: true\n" : ""));
  LowRankOptimizer opt(m->named_parameters(), c);
  torch::optim::StepLR sched(opt, 3, 0.5);
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    for (int k = 0; k < micro_batches; ++k) {
      auto [x, y] = batch(i * micro_batches + k, torch::kDouble);
      torch::mse_loss(m->forward(x), y).backward();
      if (fused) {
        EXPECT_FALSE(m->fc1->weight.grad().defined()) << "fused mode must not store the full gradient";
        EXPECT_FALSE(m->fc2->weight.grad().defined());
        EXPECT_TRUE(m->fc1->bias.grad().defined()) << "full parameters keep their gradient";
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

}  // namespace

TEST(Fused, SameWeightsAsNonFused) {
  TrainResult a = train(false, 1), b = train(true, 1);
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i) EXPECT_TRUE(torch::equal(a.weights[i], b.weights[i])) << i;
  EXPECT_EQ(a.steps, b.steps);
  EXPECT_DOUBLE_EQ(a.lr, b.lr);
}

TEST(Fused, MicroBatchAccumulationIsExact) {
  // Three backward() per step: fused accumulates projected gradients, the
  // plain mode projects the accumulated gradient. Linear, so equal to rounding.
  TrainResult a = train(false, 3), b = train(true, 3);
  for (size_t i = 0; i < a.weights.size(); ++i) EXPECT_LE(max_abs_diff(a.weights[i], b.weights[i]), 1e-12) << i;
  // And accumulation is not a no-op: one micro-batch per step differs.
  TrainResult c = train(true, 1);
  EXPECT_GT(max_abs_diff(c.weights[0], b.weights[0]), 1e-6);
}

TEST(Fused, ZeroGradDropsUnsteppedProjections) {
  Mlp2 m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(), quiet("fuse_into_backward: true\n"
                                                    "targets: [{match: fc1.weight, rank: 2, init: symmetric}]"));
  const torch::Tensor w = m->fc1->weight.detach().clone();
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  opt.zero_grad();
  opt.step();  // nothing pending: nothing moves
  EXPECT_TRUE(torch::equal(m->fc1->weight, w));
  EXPECT_EQ(opt.projector("fc1.weight").steps(), 0);
}

TEST(Fused, GradientsFlowNormallyAfterTheOptimizerIsGone) {
  Mlp2 m = make_mlp();
  {
    LowRankOptimizer opt(m->named_parameters(), quiet("fuse_into_backward: true\n"
                                                      "targets: [{match: fc1.weight, rank: 2}]"));
  }
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  EXPECT_TRUE(m->fc1->weight.grad().defined());
}
