// Method `galore` (Zhao et al. 2024, arXiv 2403.03507): full-rank equivalence with SGD,
// updates in span(Q), equivalence with a straightforward reference, edge cases.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "method_util.h"

namespace gradlora {
namespace {

using namespace method_testing;  // the shared helpers (method_util.h)
using ::gradlora::testing::CaseAndDeviceName;
using ::gradlora::testing::test_devices;

Config galore_config(InnerType type, double lr, double wd, int64_t rank, int64_t gap, double scale,
                     const std::string& side = "auto", OnResample on_resample = OnResample::keep) {
  Config c = config(Method::galore, type, lr, wd, rank);
  c.targets[0].options["update_proj_gap"] = gap;
  c.targets[0].options["scale"] = scale;
  c.targets[0].options["proj_side"] = side;
  c.targets[0].on_resample = on_resample;
  return c;
}

/// Runs `steps` optimizer steps on W with the closed-form regression gradient.
void run(LowRankOptimizer& opt, torch::Tensor& W, int64_t first, int64_t steps) {
  for (int64_t t = first; t < first + steps; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
  }
}

// ------------------------------------------------- full rank == full SGD

// (n, m, momentum, on_resample): at update_proj_gap 1 and rank = min(n, m), Q is a square
// orthogonal matrix, so scale·Q·Qᵀ·G = G: galore with SGD is full SGD (weight decay
// included, coupled). With momentum the buffer lives in the rotating basis; `transfer`
// rotates it exactly (C = Q_newᵀ·Q_old is orthogonal), so momentum SGD matches too.
// The reference runs on the same device as the optimizer.
using FullRankCase = std::tuple<int64_t, int64_t, double, OnResample>;
class GaloreFullRank : public ::testing::TestWithParam<std::tuple<FullRankCase, torch::Device>> {};

// Galore at full rank and gap 1 against SGD with momentum written out here; returns
// (how far galore moved W, max |W_galore − W_sgd|) after 25 steps.
std::pair<double, double> full_rank_against_sgd(int64_t n, int64_t m, double momentum, double wd,
                                                OnResample on_resample, torch::Device device) {
  const double lr = 0.05;
  torch::Tensor W = weight(n, m).to(device);
  torch::Tensor ref = W.clone();
  Config c = galore_config(InnerType::sgd, lr, wd, std::min(n, m), 1, 1.0, "auto", on_resample);
  c.optimizer.momentum = momentum;
  LowRankOptimizer opt(single_weight(W), c);
  torch::Tensor buf;
  for (int64_t t = 0; t < 25; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
    torch::Tensor g = grad(ref, t) + wd * ref;
    buf = t == 0 ? g : momentum * buf + g;
    ref -= lr * buf;
  }
  return {max_abs_diff(W.cpu(), weight(n, m)), max_abs_diff(W, ref)};
}

TEST_P(GaloreFullRank, EqualsFullSgd) {
  const auto [n, m, momentum, on_resample] = std::get<0>(GetParam());
  const torch::Device device = std::get<1>(GetParam());
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  const auto [moved, diff] = full_rank_against_sgd(n, m, momentum, 0.01, on_resample, device);
  EXPECT_GT(moved, 0.1);  // it moved
  EXPECT_LT(diff, 1e-11);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GaloreFullRank,
    ::testing::Combine(::testing::Values(std::make_tuple(int64_t{6}, int64_t{10}, 0.0, OnResample::keep),
                                         std::make_tuple(int64_t{10}, int64_t{6}, 0.0, OnResample::keep),
                                         std::make_tuple(int64_t{6}, int64_t{10}, 0.9, OnResample::transfer),
                                         std::make_tuple(int64_t{10}, int64_t{6}, 0.9, OnResample::transfer)),
                       ::testing::ValuesIn(test_devices())),
    CaseAndDeviceName());

// Control: with momentum and `keep`, the buffer is not rotated and galore is not full SGD,
// so the test above can tell the two apart.
TEST(GaloreFullRankControl, KeepWithMomentumDiffersFromFullSgd) {
  EXPECT_GT(full_rank_against_sgd(6, 10, 0.9, 0.0, OnResample::keep, torch::kCPU).second, 1e-3);
}

// -------------------------------------------------------- span of Q

// (n, m, proj_side, left?): every step's update lies in span(Q) on the projector's side,
// and Q spans the top-r singular vectors of the gradient it was computed from.
class GaloreSpan : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, std::string, bool>> {};

TEST_P(GaloreSpan, UpdateLiesInSpanOfQ) {
  const auto [n, m, side, left] = GetParam();
  const int64_t r = 2, gap = 3;
  torch::Tensor W = weight(n, m);
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-2, 0.0, r, gap, 0.25, side));
  torch::Tensor Q_prev;
  for (int64_t t = 0; t < 7; ++t) {
    torch::Tensor G = grad(W, t);
    W.mutable_grad() = G;
    torch::Tensor before = W.clone();
    opt.step();
    torch::Tensor Q = opt.state_tensors("w").at("Q");
    ASSERT_EQ(Q.sizes(), (std::vector<int64_t>{left ? n : m, r}));
    torch::Tensor dP = W - before;
    ASSERT_GT(dP.norm().item<double>(), 1e-6);
    torch::Tensor outside = left ? dP - torch::mm(Q, torch::mm(Q.t(), dP)) : dP - torch::mm(torch::mm(dP, Q), Q.t());
    EXPECT_LT(outside.norm().item<double>(), 1e-12 * dP.norm().item<double>()) << "step " << t;
    EXPECT_LT(max_abs_diff(torch::mm(Q.t(), Q), torch::eye(r, torch::kDouble)), 1e-12);
    if (t % gap == 0) {
      auto [U, S, Vh] = torch::linalg_svd(G, false);
      torch::Tensor top = left ? U.narrow(1, 0, r) : Vh.narrow(0, 0, r).t();
      EXPECT_LT(max_abs_diff(torch::mm(Q, Q.t()), torch::mm(top, top.t())), 1e-10) << "step " << t;
    } else {
      EXPECT_TRUE(torch::equal(Q, Q_prev)) << "Q changed between refreshes at step " << t;
    }
    Q_prev = Q.clone();
  }
}

