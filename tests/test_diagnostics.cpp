// Subspace diagnostics (Config::diagnostics): the share of the gradient's energy a
// low-rank step can use, against references computed here in double from the
// definitions (orthogonal projectors from pseudo-inverses, SVDs), and the overlap of
// a refreshed galore projector with the previous one.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.h"

#include <cmath>
#include <string>

using namespace gradlora;
using ::gradlora::testing::quiet;
using ::gradlora::testing::seeded_randn;
using ::gradlora::testing::single_weight;

namespace {

constexpr int64_t kN = 14, kM = 10;

/// ‖Π(G)‖²/‖G‖² for the tangent space {X·B + A·Y} of P = P0 + s·A·B: Π(G) = P_A·G +
/// G·P_B − P_A·G·P_B with the orthogonal projectors P_A = A·A⁺ and P_B = B⁺·B.
double tangent_share(const torch::Tensor& G, const torch::Tensor& A, const torch::Tensor& B) {
  const torch::Tensor g = G.to(torch::kDouble), a = A.to(torch::kDouble), b = B.to(torch::kDouble);
  const torch::Tensor Pa = torch::mm(a, torch::linalg_pinv(a)), Pb = torch::mm(torch::linalg_pinv(b), b);
  const torch::Tensor pi = torch::mm(Pa, g) + torch::mm(g, Pb) - torch::mm(torch::mm(Pa, g), Pb);
  return pi.square().sum().item<double>() / g.square().sum().item<double>();
}

/// One step of `opt` on W with gradient G (set by hand); returns the stats of "w".
SubspaceStats step_with(LowRankOptimizer& opt, torch::Tensor& W, const torch::Tensor& G) {
  W.mutable_grad() = G.clone();
  opt.step();
  const auto stats = opt.subspace_stats();
  EXPECT_EQ(stats.size(), 1u);
  return stats.at(0);
}

const char* kHead = "seed: 5\ndiagnostics: true\noptimizer: {type: sgd, lr: 0.01}\n";

}  // namespace

TEST(Diagnostics, LoraEnergyIsTheShareOfTheGradientInTheFactorsTangentSpace) {
  // Symmetric init: A and B both non-zero, so all three terms of Π matter.
  torch::Tensor W = seeded_randn({kN, kM}, 1, torch::kFloat);
  LowRankOptimizer opt(single_weight(W),
                       quiet(std::string(kHead) + "targets: [{match: w, method: lora, rank: 3, init: symmetric}]\n"));
  for (int k = 0; k < 3; ++k) {
    const torch::Tensor A = opt.state_tensors("w").at("A").clone(), B = opt.state_tensors("w").at("B").clone();
    const torch::Tensor G = seeded_randn({kN, kM}, 10 + k, torch::kFloat);
    const SubspaceStats st = step_with(opt, W, G);
    const double want = tangent_share(G, A, B);
    EXPECT_NEAR(st.energy_kept, want, 1e-6 * want) << "step " << k;
    EXPECT_GT(want, 0.3);
    EXPECT_LT(want, 0.95);
    EXPECT_TRUE(std::isnan(st.overlap));  // lora has no projector to refresh
  }
  // Zero init: A = 0 at the first step, so only G·P_B counts.
  torch::Tensor W0 = seeded_randn({kN, kM}, 2, torch::kFloat);
  LowRankOptimizer zero(single_weight(W0),
                        quiet(std::string(kHead) + "targets: [{match: w, method: lora, rank: 3}]\n"));
  const torch::Tensor B = zero.state_tensors("w").at("B").clone();
  const torch::Tensor G = seeded_randn({kN, kM}, 20, torch::kFloat);
  const double want = tangent_share(G, torch::zeros({kN, 3}), B);
  EXPECT_NEAR(step_with(zero, W0, G).energy_kept, want, 1e-6 * want);
}

