// Where weight decay acts (one rule per method, README's method table) and
// max_grad_norm (the optimizer's own gradient clip, exact in fused mode).
#include "test_util.h"

#include <cmath>

using namespace gradlora;
using namespace gradlora::testing;  // the shared test helpers (test_util.h)

namespace {

/// A lone parameter "w" (a copy of P0) and its optimizer.
struct Lone {
  torch::Tensor P;
  std::unique_ptr<LowRankOptimizer> opt;
  Lone(const torch::Tensor& P0, const std::string& yaml) : P(P0.clone()) {
    const auto params = single_weight(P);
    opt = std::make_unique<LowRankOptimizer>(params, quiet(yaml));
  }
  void step(const torch::Tensor& G) {
    P.mutable_grad() = G.clone();
    opt->step();
  }
};

}  // namespace

// ---- random: the decay acts on the weight

TEST(WeightDecay, RandomExpectedSgdUpdateIsFullSgdWithDecay) {
  // Inner SGD, coupled decay: E[ΔP] = −lr·(G + wd·P), full SGD's update. P is large
  // against G so that the decay term is half of the update: dropping it fails the bound.
  torch::manual_seed(11);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P = 2.0 * torch::randn({12, 10}, opts);
  const torch::Tensor G = torch::randn({12, 10}, opts);
  const double lr = 1e-3, wd = 0.5;
  const int N = 4000;
  torch::Tensor sum = torch::zeros_like(P), sq = torch::zeros_like(P);
  for (int i = 0; i < N; ++i) {
    Lone x(P, fmt::format("seed: {}\noptimizer: {{type: sgd, lr: {}, weight_decay: {}}}\n"
                          "targets: [{{match: w, method: random, rank: 2, alpha: 4}}]",
                          i, lr, wd));
    x.step(G);
    const torch::Tensor d = x.P - P;
    sum += d;
    sq += d * d;
  }
  const torch::Tensor mean = sum / N;
  const torch::Tensor se = ((sq / N - mean * mean) * N / (N - 1) / N).sqrt();
  const torch::Tensor with_decay = -lr * (G + wd * P), without = -lr * G;
  const double z = ((mean - with_decay).abs() / se).max().item<double>();
  const double z_without = ((mean - without).abs() / se).max().item<double>();
  const double rel = ((mean - with_decay).norm() / with_decay.norm()).item<double>();
  std::cout << "random, inner sgd, wd " << wd << ", " << N << " draws: max z " << z << " (against the update without "
            << "decay: " << z_without << "), relative error " << rel << "\n";
  EXPECT_LE(z, 5.0);
  EXPECT_LT(rel, 0.05);
  EXPECT_GT(z_without, 5.0);  // the bound can tell the two apart
}

TEST(WeightDecay, RandomAdamwDecaysTheWeightDecoupled) {
  // AdamW: P ← (1 − lr·wd)·P plus the same low-rank step as without decay (the draws and
  // the projected gradients do not depend on the decay).
  torch::manual_seed(12);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P = torch::randn({12, 10}, opts);
  const double lr = 0.01, wd = 0.3;
  auto yaml = [&](double d) {
    return fmt::format(
        "seed: 4\noptimizer: {{type: adamw, lr: {}, weight_decay: {}}}\n"
        "targets: [{{match: w, method: random, rank: 2, resample_every: 2}}]",
        lr, d);
  };
  Lone with(P, yaml(wd)), without(P, yaml(0.0));
  torch::Tensor expect = P.clone();
  for (int s = 0; s < 4; ++s) {
    const torch::Tensor G = torch::randn({12, 10}, opts);
    const torch::Tensor before = without.P.clone();
    without.step(G);
    with.step(G);
    expect = (1.0 - lr * wd) * expect + (without.P - before);
    EXPECT_LT(max_abs_diff(with.P, expect), 1e-12) << "step " << s;
  }
  EXPECT_GT(max_abs_diff(with.P, without.P), 1e-4);
}

// ---- lora: PEFT's decay for init zero, decay toward the start for init symmetric