INSTANTIATE_TEST_SUITE_P(Sides, GaloreSpan,
                         ::testing::Values(std::make_tuple(int64_t{8}, int64_t{12}, std::string("auto"), true),
                                           std::make_tuple(int64_t{12}, int64_t{8}, std::string("auto"), false),
                                           std::make_tuple(int64_t{12}, int64_t{8}, std::string("left"), true),
                                           std::make_tuple(int64_t{8}, int64_t{12}, std::string("right"), false)));

// ---------------------------------------------- straightforward reference

/// GaLore with AdamW written out with plain tensor ops: SVD every `gap` steps, Adam
/// moments at low rank (LibTorch's AdamW formulas), P ← (1 − lr·wd)·P + scale·Q·ΔN.
struct GaloreReference {
  int64_t r, gap;
  double lr, wd, scale, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  bool left;
  OnResample on_resample;
  torch::Tensor Q, M, V;
  int64_t k = 0;  // Adam's step count

  void step(torch::Tensor& P, const torch::Tensor& G, int64_t t) {
    if (t % gap == 0) {
      auto [U, S, Vh] = torch::linalg_svd(G, false);
      torch::Tensor Qn = left ? U.narrow(1, 0, r) : Vh.narrow(0, 0, r).t();
      if (t > 0 && on_resample == OnResample::reset) {
        M = V = torch::Tensor();
        k = 0;
      } else if (t > 0 && on_resample == OnResample::transfer) {
        torch::Tensor C = torch::mm(Qn.t(), Q);
        M = left ? torch::mm(C, M) : torch::mm(M, C.t());
        V = left ? torch::mm(C * C, V) : torch::mm(V, (C * C).t());
      }
      Q = Qn;
    }
    torch::Tensor R = left ? torch::mm(Q.t(), G) : torch::mm(G, Q);
    if (!M.defined()) {
      M = torch::zeros_like(R);
      V = torch::zeros_like(R);
    }
    ++k;
    M = b1 * M + (1 - b1) * R;
    V = b2 * V + (1 - b2) * R * R;
    const double bc1 = 1 - std::pow(b1, k), bc2 = 1 - std::pow(b2, k);
    torch::Tensor dN = -(lr / bc1) * M / (V.sqrt() / std::sqrt(bc2) + eps);
    P = P * (1 - lr * wd) + scale * (left ? torch::mm(Q, dN) : torch::mm(dN, Q.t()));
  }
};

