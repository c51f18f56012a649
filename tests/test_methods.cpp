// The post's two other projections: `random` (resampled Gaussian, expected
// update = full SGD) and `additive` (row/column block sums).
#include "test_util.h"

#include <cmath>

using namespace gradlora;
using namespace gradlora::testing;  // the shared test helpers (test_util.h)

namespace {

/// One `random` SGD step on a lone parameter P from gradient G; returns ΔP.
torch::Tensor random_sgd_delta(const torch::Tensor& P_init, const torch::Tensor& G, double lr, uint64_t seed,
                               const std::string& extra = "") {
  torch::Tensor P = P_init.clone();
  const auto params = single_weight(P);
  LowRankOptimizer opt(params, quiet(fmt::format("seed: {}\noptimizer: {{type: sgd, lr: {}}}\n"
                                                 "targets: [{{match: w, method: random, rank: 2, alpha: 4{}}}]",
                                                 seed, lr, extra)));
  P.mutable_grad() = G.clone();
  opt.step();
  return P - P_init;
}

struct MeanStats {
  torch::Tensor mean, var;
};

MeanStats mean_delta(const torch::Tensor& P, const torch::Tensor& G, double lr, int N, uint64_t first_seed,
                     const std::string& extra = "") {
  torch::Tensor sum = torch::zeros_like(P), sq = torch::zeros_like(P);
  for (int i = 0; i < N; ++i) {
    torch::Tensor d = random_sgd_delta(P, G, lr, first_seed + i, extra);
    sum += d;
    sq += d * d;
  }
  torch::Tensor mean = sum / N;
  return {mean, (sq / N - mean * mean) * N / (N - 1)};
}

class Random : public ::testing::TestWithParam<torch::Device> {};
class Additive : public ::testing::TestWithParam<torch::Device> {};

}  // namespace

// ---- random: the expected update equals full-rank SGD

TEST_P(Random, ExpectedUpdateEqualsFullSgd) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  torch::manual_seed(3);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P = torch::randn({10, 8}, opts).to(device);  // drawn on the CPU, as everywhere
  const torch::Tensor G = torch::randn({10, 8}, opts).to(device);
  const double lr = 1e-3;
  const torch::Tensor target = -lr * G;

  // One step is low rank (≤ 2r = 4 directions), so it is not −η·G.
  const torch::Tensor one = random_sgd_delta(P, G, lr, 0);
  EXPECT_EQ(numerical_rank(one, 1e-9), 4);
  EXPECT_GT(max_abs_diff(one, target), 0.5 * target.abs().max().item<double>());

  // The mean of N independent steps converges to −η·G, within a CLT bound
  // derived from the per-entry variance: |mean − target| ≤ 5·sqrt(var/N) everywhere.
  double prev_err = 0;
  for (int N : {100, 1600}) {
    MeanStats st = mean_delta(P, G, lr, N, 1000 * N);
    const torch::Tensor z = (st.mean - target).abs() / (st.var / N).sqrt();
    EXPECT_LE(z.max().item<double>(), 5.0) << "N=" << N;
    const double err = (st.mean - target).norm().item<double>();
    if (prev_err > 0) {
      // 16x more samples: the error shrinks like 1/sqrt(N), i.e. about 4x (allow 2x).
      EXPECT_LT(err, prev_err / 2.0) << "N=" << N;
    }
    prev_err = err;
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, Random, ::testing::ValuesIn(test_devices()), DeviceName());

TEST(Random, ExpectationTestDetectsAScaleOffByTwo) {
  // σ·√2 doubles E[UUᵀ] and E[VᵀV]: the mean update becomes −2η·G and the bound must fail.
  torch::manual_seed(3);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const torch::Tensor P = torch::randn({10, 8}, opts);
  const torch::Tensor G = torch::randn({10, 8}, opts);
  const double lr = 1e-3;
  const double sd = unbiased_random_std(2.0, 2) * std::sqrt(2.0);
  MeanStats st = mean_delta(P, G, lr, 1600, 7, fmt::format(", init_std: {}", sd));
  const torch::Tensor z = (st.mean + lr * G).abs() / (st.var / 1600).sqrt();
  EXPECT_GT(z.max().item<double>(), 5.0);
}