namespace {

/// Two SGD steps of `lora` on a lone 8×6 weight; checks the second against the
/// formulas A2 = A1 − lr·(s·G2·B1ᵀ + wd·(A1 − anchorA)), B2 likewise.
void check_second_sgd_step(const std::string& init, const std::string& writeback, bool anchor_at_start) {
  SCOPED_TRACE(init + " " + writeback);
  torch::manual_seed(13);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P0 = torch::randn({8, 6}, opts);
  const double lr = 0.05, wd = 0.4, s = 4.0 / 2;
  Lone x(P0, fmt::format("seed: 3\noptimizer: {{type: sgd, lr: {}, weight_decay: {}}}\n"
                         "targets: [{{match: w, method: lora, rank: 2, alpha: 4, init: {}, writeback: {}}}]",
                         lr, wd, init, writeback));
  auto [A0, B0] = x.opt->projector("w").initial_factors();
  A0 = A0.clone();
  B0 = B0.clone();
  x.step(torch::randn({8, 6}, opts));
  const torch::Tensor A1 = x.opt->factors("w").first.clone(), B1 = x.opt->factors("w").second.clone();
  const torch::Tensor P1 = x.P.clone();
  const torch::Tensor G2 = torch::randn({8, 6}, opts);
  x.step(G2);
  const torch::Tensor aA = anchor_at_start ? A0 : torch::zeros_like(A0);
  const torch::Tensor aB = anchor_at_start ? B0 : torch::zeros_like(B0);
  const torch::Tensor A2 = A1 - lr * (s * G2.mm(B1.t()) + wd * (A1 - aA));
  const torch::Tensor B2 = B1 - lr * (s * A1.t().mm(G2) + wd * (B1 - aB));
  EXPECT_LT(max_abs_diff(x.opt->factors("w").first, A2), 1e-13);
  EXPECT_LT(max_abs_diff(x.opt->factors("w").second, B2), 1e-13);
  EXPECT_LT(max_abs_diff(x.P, P1 + s * (A2.mm(B2) - A1.mm(B1))), 1e-12);
}

}  // namespace

TEST(WeightDecay, LoraZeroInitDecaysTheFactorsAsPeft) {
  check_second_sgd_step("zero", "incremental", false);
  check_second_sgd_step("zero", "exact", false);
}

TEST(WeightDecay, LoraSymmetricInitDecaysTowardTheStart) {
  check_second_sgd_step("symmetric", "incremental", true);
  check_second_sgd_step("symmetric", "exact", true);
}

TEST(WeightDecay, LoraSymmetricAdamwPullsTowardTheStart) {
  // Step 1 leaves the factors' start (where the decay is 0); step 2's decoupled decay is
  // −lr·wd·(A1 − A0), the only difference from a run without decay.
  torch::manual_seed(14);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P0 = torch::randn({8, 6}, opts);
  const double lr = 0.02, wd = 0.25;
  auto yaml = [&](double d) {
    return fmt::format(
        "seed: 3\noptimizer: {{type: adamw, lr: {}, weight_decay: {}}}\n"
        "targets: [{{match: w, method: lora, rank: 2, init: symmetric}}]",
        lr, d);
  };
  Lone with(P0, yaml(wd)), without(P0, yaml(0.0));
  const torch::Tensor A0 = with.opt->projector("w").initial_factors().first.clone();
  const torch::Tensor G1 = torch::randn({8, 6}, opts), G2 = torch::randn({8, 6}, opts);
  with.step(G1);
  without.step(G1);
  const torch::Tensor A1 = with.opt->factors("w").first.clone();
  EXPECT_TRUE(torch::equal(A1, without.opt->factors("w").first));
  with.step(G2);
  without.step(G2);
  EXPECT_LT(max_abs_diff(with.opt->factors("w").first, without.opt->factors("w").first - lr * wd * (A1 - A0)), 1e-14);
}

TEST(WeightDecay, ZeroGradientLeavesTheWeightAtItsStart) {
  // With G = 0 the only force is the decay; it must pull toward P0, which is where P is:
  // nothing moves. Decaying non-zero factors toward 0 would move P (to P0 − s·ΔP_init).
  for (const char* t :
       {"{match: w, method: lora, rank: 2, init: symmetric}", "{match: w, method: hadamard, rank: 2, init: symmetric}",
        "{match: w, method: hadamard, rank: 2, init: symmetric, writeback: exact}"}) {
    for (const char* type : {"adamw", "sgd"}) {
      SCOPED_TRACE(std::string(t) + " " + type);
      torch::manual_seed(15);
      const torch::Tensor P0 = torch::randn({8, 6});
      Lone x(P0, fmt::format("optimizer: {{type: {}, lr: 0.1, weight_decay: 0.5}}\ntargets: [{}]", type, t));
      for (int s = 0; s < 5; ++s) x.step(torch::zeros({8, 6}));
      EXPECT_TRUE(torch::equal(x.P, P0));
    }
  }
}

