// Method `apollo` (Zhu et al. 2024, arXiv 2412.05270; APOLLO-Mini: rank 1, scale_type tensor):
// equivalence with the paper's Algorithm 1 written out in the test, the norm-growth limiter,
// gradient clipping, state size, and what the method refuses.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "method_util.h"

namespace gradlora {
namespace {

using namespace method_testing;  // the shared helpers (method_util.h)
using ::gradlora::testing::CaseAndDeviceName;
using ::gradlora::testing::test_devices;

const Method kApollo{"apollo"};

Config apollo_config(InnerType type, double lr, double wd, int64_t rank, int64_t gap, double alpha,
                     const std::string& scale_type, double gamma = 1.01, const std::string& side = "auto") {
  Config c = config(kApollo, type, lr, wd, rank);
  c.targets[0].options["update_proj_gap"] = gap;
  c.targets[0].options["scale"] = alpha;
  c.targets[0].options["scale_type"] = scale_type;
  c.targets[0].options["norm_growth_limit"] = gamma;
  c.targets[0].options["proj_side"] = side;
  return c;
}

/// Algorithm 1 of the paper ("AdamW with APOLLO") with plain tensor ops in double: P (r×n
/// on the left, the paper's side; here stored as Q = Pᵀ) redrawn every `gap` steps, Adam's
/// bias-corrected moments of R = P·G kept across draws, s from R̃ = M̂/(√V̂ + ε) and R,
/// G̃ = α·G·diag(s), the norm-growth limiter on ‖G̃‖, W ← W − lr·G̃ − lr·wd·W_{t−1}. With
/// `coupled` (inner sgd/adam) the decay is the L2 gradient instead: G ← G + wd·W before all of it.
/// The random projection is the one input the test cannot derive on its own: it is drawn
/// with the library's public seeding (gradlora::seeded_normal, gradlora::derive_seed) from
/// (config seed, parameter name, refresh index t / gap) with standard deviation 1/√r, the
/// paper's N(0, 1/r); everything after the draw is computed here.
struct ApolloReference {
  int64_t r, gap;
  double lr, wd, alpha, gamma;
  bool channel, left, coupled = false;
  uint64_t seed = 0;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  torch::Tensor Q, M, V;
  int64_t k = 0;
  double last = 0.0;  // ‖G̃_{t−1}‖ after the limiter
  int clips = 0;