TEST(Diagnostics, RandomEnergyUsesTheDrawsOfTheStep) {
  torch::Tensor W = seeded_randn({kN, kM}, 3, torch::kFloat);
  LowRankOptimizer opt(single_weight(W), quiet(std::string(kHead) +
                                               "targets: [{match: w, method: random, rank: 2, resample_every: 2}]\n"));
  // Learning rate 0: after a step the factors are exactly the draws that step projected on.
  opt.param_groups()[0].options().set_lr(0.0);
  torch::Tensor previous;
  for (int k = 0; k < 3; ++k) {  // steps 1 and 3 resample
    const torch::Tensor G = seeded_randn({kN, kM}, 30 + k, torch::kFloat);
    const SubspaceStats st = step_with(opt, W, G);
    const auto [A, B] = opt.projector("w").factors();
    const double want = tangent_share(G, A, B);
    EXPECT_NEAR(st.energy_kept, want, 1e-6 * want) << "step " << k;
    if (k == 1) EXPECT_TRUE(torch::equal(previous, B)) << "the draws of step 1 are kept";
    if (k == 2) EXPECT_FALSE(torch::equal(previous, B)) << "step 3 draws afresh";
    previous = B.clone();
  }
}

TEST(Diagnostics, GaloreEnergyIsTheTopSingularShareAndTheOverlapMeasuresTheRefresh) {
  torch::Tensor W = seeded_randn({kN, kM}, 4, torch::kFloat);
  LowRankOptimizer opt(single_weight(W), quiet(std::string(kHead) +
                                               "targets: [{match: w, method: galore, rank: 3, update_proj_gap: 2}]\n"));
  // Step 1 refreshes from G1: the share is that of its top 3 singular values.
  const torch::Tensor G1 = seeded_randn({kN, kM}, 40, torch::kFloat);
  const torch::Tensor S = std::get<1>(torch::linalg_svd(G1.to(torch::kDouble), false));
  const double top = S.narrow(0, 0, 3).square().sum().item<double>() / S.square().sum().item<double>();
  SubspaceStats st = step_with(opt, W, G1);
  EXPECT_NEAR(st.energy_kept, top, 1e-6);
  EXPECT_EQ(st.overlap_step, -1) << "the first projector has nothing to overlap with";
  const torch::Tensor Q1 = opt.state_tensors("w").at("Q").clone();
  // Step 2 keeps Q1: the share of another gradient on it, ‖Q1ᵀ·G2‖² / ‖G2‖² (or ‖G2·Q1‖²).
  const torch::Tensor G2 = seeded_randn({kN, kM}, 41, torch::kFloat);
  st = step_with(opt, W, G2);
  const bool left = Q1.size(0) == kN;
  const torch::Tensor p2 = left ? torch::mm(Q1.t().to(torch::kDouble), G2.to(torch::kDouble))
                                : torch::mm(G2.to(torch::kDouble), Q1.to(torch::kDouble));
  EXPECT_NEAR(st.energy_kept, p2.square().sum().item<double>() / G2.to(torch::kDouble).square().sum().item<double>(),
              1e-6);
  // Step 3 refreshes from G1 again plus a little noise: nearly the same subspace.
  st = step_with(opt, W, G1 + 1e-4 * G2);
  const torch::Tensor Q3 = opt.state_tensors("w").at("Q").clone();
  EXPECT_EQ(st.overlap_step, 3);
  const double want = torch::mm(Q3.t(), Q1).to(torch::kDouble).square().sum().item<double>() / 3.0;
  EXPECT_NEAR(st.overlap, want, 1e-6);
  EXPECT_GT(st.overlap, 0.99);
  // Step 5 refreshes from a gradient that lives outside Q3's span: overlap near 0.
  step_with(opt, W, G2);  // step 4 keeps Q3
  const torch::Tensor Pc =
      torch::eye(left ? kN : kM, torch::kDouble) - torch::mm(Q3.to(torch::kDouble), Q3.t().to(torch::kDouble));
  const torch::Tensor G5 =
      (left ? torch::mm(Pc, G2.to(torch::kDouble)) : torch::mm(G2.to(torch::kDouble), Pc)).to(torch::kFloat);
  st = step_with(opt, W, G5);
  EXPECT_EQ(st.overlap_step, 5);
  EXPECT_LT(st.overlap, 1e-6);
}