// ---- max_grad_norm

namespace {

struct ClipCase {
  std::string fc1;  // fc1.weight's target (fc2.weight: lora; the rest: full)
  bool fused;
  int backwards;  // micro-batches per step
};

std::string clip_yaml(const ClipCase& c, std::optional<double> max_norm) {
  return fmt::format(
      "seed: 9\noptimizer: {{type: sgd, lr: 0.05, momentum: 0.9}}\ndefault: full\nfuse_into_backward: {}\n{}"
      "targets: [{{match: fc1.weight, {}}}, {{match: fc2.weight, method: lora, rank: 2, init: symmetric}}]",
      c.fused ? "true" : "false", max_norm ? fmt::format("max_grad_norm: {}\n", *max_norm) : "", c.fc1);
}

class MaxGradNorm : public ::testing::TestWithParam<ClipCase> {};

}  // namespace

TEST_P(MaxGradNorm, EqualsClipGradNormThenAnUnfusedStep) {
  // Reference: no max_grad_norm, unfused; torch::nn::utils::clip_grad_norm_ on the summed
  // gradients, then step(). SGD: a wrong scale shows (Adam would hide a constant one).
  const ClipCase& c = GetParam();
  const double max_norm = 0.05;
  Mlp ref = make_mlp(torch::kDouble), got = make_mlp(torch::kDouble);
  LowRankOptimizer ref_opt(ref->named_parameters(), quiet(clip_yaml({c.fc1, false, 1}, std::nullopt)));
  LowRankOptimizer got_opt(got->named_parameters(), quiet(clip_yaml(c, max_norm)));
  for (int step = 0; step < 4; ++step) {
    ref_opt.zero_grad();
    got_opt.zero_grad();
    for (int k = 0; k < c.backwards; ++k) {
      auto [x, y] = batch(c.backwards * step + k, torch::kDouble);
      torch::mse_loss(ref->forward(x), y).backward();
      torch::mse_loss(got->forward(x), y).backward();
    }
    const double norm = torch::nn::utils::clip_grad_norm_(ref->parameters(), max_norm);
    ASSERT_GT(norm, 2 * max_norm) << "the clip must be active for the test to mean anything";
    ref_opt.step();
    got_opt.step();
    const auto a = ref->named_parameters(), b = got->named_parameters();
    for (const auto& kv : a) {
      EXPECT_LT(max_abs_diff(kv.value(), b[kv.key()]), 1e-9) << kv.key() << " at step " << step;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MaxGradNorm,
    ::testing::Values(ClipCase{"method: lora, rank: 3", false, 1}, ClipCase{"method: lora, rank: 3", true, 1},
                      ClipCase{"method: lora, rank: 3", false, 3}, ClipCase{"method: random, rank: 3", true, 1},
                      ClipCase{"method: galore, rank: 3", true, 1}, ClipCase{"method: additive, rank: 3", true, 1},
                      ClipCase{"method: hadamard, rank: 2", true, 1}, ClipCase{"method: full", false, 3},
                      ClipCase{"method: galore, rank: 3", false, 2}));

TEST(MaxGradNormFused, AccumulationIsRefusedNamingTheParameterAndChangesNothing) {
  // In fused mode the hook sees each micro-batch's gradient only: the norm of their sum
  // is unknowable from the projections, so step() refuses before changing anything.
  Mlp m = make_mlp(torch::kDouble);
  LowRankOptimizer opt(m->named_parameters(), quiet(clip_yaml({"method: lora, rank: 3", true, 2}, 0.05)));
  std::vector<torch::Tensor> before;
  for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
  for (int k = 0; k < 2; ++k) {
    auto [x, y] = batch(k, torch::kDouble);
    torch::mse_loss(m->forward(x), y).backward();
  }
  try {
    opt.step();
    ADD_FAILURE() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'fc1.weight' received 2 gradients"), std::string::npos) << e.what();
  }
  const auto params = m->parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i], before[i]));
  // After zero_grad the same optimizer steps as usual.
  opt.zero_grad();
  auto [x, y] = batch(0, torch::kDouble);
  torch::mse_loss(m->forward(x), y).backward();
  EXPECT_NO_THROW(opt.step());
}

TEST(MaxGradNormConfig, RejectsNonPositive) {
  expect_config_error([] { quiet("max_grad_norm: 0"); }, {"max_grad_norm", "> 0", "got 0"});
  expect_config_error([] { quiet("max_grad_norm: -1"); }, {"max_grad_norm", "got -1"});
}