// (n, m, on_resample) × device. The reference runs on the optimizer's device: its SVD then
// comes from the same backend, so the exp_avg comparison sees the same singular-vector signs.
using VsReferenceCase = std::tuple<int64_t, int64_t, OnResample>;
class GaloreVsReference : public ::testing::TestWithParam<std::tuple<VsReferenceCase, torch::Device>> {};

TEST_P(GaloreVsReference, AdamWOver30Steps) {
  const auto [n, m, on_resample] = std::get<0>(GetParam());
  const torch::Device device = std::get<1>(GetParam());
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  const int64_t r = 3, gap = 7;
  const double lr = 2e-2, wd = 0.1, scale = 0.25;
  torch::Tensor W = weight(n, m).to(device);
  torch::Tensor P = W.clone();
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, lr, wd, r, gap, scale, "auto", on_resample));
  GaloreReference ref{r, gap, lr, wd, scale};
  ref.left = n < m;
  ref.on_resample = on_resample;
  for (int64_t t = 0; t < 30; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
    ref.step(P, grad(P, t), t);
  }
  EXPECT_GT(max_abs_diff(W.cpu(), weight(n, m)), 0.05);  // it moved
  EXPECT_LT(max_abs_diff(W, P), 1e-10);
  EXPECT_LT(max_abs_diff(opt.state_tensors("w").at("inner.0.exp_avg"), ref.M), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(
    Moments, GaloreVsReference,
    ::testing::Combine(::testing::Values(std::make_tuple(int64_t{8}, int64_t{14}, OnResample::keep),
                                         std::make_tuple(int64_t{14}, int64_t{8}, OnResample::keep),
                                         std::make_tuple(int64_t{8}, int64_t{14}, OnResample::reset),
                                         std::make_tuple(int64_t{14}, int64_t{8}, OnResample::transfer)),
                       ::testing::ValuesIn(test_devices())),
    CaseAndDeviceName());

// ------------------------------------------------------------ edges

TEST(Galore, RankAboveTheSmallerSideIsAConfigError) {
  torch::Tensor W = weight(5, 9);
  try {
    LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-3, 0.0, 6, 10, 0.25));
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const char* f : {"rank", "'w'", "6", "5"}) EXPECT_NE(msg.find(f), std::string::npos) << msg;
  }
}

TEST(Galore, NonFiniteGradientAtARefreshKeepsTheProjector) {
  torch::Tensor W = weight(6, 10);
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-2, 0.0, 2, 2, 0.25));
  // First step with NaN: no projector can be computed, the step is skipped.
  W.mutable_grad() = torch::full_like(W, std::nan(""));
  torch::Tensor before = W.clone();
  opt.step();
  EXPECT_EQ(opt.skipped_count(), 1);
  EXPECT_TRUE(torch::equal(W, before));
  EXPECT_EQ(opt.projector("w").steps(), 0);
  run(opt, W, 0, 2);  // refresh at steps 0, then a step that reuses Q
  torch::Tensor Q = opt.state_tensors("w").at("Q").clone();
  ASSERT_GT(Q.abs().sum().item<double>(), 0.0);
  // A refresh is due (steps() == 2) and the gradient is non-finite: Q stays, P stays.
  torch::Tensor G = grad(W, 2);
  G[1][3].fill_(std::numeric_limits<double>::infinity());
  W.mutable_grad() = G;
  before = W.clone();
  opt.step();
  EXPECT_EQ(opt.skipped_count(), 2);
  EXPECT_TRUE(torch::equal(W, before));
  EXPECT_TRUE(torch::equal(opt.state_tensors("w").at("Q"), Q));
  // The next finite gradient refreshes.
  run(opt, W, 2, 1);
  EXPECT_FALSE(torch::equal(opt.state_tensors("w").at("Q"), Q));
  EXPECT_EQ(opt.projector("w").steps(), 3);
}

