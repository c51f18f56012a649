// Method `lora` with `init: gradient` (LoRA-GA, Wang et al. 2024, arXiv 2407.05000): A, B from
// the SVD of the first step's gradient, scaled so that the first inner SGD step changes W by
// −lr·G_2r to first order; the model is unchanged by the init; export, checkpoints, the
// non-finite first gradient, fused micro-batches and the refusals.
#include <gradlora/adapter.h>
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <tuple>

#include <unistd.h>

#include "method_util.h"

namespace gradlora {
namespace {

using namespace method_testing;  // the shared helpers (method_util.h)
using ::gradlora::testing::expect_config_error;

Config ga_config(InnerType type, double lr, int64_t rank, double alpha, WriteBack wb = WriteBack::automatic,
                 double lr_ratio = 1.0) {
  Config c = config(Method::lora, type, lr, 0.0, rank);
  c.targets[0].init = Init::gradient;
  c.targets[0].alpha = alpha;
  c.targets[0].writeback = wb;
  if (lr_ratio != 1.0) c.targets[0].options["lr_ratio"] = lr_ratio;
  return c;
}

/// The best rank-k approximation of G, from an SVD in double.
torch::Tensor best_rank(const torch::Tensor& G, int64_t k) {
  auto [U, S, Vh] = torch::linalg_svd(G.to(torch::kDouble), /*full_matrices=*/false);
  return torch::mm(U.narrow(1, 0, k) * S.narrow(0, 0, k), Vh.narrow(0, 0, k));
}

double rel_err(const torch::Tensor& x, const torch::Tensor& ref) {
  return (x.to(torch::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
}

void run(LowRankOptimizer& opt, torch::Tensor& W, int64_t first, int64_t steps) {
  for (int64_t t = first; t < first + steps; ++t) {
    W.mutable_grad() = grad(W, t);
    opt.step();
  }
}

// ------------------------------------------------- the first-order property

// (writeback, alpha, lr_ratio). s = alpha/r is 2 or 0.5 so that a scale off by s or √s shows.
using FirstStepCase = std::tuple<WriteBack, double, double>;
class LoraGaFirstStep : public ::testing::TestWithParam<FirstStepCase> {};

// One plain SGD step from the gradient init: (W1 − W0)/lr = −G_2r + O(lr), G_2r from an SVD of
// G in double here. The relative error is ≤ 2e-4 at lr 1e-5 (measured 1e-5 to 8e-5) and shrinks
// about tenfold from lr 1e-4 (first order). A scale c off by √s or s, or a factor from the wrong singular vectors,
// gives an error of order 1 at every lr.
TEST_P(LoraGaFirstStep, SgdStepIsMinusLrTimesTheBestRank2rApproximation) {
  const auto [wb, alpha, lr_ratio] = GetParam();
  const int64_t n = 10, m = 14, r = 3;
  const torch::Tensor W0 = weight(n, m);
  const torch::Tensor G = grad(W0, 0);
  const torch::Tensor G2r = best_rank(G, 2 * r);
  ASSERT_GT(rel_err(best_rank(G, r), G2r), 0.1);  // the next r singular vectors matter
  std::vector<double> errs;
  for (double lr : {1e-3, 1e-4, 1e-5}) {
    torch::Tensor W = W0.clone();
    LowRankOptimizer opt(single_weight(W), ga_config(InnerType::sgd, lr, r, alpha, wb, lr_ratio));
    W.mutable_grad() = G.clone();
    opt.step();
    errs.push_back(rel_err((W - W0) / lr, -G2r));
    // The step started from A0 = U[:, r:2r]/s, B0 = V[:, :r]ᵀ/(s·√λ): orthogonal columns and
    // rows of those norms, and B0 spans the top r right singular vectors (G·B0ᵀ·B0 = G_r/(s²λ)).
    const auto st = opt.state_tensors("w");
    const torch::Tensor A0 = st.at("A0"), B0 = st.at("B0"), I = torch::eye(r, torch::kDouble);
    const double s = alpha / static_cast<double>(r);
    EXPECT_LT(max_abs_diff(torch::mm(A0.t(), A0), I / (s * s)), 1e-12);
    EXPECT_LT(max_abs_diff(torch::mm(B0, B0.t()), I / (s * s * lr_ratio)), 1e-12);
    EXPECT_LT(max_abs_diff(torch::mm(torch::mm(G, B0.t()), B0) * (s * s * lr_ratio), best_rank(G, r)), 1e-12);
  }
  SCOPED_TRACE(::testing::Message() << "relative errors at lr 1e-3, 1e-4, 1e-5: " << errs[0] << ", " << errs[1] << ", "
                                    << errs[2]);
  EXPECT_LT(errs[2], 2e-4);
  EXPECT_LT(errs[1], 2e-3);
  EXPECT_GT(errs[1] / errs[2], 5.0);  // O(lr): tenfold smaller lr, about tenfold smaller error
  EXPECT_LT(errs[1] / errs[2], 20.0);
}

INSTANTIATE_TEST_SUITE_P(Cases, LoraGaFirstStep,
                         ::testing::Values(FirstStepCase{WriteBack::incremental, 6.0, 1.0},
                                           FirstStepCase{WriteBack::exact, 6.0, 1.0},
                                           FirstStepCase{WriteBack::incremental, 1.5, 1.0},
                                           FirstStepCase{WriteBack::incremental, 6.0, 4.0},
                                           FirstStepCase{WriteBack::exact, 1.5, 16.0}));

// Fused mode with one backward per step projects the same gradient: the same weights.
TEST(LoraGa, FusedSingleBackwardEqualsUnfused) {
  const int64_t n = 10, m = 14, r = 3;
  torch::Tensor Wf = weight(n, m).requires_grad_();
  torch::Tensor Wu = weight(n, m).requires_grad_();
  Config c = ga_config(InnerType::adamw, 1e-2, r, 6.0);
  Config cf = c;
  cf.fuse_into_backward = true;
  LowRankOptimizer fused(single_weight(Wf), cf);
  LowRankOptimizer unfused(single_weight(Wu), c);
  for (int64_t t = 0; t < 4; ++t) {
    fused.zero_grad();
    unfused.zero_grad();
    loss(Wf, t).backward();
    loss(Wu, t).backward();
    fused.step();
    unfused.step();
  }
  EXPECT_GT(max_abs_diff(Wu, weight(n, m)), 1e-3);
  EXPECT_TRUE(torch::equal(Wf, Wu)) << max_abs_diff(Wf, Wu);
}

// Fused micro-batches: the factors come from the first micro-batch's gradient G1, and the step
// projects the sum: (W1 − W0)/lr → −(G·V_r·V_rᵀ + U'·U'ᵀ·G) with G = G1 + G2, V_r the top-r
// right and U' the next r left singular vectors of G1.
TEST(LoraGa, FusedMicroBatchesTakeTheFactorsFromTheFirst) {
  const int64_t n = 10, m = 14, r = 3;
  const double lr = 1e-5;
  const torch::Tensor W0 = weight(n, m);
  torch::Tensor W = W0.clone().requires_grad_();
  Config c = ga_config(InnerType::sgd, lr, r, 6.0);
  c.fuse_into_backward = true;
  LowRankOptimizer opt(single_weight(W), c);
  loss(W, 0).backward();
  loss(W, 100).backward();
  opt.step();
  const torch::Tensor G1 = grad(W0, 0), G = G1 + grad(W0, 100);
  auto [U, S, Vh] = torch::linalg_svd(G1, false);
  const torch::Tensor Vr = Vh.narrow(0, 0, r).t(), Un = U.narrow(1, r, r);
  const torch::Tensor expected = -(torch::mm(torch::mm(G, Vr), Vr.t()) + torch::mm(Un, torch::mm(Un.t(), G)));
  EXPECT_LT(rel_err((W.detach() - W0) / lr, expected), 1e-3);
  EXPECT_GT(rel_err(expected, -best_rank(G, 2 * r)), 0.01);  // not the SVD of the sum
}

// ------------------------------------------------------------ unchanged model

TEST(LoraGa, ModelIsUnchangedBeforeAndByTheInit) {
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    for (const auto wb : {WriteBack::incremental, WriteBack::exact}) {
      SCOPED_TRACE(::testing::Message() << c10::toString(dtype) << ", writeback " << to_string(wb));
      const torch::Tensor W0 = weight(10, 14, dtype);
      torch::Tensor W = W0.clone();
      Config c = ga_config(InnerType::sgd, 0.0, 3, 6.0, wb);
      LowRankOptimizer opt(single_weight(W), c);
      EXPECT_TRUE(torch::equal(W, W0));  // construction leaves W alone
      // A step at learning rate 0: the init happens, the factors do not move, W stays.
      run(opt, W, 0, 1);
      const auto st = opt.state_tensors("w");
      EXPECT_GT(st.at("A").abs().max().item<double>(), 0.0);
      EXPECT_GT(st.at("B").abs().max().item<double>(), 0.0);
      EXPECT_TRUE(torch::equal(st.at("A"), st.at("A0")));
      EXPECT_TRUE(torch::equal(st.at("B"), st.at("B0")));
      EXPECT_LE(max_abs_diff(W, W0), 1e-6 * W0.abs().max().item<double>());
      if (wb == WriteBack::incremental) EXPECT_TRUE(torch::equal(W, W0));  // a zero increment
    }
  }
}

// -------------------------------------------------------------------- export

TEST(LoraGa, AdapterExportThenLoadReproducesTheChange) {
  namespace fs = std::filesystem;
  for (const auto wb : {WriteBack::incremental, WriteBack::exact}) {
    SCOPED_TRACE(::testing::Message() << "writeback " << to_string(wb));
    const std::string dir = (fs::temp_directory_path() / ("gradlora_lora_ga_" + std::to_string(::getpid()))).string();
    fs::remove_all(dir);
    const torch::Tensor W0 = weight(10, 14, torch::kFloat);
    torch::Tensor W = W0.clone();
    Config c = ga_config(InnerType::adamw, 1e-2, 3, 6.0, wb);
    c.targets[0].match = "fc.weight";
    LowRankOptimizer opt(single_weight(W, "fc.weight"), c);
    run(opt, W, 0, 5);
    const AdapterExport info = export_adapter(opt, dir);
    EXPECT_EQ(info.ranks.at("fc"), 6);  // [A, −A0]·[B; B0]: rank 2r
    torch::Tensor L = W0.clone();
    load_adapter(single_weight(L, "fc.weight"), dir);
    EXPECT_GT(max_abs_diff(W, W0), 1e-2);  // it trained
    EXPECT_LE(max_abs_diff(L, W), 1e-5);
    fs::remove_all(dir);
  }
}

// ---------------------------------------------------------------- checkpoints

// Saved before the first step (the init still due), after 3 steps, and at a merge-and-restart
// (the init due again): a fresh optimizer that loads it continues bit for bit.
TEST(LoraGa, CheckpointRoundTripContinuesIdentically) {
  for (const int64_t merge_every : {int64_t{0}, int64_t{3}}) {
    for (const auto wb : {WriteBack::incremental, WriteBack::exact}) {
      for (const int64_t at : {int64_t{0}, int64_t{3}}) {
        SCOPED_TRACE(::testing::Message() << "merge_every " << merge_every << ", writeback " << to_string(wb)
                                          << ", saved after " << at << " steps");
        Config c = ga_config(InnerType::adamw, 1e-2, 3, 6.0, wb);
        c.optimizer.weight_decay = 0.1;
        c.targets[0].options["merge_every"] = merge_every;
        torch::Tensor W1 = weight(10, 14, torch::kFloat);
        LowRankOptimizer a(single_weight(W1), c);
        run(a, W1, 0, at);
        torch::Tensor W2 = W1.clone();
        LowRankOptimizer b(single_weight(W2), c);
        copy_state(a, b);
        run(a, W1, at, 5);
        run(b, W2, at, 5);
        EXPECT_GT(max_abs_diff(W1, weight(10, 14, torch::kFloat)), 1e-3);
        EXPECT_TRUE(torch::equal(W1, W2)) << max_abs_diff(W1, W2);
      }
    }
  }
}

// A checkpoint of another init does not load: the factors mean something else.
TEST(LoraGa, CheckpointOfAnotherInitIsRefused) {
  torch::Tensor W = weight(10, 14, torch::kFloat);
  Config sym = ga_config(InnerType::adamw, 1e-2, 3, 6.0);
  sym.targets[0].init = Init::symmetric;
  LowRankOptimizer a(single_weight(W), sym);
  run(a, W, 0, 2);
  LowRankOptimizer b(single_weight(W), ga_config(InnerType::adamw, 1e-2, 3, 6.0));
  EXPECT_ANY_THROW(copy_state(a, b));
}

// ------------------------------------------------------------ non-finite G

// A non-finite first gradient gives no factors: the step is skipped, nothing changes, and the
// next finite gradient initialises (its first step is then −lr·G_2r of that gradient).
TEST(LoraGa, NonFiniteFirstGradientDefersTheInit) {
  const int64_t r = 3;
  const double lr = 1e-5;
  const torch::Tensor W0 = weight(10, 14);
  torch::Tensor W = W0.clone();
  LowRankOptimizer opt(single_weight(W), ga_config(InnerType::sgd, lr, r, 6.0));
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    torch::Tensor G = grad(W, 0);
    G[2][5].fill_(bad);
    W.mutable_grad() = G;
    opt.step();
  }
  EXPECT_EQ(opt.skipped_count(), 2);
  EXPECT_EQ(opt.projector("w").steps(), 0);
  EXPECT_TRUE(torch::equal(W, W0));
  EXPECT_EQ(opt.state_tensors("w").at("A").abs().max().item<double>(), 0.0);
  const torch::Tensor G = grad(W0, 1);
  W.mutable_grad() = G.clone();
  opt.step();
  EXPECT_EQ(opt.projector("w").steps(), 1);
  EXPECT_LT(rel_err((W - W0) / lr, -best_rank(G, 2 * r)), 1e-3);
}

// ------------------------------------------------------------------ refusals

TEST(LoraGa, RankAboveHalfTheSmallerSideIsAConfigError) {
  torch::Tensor W = weight(5, 14);
  expect_config_error([&] { LowRankOptimizer opt(single_weight(W), ga_config(InnerType::sgd, 0.1, 3, 3.0)); },
                      {"config key 'targets[0].rank'", "init gradient", "'w'", "5x14", "<= min(n, m)/2 = 2", "got 3"});
  // rank 2 fits (2r = 4 <= 5); rank 3 with init zero fits too.
  EXPECT_NO_THROW({ LowRankOptimizer opt(single_weight(W), ga_config(InnerType::sgd, 0.1, 2, 2.0)); });
  Config zero = ga_config(InnerType::sgd, 0.1, 3, 3.0);
  zero.targets[0].init = Init::zero;
  EXPECT_NO_THROW({ LowRankOptimizer opt(single_weight(W), zero); });
}

TEST(LoraGa, OtherMethodsRefuseTheInit) {
  for (const Method method : {Method::hadamard, Method::random, Method::galore}) {
    Config c = config(method, InnerType::sgd, 0.1, 0.0, 2);
    c.targets[0].init = Init::gradient;
    expect_config_error([&] { c.validate(); }, {"config key 'targets[0].init'", "method lora", "expected zero"});
  }
  EXPECT_EQ(Config::from_yaml_string("targets:\n  - match: w\n    init: gradient\n").targets.at(0).init,
            Init::gradient);
}

TEST(LoraGa, DataParallelIsRefusedNamingTheTarget) {
  Config c = ga_config(InnerType::sgd, 0.1, 2, 2.0);
  Target other = c.targets[0];
  other.match = "v";
  other.init = Init::zero;
  c.targets.insert(c.targets.begin(), other);
  const std::string why = data_parallel_refusal(c);
  EXPECT_NE(why.find("targets[1].method"), std::string::npos) << why;
  EXPECT_NE(why.find("init gradient"), std::string::npos) << why;
  c.targets[1].init = Init::symmetric;
  EXPECT_EQ(data_parallel_refusal(c), "");
}

}  // namespace
}  // namespace gradlora