TEST(Random, UnbiasedStdFormula) {
  // 2·s²·r·σ² = 1.
  for (double s : {0.5, 1.0, 2.0}) {
    for (int64_t r : {1, 4, 16}) {
      const double sd = unbiased_random_std(s, r);
      EXPECT_NEAR(2 * s * s * r * sd * sd, 1.0, 1e-12);
    }
  }
}

// ---- random: reproducible draws

TEST(Random, DrawsAreReproducibleAndIndependent) {
  const auto o = torch::TensorOptions().dtype(torch::kFloat);
  const torch::Tensor a = seeded_normal({64, 4}, 1.0, derive_seed(1, "fc1.weight", 0), o);
  EXPECT_TRUE(torch::equal(a, seeded_normal({64, 4}, 1.0, derive_seed(1, "fc1.weight", 0), o)));
  EXPECT_FALSE(torch::equal(a, seeded_normal({64, 4}, 1.0, derive_seed(2, "fc1.weight", 0), o)));
  EXPECT_FALSE(torch::equal(a, seeded_normal({64, 4}, 1.0, derive_seed(1, "fc2.weight", 0), o)));
  EXPECT_FALSE(torch::equal(a, seeded_normal({64, 4}, 1.0, derive_seed(1, "fc1.weight", 1), o)));
  // (The CPU draws run on one thread whatever at::get_num_threads() says, so a
  // thread-count comparison could not fail; Portability.* checks them across CPU kernels.)
}

// ---- random: resample_every k > 1 and on_resample: transfer, against the formulas

namespace {

constexpr int64_t kN = 9, kM = 7, kR = 2;
constexpr double kS = 3.0 / 2;  // alpha 3, rank 2

/// The draw of resample `idx` for parameter "w" (the documented seeding: U from counter
/// 2·idx, V from 2·idx + 1, σ = unbiased_random_std(s, r)).
std::pair<torch::Tensor, torch::Tensor> draw_uv(uint64_t seed, int64_t idx) {
  const auto o = torch::TensorOptions().dtype(torch::kDouble);
  const double sd = unbiased_random_std(kS, kR);
  return {seeded_normal({kN, kR}, sd, derive_seed(seed, "w", 2 * idx), o),
          seeded_normal({kR, kM}, sd, derive_seed(seed, "w", 2 * idx + 1), o)};
}

struct RandomRun {
  torch::Tensor P;
  std::unique_ptr<LowRankOptimizer> opt;
  RandomRun(const torch::Tensor& P0, const std::string& extra, const std::string& inner) : P(P0.clone()) {
    const auto params = single_weight(P);
    opt = std::make_unique<LowRankOptimizer>(
        params, quiet(fmt::format("seed: 21\noptimizer: {}\n"
                                  "targets: [{{match: w, method: random, rank: {}, alpha: 3{}}}]",
                                  inner, kR, extra)));
  }
  void step(const torch::Tensor& G) {
    P.mutable_grad() = G.clone();
    opt->step();
  }
  torch::Tensor moment(int i) const { return opt->state_tensors("w").at(fmt::format("inner.{}.momentum_buffer", i)); }
};

torch::Tensor grad_at(int64_t t) {
  auto gen = at::detail::createCPUGenerator(500 + t);
  return at::randn({kN, kM}, gen, torch::TensorOptions().dtype(torch::kDouble));
}

}  // namespace