TEST(Galore, StateIsLowRankAndReported) {
  torch::Tensor W = weight(16, 40);
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-3, 0.0, 4, 10, 0.25));
  run(opt, W, 0, 2);
  int64_t numel = 0;
  for (const auto& kv : opt.state_tensors("w")) {
    EXPECT_LT(kv.second.numel(), W.numel()) << kv.first;
    numel += kv.second.numel();
  }
  // Q (16×4) and two moments (4×40).
  EXPECT_EQ(numel, 16 * 4 + 2 * 4 * 40);
  const ParamReport& p = opt.report().params.at(0);
  EXPECT_EQ(p.method, Method::galore);
  EXPECT_EQ(p.trainable, 4 * 40);
  EXPECT_EQ(p.state_bytes, (16 * 4 + 2 * 4 * 40) * 8);
  EXPECT_NE(p.note.find("left"), std::string::npos) << p.note;
}

TEST(Galore, CheckpointRoundTripContinuesIdentically) {
  const int64_t n = 7, m = 12;
  torch::Tensor W1 = weight(n, m);
  Config c = galore_config(InnerType::adamw, 1e-2, 0.05, 3, 4, 0.5, "auto", OnResample::transfer);
  LowRankOptimizer a(single_weight(W1), c);
  run(a, W1, 0, 6);
  torch::Tensor W2 = W1.clone();
  LowRankOptimizer b(single_weight(W2), c);
  method_testing::copy_state(a, b);
  run(a, W1, 6, 6);  // crosses a refresh (steps 8) with moment transfer
  run(b, W2, 6, 6);
  EXPECT_TRUE(torch::equal(W1, W2)) << max_abs_diff(W1, W2);
}

// Fused mode projects each micro-batch during backward(); at a refresh every micro-batch must
// use the same Q (taken from the first micro-batch's gradient), or the accumulated low-rank
// gradient mixes bases. Reference: P −= lr·scale·Q·Qᵀ·(G1 + G2), Q from SVD(G1) at refreshes.
TEST(Galore, FusedMicroBatchesShareOneProjector) {
  const int64_t n = 6, m = 10, r = 2, gap = 2;
  const double lr = 0.1, scale = 0.5;
  torch::Tensor W = weight(n, m).requires_grad_();
  torch::Tensor P = W.detach().clone();
  Config c = galore_config(InnerType::sgd, lr, 0.0, r, gap, scale);
  c.fuse_into_backward = true;
  LowRankOptimizer opt(single_weight(W), c);
  torch::Tensor Q;
  for (int64_t t = 0; t < 6; ++t) {
    opt.zero_grad();
    method_testing::loss(W, t).backward();
    method_testing::loss(W, 100 + t).backward();
    opt.step();
    torch::Tensor G1 = grad(P, t), G2 = grad(P, 100 + t);
    if (t % gap == 0) Q = std::get<0>(torch::linalg_svd(G1, false)).narrow(1, 0, r);
    P -= lr * scale * torch::mm(Q, torch::mm(Q.t(), G1 + G2));
  }
  EXPECT_GT(max_abs_diff(W, weight(n, m)), 0.01);
  EXPECT_LT(max_abs_diff(W, P), 1e-12);
}

TEST(Galore, Bf16WeightsKeepAnFp32Master) {
  torch::Tensor W = weight(8, 12, torch::kBFloat16);
  const torch::Tensor W0 = W.clone();
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-3, 0.0, 2, 5, 1.0));
  for (int64_t t = 0; t < 10; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
  }
  const torch::Tensor master = opt.state_tensors("w").at("master");
  EXPECT_EQ(master.scalar_type(), torch::kFloat);
  // The master accumulates increments below bf16's resolution; P is its rounding.
  EXPECT_GT(max_abs_diff(master, W0), 1e-3);
  EXPECT_TRUE(torch::equal(W, master.to(torch::kBFloat16)));
}

// ------------------------------------------------- projector: randomized