  void step(torch::Tensor& W, torch::Tensor G, int64_t t) {
    if (coupled) G = G + wd * W;
    if (t % gap == 0) {
      Q = seeded_normal({left ? W.size(0) : W.size(1), r}, 1.0 / std::sqrt(static_cast<double>(r)),
                        derive_seed(seed, "w", static_cast<uint64_t>(t / gap)), W.options());
    }
    const torch::Tensor R = left ? torch::mm(Q.t(), G) : torch::mm(G, Q);
    if (!M.defined()) {
      M = torch::zeros_like(R);
      V = torch::zeros_like(R);
    }
    ++k;
    M = b1 * M + (1 - b1) * R;
    V = b2 * V + (1 - b2) * R * R;
    const double bc1 = 1 - std::pow(b1, k), bc2 = 1 - std::pow(b2, k);
    const torch::Tensor Rt = (M / bc1) / ((V / bc2).sqrt() + eps);
    torch::Tensor Gt;
    if (channel) {
      // One channel per column of G (left: R is r×m) or per row (right: R is n×r).
      const int64_t dim = left ? 0 : 1;
      torch::Tensor s = Rt.square().sum(dim).sqrt() / R.square().sum(dim).sqrt();
      Gt = alpha * G * (left ? s.unsqueeze(0) : s.unsqueeze(1));
    } else {
      Gt = alpha * G * (Rt.square().sum().sqrt() / R.square().sum().sqrt());
    }
    const double norm = Gt.square().sum().sqrt().item<double>();
    double kept = norm;
    if (gamma > 0 && last > 0 && norm > gamma * last) {
      Gt = Gt * (gamma * last / norm);
      kept = gamma * last;
      ++clips;
    }
    if (gamma > 0) last = kept;
    W = W - lr * Gt - (coupled ? 0.0 : lr * wd) * W;
  }
};

struct VsReferenceCase {
  int64_t n, m, r, gap;
  double lr, wd, alpha, gamma;
  std::string scale_type;
  InnerType type;
};

void PrintTo(const VsReferenceCase& k, std::ostream* os) {
  *os << k.n << "x" << k.m << " rank " << k.r << " " << k.scale_type << " " << to_string(k.type) << " wd " << k.wd
      << " alpha " << k.alpha << " gamma " << k.gamma;
}

class ApolloVsAlgorithm1 : public ::testing::TestWithParam<std::tuple<VsReferenceCase, torch::Device>> {};

// 25 steps with a draw every 7 (steps 0, 7, 14, 21: three refreshes after the first). The
// bound is relative to how far the weight moved.
TEST_P(ApolloVsAlgorithm1, Over25Steps) {
  const VsReferenceCase k = std::get<0>(GetParam());
  const torch::Device device = std::get<1>(GetParam());
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  const int64_t steps = 25;
  torch::Tensor W = weight(k.n, k.m).to(device);
  const torch::Tensor W0 = W.clone();
  torch::Tensor P = W.clone();
  LowRankOptimizer opt(single_weight(W), apollo_config(k.type, k.lr, k.wd, k.r, k.gap, k.alpha, k.scale_type, k.gamma));
  ApolloReference ref{k.r, k.gap, k.lr, k.wd, k.alpha, k.gamma, k.scale_type == "channel", k.n < k.m};
  ref.coupled = k.type == InnerType::adam || k.type == InnerType::sgd;
  double worst = 0.0;
  for (int64_t t = 0; t < steps; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
    ref.step(P, grad(P, t), t);
    worst = std::max(worst, max_abs_diff(W, P));
  }
  const double moved = max_abs_diff(P, W0);
  std::printf(
      "apollo %s %lldx%lld rank %lld: moved %.3g, max |W - W_ref| %.3g (relative %.3g), limiter clipped %d "
      "of %lld steps\n",
      k.scale_type.c_str(), static_cast<long long>(k.n), static_cast<long long>(k.m), static_cast<long long>(k.r),
      moved, worst, worst / moved, ref.clips, static_cast<long long>(steps));
  EXPECT_GT(moved, 0.05);  // it moved
  EXPECT_LE(worst, 1e-5 * moved);
  if (k.gamma > 0) EXPECT_GT(ref.clips, 0) << "the limiter never acted: this case does not test it";
  EXPECT_LT(max_abs_diff(opt.state_tensors("w").at("inner.0.exp_avg"), ref.M), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ApolloVsAlgorithm1,
    ::testing::Combine(::testing::Values(
                           // APOLLO: channel-wise, left (n < m), decoupled weight decay, limiter on.
                           VsReferenceCase{8, 14, 3, 7, 1e-2, 0.1, 1.0, 1.01, "channel", InnerType::adamw},
                           // APOLLO-Mini: rank 1, tensor-wise, α = √128, right (n ≥ m), no decay, limiter on.
                           VsReferenceCase{14, 8, 1, 7, 2e-3, 0.0, std::sqrt(128.0), 1.01, "tensor", InnerType::adamw},
                           // Channel-wise on the right, coupled (L2) decay through inner Adam, limiter off.
                           VsReferenceCase{14, 8, 2, 7, 1e-2, 0.05, 2.0, 0.0, "channel", InnerType::adam}),
                       ::testing::ValuesIn(test_devices())),
    CaseAndDeviceName());

// The limiter bounds the growth of the step itself: with a constant lr and no decay,
// ‖ΔW_t‖ ≤ γ·‖ΔW_{t−1}‖ at every step, and without it the steps grow faster somewhere.
TEST(Apollo, LimiterBoundsTheGrowthOfEveryStep) {
  auto growth = [](double gamma) {
    torch::Tensor W = weight(14, 8);
    LowRankOptimizer opt(single_weight(W),
                         apollo_config(InnerType::adamw, 2e-3, 0.0, 1, 7, std::sqrt(128.0), "tensor", gamma));
    double prev = 0.0, worst = 0.0;
    for (int64_t t = 0; t < 25; ++t) {
      const torch::Tensor before = W.clone();
      W.mutable_grad() = grad(W, t);
      opt.step();
      const double step = (W - before).norm().item<double>();
      if (prev > 0) worst = std::max(worst, step / prev);
      prev = step;
    }
    return worst;
  };
  const double limited = growth(1.01), free = growth(0.0);
  std::printf("largest step-to-step growth of ||dW||: %.6f with the limiter, %.3f without\n", limited, free);
  EXPECT_LE(limited, 1.01 * (1 + 1e-12));
  EXPECT_GT(free, 1.05);
}

// max_grad_norm scales the projected R, not G: the update must be that of the clipped G,
// with the scale measured on the same clipped gradient. Reference: the same optimizer
// given the clipped gradient min(1, c/(‖G‖ + 1e-6))·G directly. With coupled decay the
// decay term is not clipped (as for every method: the L2 gradient is added after clipping).
TEST(Apollo, GradientClippingEqualsClippingGFirst) {
  for (const InnerType type : {InnerType::adamw, InnerType::adam}) {
    SCOPED_TRACE(to_string(type));
    const double c = 0.05;
    torch::Tensor W = weight(8, 14), V = W.clone();
    Config clipped = apollo_config(type, 1e-2, 0.05, 3, 4, 1.0, "channel");
    clipped.max_grad_norm = c;
    LowRankOptimizer a(single_weight(W), clipped);
    LowRankOptimizer b(single_weight(V), apollo_config(type, 1e-2, 0.05, 3, 4, 1.0, "channel"));
    int active = 0;
    for (int64_t t = 0; t < 12; ++t) {
      W.mutable_grad() = grad(W, t);
      a.step();
      torch::Tensor G = grad(V, t);
      const double coef = std::min(1.0, c / (G.norm().item<double>() + 1e-6));
      active += coef < 1.0;
      V.mutable_grad() = G * coef;
      b.step();
    }
    EXPECT_GT(active, 6);
    EXPECT_LT(max_abs_diff(W, V), 1e-12 * std::max(1.0, max_abs_diff(V, weight(8, 14))));
    EXPECT_GT(max_abs_diff(W, weight(8, 14)), 1e-3);
  }
}

// State: Adam's two moments of R (2·r·m values for R r×m) and the limiter's one norm; the
// projection is regenerated, nothing n×m is kept.
TEST(Apollo, StateIsTwoLowRankMomentsAndTheLimiter) {
  for (const auto& [n, m, side_m] : {std::tuple<int64_t, int64_t, int64_t>{16, 40, 40}, {40, 16, 40}}) {
    SCOPED_TRACE(std::to_string(n) + "x" + std::to_string(m));
    const int64_t r = 4;
    torch::Tensor W = weight(n, m);
    LowRankOptimizer opt(single_weight(W), apollo_config(InnerType::adamw, 1e-3, 0.0, r, 10, 1.0, "channel"));
    for (int64_t t = 0; t < 2; ++t) {
      W.mutable_grad() = grad(W, t);
      opt.step();
    }
    int64_t numel = 0;
    for (const auto& kv : opt.state_tensors("w")) {
      EXPECT_LE(kv.second.numel(), r * side_m) << kv.first;
      numel += kv.second.numel();
    }
    EXPECT_EQ(numel, 2 * r * side_m + 1);
    const ParamReport& p = opt.report().params.at(0);
    EXPECT_EQ(p.method, kApollo);
    EXPECT_EQ(p.trainable, r * side_m);
    EXPECT_EQ(p.moment_bytes, 2 * r * side_m * 8);
    EXPECT_EQ(p.persistent_bytes, 8);  // the limiter's norm
    EXPECT_EQ(p.state_bytes, (2 * r * side_m + 1) * 8);
    std::printf(
        "apollo %lldx%lld rank %lld: state %lld bytes (2*r*%lld moments + 1 limiter value, in double); "
        "AdamW would hold %lld\n",
        static_cast<long long>(n), static_cast<long long>(m), static_cast<long long>(r),
        static_cast<long long>(p.state_bytes), static_cast<long long>(side_m),
        static_cast<long long>(p.adamw_state_bytes));
    EXPECT_NE(p.note.find("not stored"), std::string::npos) << p.note;
  }
}

TEST(Apollo, CheckpointRoundTripContinuesIdenticallyAcrossARedraw) {
  torch::Tensor W1 = weight(7, 12);
  const Config c = apollo_config(InnerType::adamw, 1e-2, 0.05, 3, 4, 1.0, "channel");
  LowRankOptimizer a(single_weight(W1), c);
  for (int64_t t = 0; t < 6; ++t) {
    W1.mutable_grad() = grad(W1, t);
    a.step();
  }
  torch::Tensor W2 = W1.clone();
  LowRankOptimizer b(single_weight(W2), c);
  method_testing::copy_state(a, b);
  for (int64_t t = 6; t < 12; ++t) {  // crosses the draw at step 8
    W1.mutable_grad() = grad(W1, t);
    a.step();
    W2.mutable_grad() = grad(W2, t);
    b.step();
  }
  EXPECT_TRUE(torch::equal(W1, W2)) << max_abs_diff(W1, W2);
  EXPECT_TRUE(torch::equal(a.state_tensors("w").at("limiter"), b.state_tensors("w").at("limiter")));
}

TEST(Apollo, TransferAndDataParallelAreRefused) {
  torch::Tensor W = weight(6, 10);
  Config c = apollo_config(InnerType::adamw, 1e-3, 0.0, 2, 5, 1.0, "channel");
  c.targets[0].on_resample = OnResample::transfer;
  try {
    LowRankOptimizer opt(single_weight(W), c);
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const char* f : {"on_resample", "'w'", "transfer"}) EXPECT_NE(msg.find(f), std::string::npos) << msg;
  }
  c.targets[0].on_resample = OnResample::reset;
  EXPECT_NO_THROW(LowRankOptimizer(single_weight(W), c));
  const std::string why = data_parallel_refusal(c);
  EXPECT_NE(why.find("apollo cannot train data-parallel"), std::string::npos) << why;
}

}  // namespace
}  // namespace gradlora