TEST(Random, ResampleEveryKFollowsTheFormulas) {
  // Plain SGD, k = 3, 8 steps: draws at steps 0, 3, 6 (resample index t/k), the factors
  // trained in between; every step P += s·(A'B' − AB) with A' = A − lr·s·G·Bᵀ,
  // B' = B − lr·s·Aᵀ·G. Written here from the formulas; the library is only asked for P.
  torch::manual_seed(22);
  const torch::Tensor P0 = torch::randn({kN, kM}, torch::kDouble);
  const double lr = 0.05;
  RandomRun run(P0, ", resample_every: 3", fmt::format("{{type: sgd, lr: {}}}", lr));
  torch::Tensor P = P0.clone(), A, B;
  for (int64_t t = 0; t < 8; ++t) {
    if (t % 3 == 0) std::tie(A, B) = draw_uv(21, t / 3);
    const torch::Tensor G = grad_at(t);
    const torch::Tensor A1 = A - lr * kS * G.mm(B.t()), B1 = B - lr * kS * A.t().mm(G);
    P = P + kS * (A1.mm(B1) - A.mm(B));
    A = A1;
    B = B1;
    run.step(G);
    EXPECT_LT(max_abs_diff(run.P, P), 1e-12) << "step " << t;
    EXPECT_LT(max_abs_diff(run.opt->factors("w").first, A), 1e-12) << "step " << t;
  }
}

TEST(Random, TransferReexpressesTheMomentsInTheNewProjection) {
  // SGD with momentum μ, k = 2, on_resample: transfer. At the resample of step 2, with the
  // trained factors A_old, B_old and the new draws U, V:
  //   m_A ← m_A·(B_old·B_oldᵀ)⁻¹·B_old·Vᵀ        m_B ← Uᵀ·A_old·(A_oldᵀ·A_old)⁻¹·m_B
  // then buf ← μ·buf + g and the factor ← factor − lr·buf (g from the new U, V).
  torch::manual_seed(23);
  const torch::Tensor P0 = torch::randn({kN, kM}, torch::kDouble);
  const double lr = 0.05, mu = 0.9;
  RandomRun run(P0, ", resample_every: 2, on_resample: transfer",
                fmt::format("{{type: sgd, lr: {}, momentum: {}}}", lr, mu));
  run.step(grad_at(0));
  run.step(grad_at(1));
  const torch::Tensor A_old = run.opt->factors("w").first.clone(), B_old = run.opt->factors("w").second.clone();
  const torch::Tensor mA = run.moment(0).clone(), mB = run.moment(1).clone();
  const torch::Tensor G = grad_at(2);
  run.step(G);
  auto [U, V] = draw_uv(21, 1);
  const torch::Tensor mA_t = mA.mm(torch::inverse(B_old.mm(B_old.t()))).mm(B_old).mm(V.t());
  const torch::Tensor mB_t = U.t().mm(A_old).mm(torch::inverse(A_old.t().mm(A_old))).mm(mB);
  const torch::Tensor bufA = mu * mA_t + kS * G.mm(V.t()), bufB = mu * mB_t + kS * U.t().mm(G);
  EXPECT_LT(max_abs_diff(run.moment(0), bufA), 1e-10);
  EXPECT_LT(max_abs_diff(run.moment(1), bufB), 1e-10);
  EXPECT_LT(max_abs_diff(run.opt->factors("w").first, U - lr * bufA), 1e-10);
  EXPECT_LT(max_abs_diff(run.opt->factors("w").second, V - lr * bufB), 1e-10);
  // The transfer changed the moments: `keep` would leave μ·m_A + g.
  EXPECT_GT(max_abs_diff(bufA, mu * mA + kS * G.mm(V.t())), 1e-3);
}