namespace randomized {

// G = U·diag(σ)·Vᵀ with σ_i = 0.7^i and random orthonormal U, V, in double.
torch::Tensor decaying_spectrum(int64_t n, int64_t m, uint64_t seed) {
  const int64_t k = std::min(n, m);
  const torch::Tensor U = std::get<0>(torch::linalg_qr(testing::seeded_randn({n, k}, seed)));
  const torch::Tensor V = std::get<0>(torch::linalg_qr(testing::seeded_randn({m, k}, seed + 1)));
  const torch::Tensor sigma = torch::pow(0.7, torch::arange(k, torch::kDouble));
  return torch::mm(U * sigma, V.t());
}

// ‖Q·Qᵀ − T·Tᵀ‖max for T the top-r singular vectors (computed here) on the projector's side.
double subspace_error(int64_t n, int64_t m, int64_t oversample, int64_t power_iters) {
  const int64_t r = 4;
  const torch::Tensor G = decaying_spectrum(n, m, 11);
  torch::Tensor W = weight(n, m);
  Config c = galore_config(InnerType::sgd, 1e-2, 0.0, r, 100, 0.25);
  c.targets[0].options["projector"] = std::string("randomized");
  c.targets[0].options["oversample"] = oversample;
  c.targets[0].options["power_iters"] = power_iters;
  LowRankOptimizer opt(single_weight(W), c);
  W.mutable_grad() = G;
  opt.step();
  const torch::Tensor Q = opt.state_tensors("w").at("Q");
  EXPECT_LT(max_abs_diff(torch::mm(Q.t(), Q), torch::eye(r, torch::kDouble)), 1e-12);
  auto [U, S, Vh] = torch::linalg_svd(G, false);
  const bool left = n < m;
  const torch::Tensor top = left ? U.narrow(1, 0, r) : Vh.narrow(0, 0, r).t();
  return max_abs_diff(torch::mm(Q, Q.t()), torch::mm(top, top.t()));
}

}  // namespace randomized

TEST(GaloreRandomized, FindsTheTopSingularSubspaceOfADecayingSpectrum) {
  // Halko et al.'s bound scales with (σ_{k+1}/σ_r)^(2q+1): 0.7^9 to the 5th ≈ 2e-8 here.
  for (const auto& [n, m] : {std::pair<int64_t, int64_t>{60, 90}, {90, 60}}) {
    const double e = randomized::subspace_error(n, m, 8, 2);
    std::printf("randomized finder %lldx%lld, oversample 8, 2 power iterations: %.3g\n", static_cast<long long>(n),
                static_cast<long long>(m), e);
    EXPECT_LT(e, 1e-5) << n << "x" << m;
  }
}

TEST(GaloreRandomized, WithoutOversamplingOrPowerIterationsItIsVisiblyWorse) {
  // The same test's check would fail for a finder that skipped what makes it accurate.
  const double e = randomized::subspace_error(60, 90, 0, 0);
  std::printf("randomized finder 60x90, no oversampling, no power iteration: %.3g\n", e);
  EXPECT_GT(e, 1e-3);
}

TEST(GaloreRandomized, SettingsOfAnSvdProjectorAreThoseOfEarlierCheckpoints) {
  // Checkpoints saved before `projector` existed store this text; with the SVD it is unchanged.
  torch::Tensor W = weight(8, 12);
  LowRankOptimizer opt(single_weight(W), galore_config(InnerType::adamw, 1e-2, 0.0, 2, 3, 0.25));
  EXPECT_EQ(opt.projector("w").settings(),
            "scale 1, init zero, init_std auto, writeback auto, on_resample keep, update_proj_gap 3, scale 0.25, "
            "proj_side auto");
  Config c = galore_config(InnerType::adamw, 1e-2, 0.0, 2, 3, 0.25);
  c.targets[0].options["projector"] = std::string("randomized");
  LowRankOptimizer ropt(single_weight(W), c);
  EXPECT_EQ(ropt.projector("w").settings(),
            "scale 1, init zero, init_std auto, writeback auto, on_resample keep, update_proj_gap 3, scale 0.25, "
            "proj_side auto, projector randomized, oversample 8, power_iters 2");
  EXPECT_NE(ropt.report().params.at(0).note.find("randomized range finder"), std::string::npos);
}

}  // namespace
}  // namespace gradlora