TEST(Diagnostics, ApolloOverlapComparesTheSpansOfTwoDraws) {
  // apollo redraws its Gaussian projection every update_proj_gap steps from (seed, name,
  // refresh): the overlap of the spans of draw 1 and draw 0, rebuilt here from the
  // library's public seeding and orthonormalised by QR in double.
  // 40×16: proj_side auto projects the smaller side, so the draws are 16×4.
  torch::Tensor W = seeded_randn({40, 16}, 9, torch::kFloat);
  LowRankOptimizer opt(single_weight(W), quiet(std::string(kHead) +
                                               "targets: [{match: w, method: apollo, rank: 4, update_proj_gap: 2}]\n"));
  SubspaceStats st;
  for (int k = 0; k < 3; ++k) st = step_with(opt, W, seeded_randn({40, 16}, 90 + k, torch::kFloat));
  EXPECT_EQ(st.overlap_step, 3);
  const int64_t h = 16;
  auto draw = [&](uint64_t refresh) {
    const torch::Tensor q =
        seeded_normal({h, 4}, 0.5, derive_seed(5, "w", refresh), torch::TensorOptions(torch::kFloat));
    return std::get<0>(torch::linalg_qr(q.to(torch::kDouble)));
  };
  const double want = torch::mm(draw(1).t(), draw(0)).square().sum().item<double>() / 4.0;
  EXPECT_NEAR(st.overlap, want, 1e-9);
  EXPECT_GT(st.overlap, 0.0);
  EXPECT_LT(st.overlap, 0.9);  // independent draws: about r/h, far from the same subspace
}

TEST(Diagnostics, FusedEqualsUnfusedForOneBackwardAndIsUnknownForAccumulatedMicroBatches) {
  auto run = [](bool fused, int micro) {
    torch::Tensor W = seeded_randn({kN, kM}, 6, torch::kFloat).requires_grad_(true);
    LowRankOptimizer opt(single_weight(W), quiet(std::string(kHead) + (fused ? "fuse_into_backward: true\n" : "") +
                                                 "targets: [{match: w, method: lora, rank: 3, init: symmetric}]\n"));
    for (int i = 0; i < micro; ++i) (W * seeded_randn({kN, kM}, 60 + i, torch::kFloat)).sum().backward();
    opt.step();
    return opt.subspace_stats().at(0).energy_kept;
  };
  const double unfused = run(false, 1);
  EXPECT_GT(unfused, 0.0);
  EXPECT_NEAR(run(true, 1), unfused, 1e-9);
  EXPECT_TRUE(std::isfinite(run(false, 2)));  // unfused: of the accumulated gradient
  EXPECT_TRUE(std::isnan(run(true, 2)));      // fused: the sum of two is never formed
}

TEST(Diagnostics, OffByDefaultAndNaNForMethodsWithoutADefinition) {
  torch::Tensor W = seeded_randn({kN, kM}, 7, torch::kFloat);
  LowRankOptimizer off(single_weight(W), quiet("optimizer: {type: sgd, lr: 0.01}\ntargets: [{match: w, rank: 2}]\n"));
  W.mutable_grad() = torch::ones_like(W);
  off.step();
  EXPECT_TRUE(off.subspace_stats().empty());
  torch::Tensor W2 = seeded_randn({kN, kM}, 8, torch::kFloat);
  LowRankOptimizer add(single_weight(W2),
                       quiet(std::string(kHead) + "targets: [{match: w, method: additive, rank: 2}]\n"));
  const SubspaceStats st = step_with(add, W2, torch::ones_like(W2));
  EXPECT_EQ(st.name, "w");
  EXPECT_TRUE(std::isnan(st.energy_kept));
}