namespace {

std::vector<torch::Tensor> train_weights(const std::string& yaml, int steps, torch::ScalarType dtype = torch::kFloat) {
  Mlp m = make_mlp(dtype);
  LowRankOptimizer opt(m->named_parameters(), quiet(yaml));
  for (int i = 0; i < steps; ++i) {
    auto [x, y] = batch(i, dtype);
    opt.zero_grad();
    torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

bool same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

}  // namespace

TEST(Random, SelectionOfOtherParametersDoesNotChangeTheDraws) {
  const std::string alone = "seed: 5\ntargets: [{match: fc1.weight, method: random, rank: 2}]";
  const std::string both =
      "seed: 5\ntargets: [{match: fc1.weight, method: random, rank: 2}, "
      "{match: fc2.weight, method: random, rank: 2}]";
  // fc2 trained or not changes fc1's gradients after step 1, so compare one step.
  EXPECT_TRUE(torch::equal(train_weights(alone, 1)[0], train_weights(both, 1)[0]));
  EXPECT_FALSE(torch::equal(train_weights(alone, 1)[0], train_weights("seed: 6\n" + alone.substr(8), 1)[0]));
}

TEST(Random, ResampleOptionsAreDeterministicAndDistinct) {
  std::vector<std::vector<torch::Tensor>> runs;
  for (const char* k : {"1", "3"}) {
    for (const char* on : {"keep", "reset", "transfer"}) {
      const std::string yaml = fmt::format(
          "seed: 2\noptimizer: {{type: adamw, lr: 0.01}}\n"
          "targets: [{{match: 'fc*.weight', method: random, rank: 2, resample_every: {}, on_resample: {}}}]",
          k, on);
      auto a = train_weights(yaml, 9), b = train_weights(yaml, 9);
      EXPECT_TRUE(same(a, b)) << k << " " << on;
      for (const auto& prev : runs) EXPECT_FALSE(same(prev, a)) << k << " " << on;
      runs.push_back(a);
    }
  }
}

TEST(Random, ProjectionsAreNotStoredWhenResampledEveryStep) {
  Mlp m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(), quiet("targets: [{match: fc1.weight, method: random, rank: 2}]"));
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  opt.step();
  int64_t stored = 0;
  for (const auto& kv : opt.state_tensors("fc1.weight")) {
    if (kv.first.rfind("inner.", 0) != 0) stored += kv.second.numel();
  }
  EXPECT_EQ(stored, 0);
  EXPECT_EQ(opt.report().params[0].persistent_bytes, 0);
  EXPECT_EQ(opt.report().params[0].moment_bytes, 2 * 2 * (16 + 12) * 4);
  EXPECT_THROW(opt.factors("fc1.weight"), std::invalid_argument);
}

// ---- additive

TEST(Additive, RankOneIsRowAndColumnSums) {
  // Small integers: every summation order is exact, so equality is exact.
  const torch::Tensor G = torch::randint(-8, 8, {7, 5}).to(torch::kFloat);
  auto [gA, gB] = additive_factor_grads(G, 1);
  EXPECT_TRUE(torch::equal(gA, G.sum(1, true)));
  EXPECT_TRUE(torch::equal(gB, G.sum(0, true)));
}

TEST(Additive, BlockSumsFollowTheModFormula) {
  for (auto [n, m, r] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{6, 9, 3}, {7, 10, 3}, {5, 4, 4}, {9, 2, 2}}) {
    const torch::Tensor G = torch::randint(-8, 8, {n, m}).to(torch::kFloat);
    auto [gA, gB] = additive_factor_grads(G, r);
    torch::Tensor eA = torch::zeros({n, r}), eB = torch::zeros({r, m});
    auto g = G.accessor<float, 2>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        eA[i][j % r] += g[i][j];
        eB[i % r][j] += g[i][j];
      }
    }
    EXPECT_TRUE(torch::equal(gA, eA)) << n << "x" << m << " r=" << r;
    EXPECT_TRUE(torch::equal(gB, eB)) << n << "x" << m << " r=" << r;
  }
}

TEST_P(Additive, SgdStepIsTheClosedForm) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  // r = 1, s = 1: ΔP_ij = −η·(Σ_j' G_ij' + Σ_i' G_i'j) after one SGD step from zero factors.
  torch::manual_seed(0);
  torch::Tensor P = torch::randn({6, 5}, torch::kDouble).to(device);
  const torch::Tensor P0 = P.clone();
  const torch::Tensor G = torch::randn({6, 5}, torch::kDouble).to(device);
  const auto params = single_weight(P);
  LowRankOptimizer opt(params,
                       quiet("optimizer: {type: sgd, lr: 0.1}\ntargets: [{match: w, method: additive, rank: 1}]"));
  P.mutable_grad() = G.clone();
  opt.step();
  const torch::Tensor expected = -0.1 * (G.sum(1, true) + G.sum(0, true));
  EXPECT_LE(max_abs_diff(P - P0, expected), 1e-14);
  EXPECT_EQ(numerical_rank(P - P0, 1e-9), 2);
}

namespace {

/// J (r×m) with J[k, j] = 1 when j ≡ k (mod r): the explicit block identity (built on the CPU).
torch::Tensor block_identity(int64_t r, int64_t m, torch::ScalarType dtype, torch::Device device) {
  torch::Tensor J = torch::zeros({r, m}, dtype);
  for (int64_t j = 0; j < m; ++j) J[j % r][j] = 1;
  return J.to(device);
}

}  // namespace

TEST_P(Additive, MatchesAutogradThroughTheExplicitParameterisation) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  for (int64_t r : {2, 3, 5}) {  // 16x12 and 6x16: 2 divides all, 3 and 5 leave truncated blocks
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      const auto o = torch::TensorOptions().dtype(dtype).device(device);
      Mlp m = make_mlp(dtype, device);
      LowRankOptimizer opt(
          m->named_parameters(),
          quiet(fmt::format("optimizer: {{type: adamw, lr: 0.01, weight_decay: 0.1}}\n"
                            "targets: [{{match: 'fc*.weight', method: additive, rank: {}, alpha: {}}}]",
                            r, 2 * r)));
      // Module side: W = W0 + s·(A·J + J'·B) with A, B trained by torch::optim::AdamW.
      const double s = 2.0;
      torch::Tensor W1 = m->fc(1)->weight.detach().clone(), W2 = m->fc(2)->weight.detach().clone();
      torch::Tensor b1 = m->fc(1)->bias.detach().clone(), b2 = m->fc(2)->bias.detach().clone();
      const int64_t n1 = W1.size(0), m1 = W1.size(1), n2 = W2.size(0), m2 = W2.size(1);
      torch::Tensor A1 = torch::zeros({n1, r}, o).requires_grad_(), B1 = torch::zeros({r, m1}, o).requires_grad_();
      torch::Tensor A2 = torch::zeros({n2, r}, o).requires_grad_(), B2 = torch::zeros({r, m2}, o).requires_grad_();
      const torch::Tensor J1 = block_identity(r, m1, dtype, device), J1p = block_identity(r, n1, dtype, device).t();
      const torch::Tensor J2 = block_identity(r, m2, dtype, device), J2p = block_identity(r, n2, dtype, device).t();
      torch::optim::AdamW ref({A1, B1, A2, B2}, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
      double gap = 0;
      for (int i = 0; i < 20; ++i) {
        auto [x, y] = batch(i, dtype, device);
        opt.zero_grad();
        torch::mse_loss(m->forward(x), y).backward();
        opt.step();
        ref.zero_grad();
        torch::Tensor Wa = W1 + s * (torch::mm(A1, J1) + torch::mm(J1p, B1));
        torch::Tensor Wb = W2 + s * (torch::mm(A2, J2) + torch::mm(J2p, B2));
        torch::Tensor out = torch::mm(torch::tanh(torch::mm(x, Wa.t()) + b1), Wb.t()) + b2;
        torch::mse_loss(out, y).backward();
        ref.step();
        torch::NoGradGuard ng;
        gap = std::max({gap, max_abs_diff(m->fc(1)->weight, W1 + s * (torch::mm(A1, J1) + torch::mm(J1p, B1))),
                        max_abs_diff(m->fc(2)->weight, W2 + s * (torch::mm(A2, J2) + torch::mm(J2p, B2)))});
      }
      EXPECT_LE(gap, dtype == torch::kDouble ? 1e-11 : 1e-5) << "r=" << r;
      // rank(ΔP) ≤ 2r
      const torch::Tensor d = m->fc(1)->weight.detach().to(torch::kDouble) - W1.to(torch::kDouble);
      EXPECT_LE(numerical_rank(d, dtype == torch::kDouble ? 1e-9 : 1e-4), 2 * r) << "r=" << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, Additive, ::testing::ValuesIn(test_devices()), DeviceName());

TEST(Additive, ReportShowsTheAdditiveNumbers) {
  Mlp m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(), quiet("targets: [{match: fc1.weight, method: additive, rank: 3}]"));
  const ParamReport& p = opt.report().params[0];
  EXPECT_EQ(p.trainable, 3 * (16 + 12));
  EXPECT_NE(p.note.find("rank(dP) <= 6"), std::string::npos) << p.note;
}
