// Learning rates and update rules of the inner rule, against references written here:
// `lr_ratio` of `lora` (LoRA+, Hayou et al. 2024, arXiv 2402.12354) and `optimizer.type:
// adamw_hf` (the AdamW of transformers and galore_torch), including the trajectory of
// `galore` with it against numbers written by scripts/galore_reference.py.
#include "methods/method_util.h"  // config: one quiet target `w`

#include <gradlora/checkpoint.h>
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace gradlora {
namespace {

// ------------------------------------------------------------------ helpers

torch::OrderedDict<std::string, torch::Tensor> named(const torch::Tensor& W) {
  torch::OrderedDict<std::string, torch::Tensor> d;
  d.insert("w", W);
  return d;
}

torch::Tensor seeded(int64_t n, int64_t m, uint64_t seed, double scale) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randn({n, m}, gen, torch::TensorOptions().dtype(torch::kDouble)).mul_(scale);
}

// The gradient of 0.5/b·‖X·Wᵀ − Y‖² for batch t of a seeded regression problem: it
// depends on W, so a wrong step changes every later gradient.
torch::Tensor regression_grad(const torch::Tensor& W, int64_t t) {
  const int64_t n = W.size(0), m = W.size(1), b = 16;
  const torch::Tensor X = seeded(b, m, 900 + 2 * static_cast<uint64_t>(t), 1.0);
  const torch::Tensor Y = seeded(b, n, 901 + 2 * static_cast<uint64_t>(t), 1.0);
  return torch::mm((torch::mm(X, W.detach().t()) - Y).t(), X).div_(static_cast<double>(b));
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// One AdamW step of the transformers / galore_torch kind on x (in place), written from its
// formulas: eps added to √v before the bias correction, decay of the updated x after.
struct HfAdamRef {
  HfAdamRef(double lr_, double wd_) : lr(lr_), wd(wd_) {}
  double lr, wd, b1 = 0.9, b2 = 0.999, eps = 1e-3;
  torch::Tensor m, v;
  int64_t k = 0;
  void step(torch::Tensor& x, const torch::Tensor& g, double lr_x) {
    if (!m.defined()) {
      m = torch::zeros_like(x);
      v = torch::zeros_like(x);
    }
    ++k;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const double step_size = lr_x * std::sqrt(1 - std::pow(b2, k)) / (1 - std::pow(b1, k));
    x = x - step_size * m / (v.sqrt() + eps);
    x = x - lr_x * wd * x;
  }
};

// ------------------------------------------------------- lr_ratio (LoRA+)

Config lora_plus(InnerType type, double lr, double wd, double ratio, Init init = Init::zero) {
  Config c = method_testing::config(Method::lora, type, lr, wd, 3);
  c.targets[0].init = init;
  c.targets[0].options["lr_ratio"] = ratio;
  return c;
}

// From init zero (A = 0) the first SGD step changes only A (gB = s·Aᵀ·G = 0), by
// −lr_A·s·G·Bᵀ, so ΔW = −lr_A·s²·G·B0ᵀ·B0 is linear in lr_A: with lr_ratio 16 it is
// 16 times the change with lr_ratio 1. With W0 = 0 and the exact power-of-two factor
// the two are equal bit for bit. This alone cannot tell the ratio from a larger lr on
// both factors; TwoSgdSteps… can.
TEST(LoraPlus, OneSgdStepFromZeroInitChangesWByTheRatio) {
  const torch::Tensor G = seeded(10, 7, 11, 1.0);
  std::map<double, torch::Tensor> change;
  for (double ratio : {1.0, 16.0}) {
    torch::Tensor W = torch::zeros({10, 7}, torch::kDouble);
    LowRankOptimizer opt(named(W), lora_plus(InnerType::sgd, 0.05, 0.0, ratio));
    const torch::Tensor B0 = opt.factors("w").second.clone();
    W.mutable_grad() = G.clone();
    opt.step();
    EXPECT_TRUE(torch::equal(opt.factors("w").second, B0)) << "B moved at the first step";
    change[ratio] = W.clone();
  }
  const double ratio_seen = (change[16.0].abs().max() / change[1.0].abs().max()).item<double>();
  std::printf("one SGD step from init zero: max|dW| ratio (lr_ratio 16 over 1) = %.17g\n", ratio_seen);
  EXPECT_GT(change[1.0].abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(torch::equal(change[16.0], change[1.0] * 16.0))
      << "max |dW16 - 16 dW1| = " << max_abs(change[16.0], change[1.0] * 16.0);
}

// Two SGD steps on fixed gradients G1, G2, with the parameter group's lr halved between
// them (what a scheduler does to it): A steps with lr_ratio·lr, B with lr.
//   A1 = −ρ·η1·s·G1·B0ᵀ,          B1 = B0 (A0 = 0)
//   A2 = A1 − ρ·η2·s·G2·B1ᵀ,      B2 = B1 − η2·s·A1ᵀ·G2
//   W2 = W0 + s·A2·B2
// B2 − B0 is proportional to ρ (through A1) but not to ρ²: applying the ratio to both
// factors gives a ρ² there and ρ³ in W2; applying it to B only leaves A1 unscaled.
TEST(LoraPlus, TwoSgdStepsGiveEachFactorItsLearningRateAndSchedulersScaleBoth) {
  const int64_t n = 10, m = 7;
  const double lr = 0.05, rho = 16.0, s = 1.0;
  const torch::Tensor W0 = seeded(n, m, 5, 0.5), G1 = seeded(n, m, 12, 1.0), G2 = seeded(n, m, 13, 1.0);
  torch::Tensor W = W0.clone();
  LowRankOptimizer opt(named(W), lora_plus(InnerType::sgd, lr, 0.0, rho));
  const torch::Tensor B0 = opt.factors("w").second.clone();
  W.mutable_grad() = G1.clone();
  opt.step();
  opt.param_groups()[0].options().set_lr(lr * 0.5);
  W.mutable_grad() = G2.clone();
  opt.step();

  const double eta1 = lr, eta2 = lr * 0.5;
  const torch::Tensor A1 = -rho * eta1 * s * torch::mm(G1, B0.t());
  const torch::Tensor B1 = B0;
  const torch::Tensor A2 = A1 - rho * eta2 * s * torch::mm(G2, B1.t());
  const torch::Tensor B2 = B1 - eta2 * s * torch::mm(A1.t(), G2);
  const torch::Tensor W2 = W0 + s * torch::mm(A2, B2);
  const auto [A, B] = opt.factors("w");
  const double dA = max_abs(A, A2), dB = max_abs(B, B2), dW = max_abs(W, W2);
  std::printf(
      "two SGD steps, lr_ratio 16, group lr halved after the first: max|A - ref| %.3g, max|B - ref| %.3g, max|W - ref| "
      "%.3g "
      "(|B2 - B0| = %.3g)\n",
      dA, dB, dW, (B2 - B0).abs().max().item<double>());
  EXPECT_GT((B2 - B0).abs().max().item<double>(), 1e-2);  // B moved: the second step sees its lr
  EXPECT_LT(dA, 1e-12);
  EXPECT_LT(dB, 1e-12);
  EXPECT_LT(dW, 1e-12);
}

// AdamW (LibTorch's: decay before the update, eps after the bias correction) over 12
// steps of a regression whose gradient depends on W, lr_ratio 4, weight decay 0.05 (the
// inner rule decays each factor with its own lr), against the factors written out here.
// Adam is invariant to a gradient's scale, so the ratio shows only through the step size
// and the decay.
TEST(LoraPlus, AdamWFactorsFollowTheirOwnLearningRates) {
  const int64_t n = 9, m = 6;
  const double lr = 1e-2, wd = 0.05, rho = 4.0, b1 = 0.9, b2 = 0.999, eps = 1e-8, s = 1.0;
  torch::Tensor W = seeded(n, m, 6, 0.5);
  const torch::Tensor W0 = W.clone();
  LowRankOptimizer opt(named(W), lora_plus(InnerType::adamw, lr, wd, rho));
  torch::Tensor A = opt.factors("w").first.clone(), B = opt.factors("w").second.clone();
  const torch::Tensor A0 = A.clone(), B0 = B.clone();
  torch::Tensor mA = torch::zeros_like(A), vA = torch::zeros_like(A), mB = torch::zeros_like(B),
                vB = torch::zeros_like(B);
  auto adamw = [&](torch::Tensor& x, torch::Tensor& mx, torch::Tensor& vx, const torch::Tensor& g, double lr_x,
                   int64_t k) {
    x = x * (1 - lr_x * wd);
    mx = b1 * mx + (1 - b1) * g;
    vx = b2 * vx + (1 - b2) * g * g;
    const double bc1 = 1 - std::pow(b1, k), bc2 = 1 - std::pow(b2, k);
    x = x - (lr_x / bc1) * mx / (vx.sqrt() / std::sqrt(bc2) + eps);
  };
  torch::Tensor P = W0.clone();
  for (int64_t k = 1; k <= 12; ++k) {
    W.mutable_grad() = regression_grad(W, k);
    opt.step();
    const torch::Tensor G = regression_grad(P, k);
    const torch::Tensor gA = s * torch::mm(G, B.t()), gB = s * torch::mm(A.t(), G);
    adamw(A, mA, vA, gA, rho * lr, k);
    adamw(B, mB, vB, gB, lr, k);
    P = W0 + s * (torch::mm(A, B) - torch::mm(A0, B0));
  }
  const double dA = max_abs(opt.factors("w").first, A), dB = max_abs(opt.factors("w").second, B);
  const double dW = max_abs(W, P);
  std::printf("AdamW, lr_ratio 4, 12 steps: max|A - ref| %.3g, max|B - ref| %.3g, max|W - ref| %.3g (moved %.3g)\n", dA,
              dB, dW, max_abs(W, W0));
  EXPECT_GT(max_abs(W, W0), 1e-2);
  EXPECT_LT(dA, 1e-12);
  EXPECT_LT(dB, 1e-12);
  EXPECT_LT(dW, 1e-12);
}

Config yaml_config(const std::string& target_extra) {
  return Config::from_yaml_string(
      "optimizer: {type: sgd, lr: 0.1}\nlog_report: false\ntargets:\n  - {match: w, method: lora, rank: 2" +
      target_extra + "}\n");
}

void expect_config_error(const std::string& target_extra, const std::vector<std::string>& fragments) {
  SCOPED_TRACE(target_extra);
  try {
    yaml_config(target_extra);
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

TEST(LoraPlus, RatioIsAValidatedOptionOfLoraOnly) {
  EXPECT_DOUBLE_EQ(option_double(yaml_config("").targets[0], "lr_ratio"), 1.0);
  EXPECT_DOUBLE_EQ(option_double(yaml_config(", lr_ratio: 16").targets[0], "lr_ratio"), 16.0);
  EXPECT_DOUBLE_EQ(option_double(yaml_config(", lr_ratio: 0.5").targets[0], "lr_ratio"), 0.5);
  expect_config_error(", lr_ratio: 0", {"targets[0].lr_ratio", "> 0", "got 0"});
  expect_config_error(", lr_ratio: -2", {"targets[0].lr_ratio", "got -2"});
  expect_config_error(", lr_ratio: fast", {"targets[0].lr_ratio", "fast"});
  expect_config_error(", lr_ratio: .nan", {"targets[0].lr_ratio"});
  try {
    Config::from_yaml_string("targets:\n  - {match: w, method: galore, rank: 2, lr_ratio: 16}\n");
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("targets[0].lr_ratio': unknown key"), std::string::npos) << e.what();
  }
  Config c = method_testing::config(Method::galore, InnerType::sgd, 0.1, 0.0, 2);  // the same from code
  c.targets[0].options["lr_ratio"] = 16.0;
  try {
    c.validate();
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("method 'galore' has no option 'lr_ratio'"), std::string::npos) << e.what();
  }
  // It is part of what data-parallel ranks compare.
  bool described = false;
  for (const auto& [k, v] : describe_target(yaml_config(", lr_ratio: 16").targets[0])) {
    if (k == "lr_ratio") described = v == "16";
  }
  EXPECT_TRUE(described);
}

TEST(LoraPlus, ACheckpointWithAnotherRatioIsRefused) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("gradlora_lora_plus_" + std::to_string(::getpid()) + ".ckpt"))
          .string();
  torch::Tensor W = seeded(6, 5, 7, 0.5);
  LowRankOptimizer opt(named(W), lora_plus(InnerType::adamw, 1e-2, 0.0, 16.0));
  W.mutable_grad() = regression_grad(W, 0);
  opt.step();
  save_checkpoint(opt, path);
  for (double ratio : {1.0, 8.0}) {
    torch::Tensor W2 = W.clone();
    LowRankOptimizer other(named(W2), lora_plus(InnerType::adamw, 1e-2, 0.0, ratio));
    try {
      load_checkpoint(other, path);
      ADD_FAILURE() << "expected CheckpointError for lr_ratio " << ratio;
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("lr_ratio 16"), std::string::npos) << e.what();
    }
  }
  torch::Tensor W3 = W.clone();
  LowRankOptimizer same(named(W3), lora_plus(InnerType::adamw, 1e-2, 0.0, 16.0));
  EXPECT_NO_THROW(load_checkpoint(same, path));
  std::filesystem::remove(path);
}

// ------------------------------------------------------------- adamw_hf

// A `full` parameter: the rule itself, 25 steps, against HfAdamRef. eps = 1e-3 makes where
// eps enters matter (with eps after the bias correction the steps differ by up to ~3 %).
TEST(AdamwHf, FullParameterFollowsTheFormulas) {
  const double lr = 1e-2, wd = 0.1;
  torch::Tensor W = seeded(9, 6, 8, 0.5);
  Config c = method_testing::config(Method::full, InnerType::adamw_hf, lr, wd, 1);
  c.optimizer.eps = 1e-3;
  LowRankOptimizer opt(named(W), c);
  torch::Tensor P = W.clone();
  const torch::Tensor W0 = W.clone();
  HfAdamRef ref{lr, wd};
  for (int64_t t = 0; t < 25; ++t) {
    W.mutable_grad() = regression_grad(W, t);
    opt.step();
    ref.step(P, regression_grad(P, t), lr);
  }
  const double d = max_abs(W, P);
  std::printf("adamw_hf, full parameter, 25 steps: max|W - ref| = %.3g (moved %.3g)\n", d, max_abs(W, W0));
  EXPECT_GT(max_abs(W, W0), 0.05);
  EXPECT_LT(d, 1e-12);
  EXPECT_EQ(opt.state_tensors("w").count("inner.0.exp_avg_sq"), 1u);
  EXPECT_LT(max_abs(opt.state_tensors("w").at("inner.0.exp_avg_sq"), ref.v), 1e-12);
}

// `lora` with adamw_hf and lr_ratio 2, 25 steps: init zero (the rule decays A and B
// itself, after the update) and init symmetric (the projector decays each factor's
// departure from its start, after the update), against the factors written out here.
class AdamwHfLora : public ::testing::TestWithParam<Init> {};

TEST_P(AdamwHfLora, FactorsFollowTheFormulas) {
  const Init init = GetParam();
  const double lr = 1e-2, wd = 0.1, rho = 2.0, s = 1.0;
  torch::Tensor W = seeded(9, 6, 9, 0.5);
  Config c = lora_plus(InnerType::adamw_hf, lr, wd, rho, init);
  c.optimizer.eps = 1e-3;
  LowRankOptimizer opt(named(W), c);
  const torch::Tensor W0 = W.clone();
  torch::Tensor A = opt.factors("w").first.clone(), B = opt.factors("w").second.clone();
  const torch::Tensor A0 = A.clone(), B0 = B.clone();
  // Zero init decays toward 0; symmetric toward the start: the decay acts on x − x0.
  const bool to_start = init == Init::symmetric;
  HfAdamRef refA{lr, wd}, refB{lr, wd};
  torch::Tensor P = W0.clone();
  for (int64_t t = 0; t < 25; ++t) {
    W.mutable_grad() = regression_grad(W, t);
    opt.step();
    const torch::Tensor G = regression_grad(P, t);
    const torch::Tensor gA = s * torch::mm(G, B.t()), gB = s * torch::mm(A.t(), G);
    torch::Tensor dA = A - (to_start ? A0 : torch::zeros_like(A)), dB = B - (to_start ? B0 : torch::zeros_like(B));
    refA.step(dA, gA, rho * lr);
    refB.step(dB, gB, lr);
    A = dA + (to_start ? A0 : torch::zeros_like(A));
    B = dB + (to_start ? B0 : torch::zeros_like(B));
    P = W0 + s * (torch::mm(A, B) - torch::mm(A0, B0));
  }
  const double eA = max_abs(opt.factors("w").first, A), eB = max_abs(opt.factors("w").second, B);
  const double eW = max_abs(W, P);
  std::printf(
      "adamw_hf, lora init %s, lr_ratio 2, 25 steps: max|A - ref| %.3g, max|B - ref| %.3g, max|W - ref| %.3g "
      "(moved %.3g)\n",
      to_string(init), eA, eB, eW, max_abs(W, W0));
  EXPECT_GT(max_abs(W, W0), 0.01);
  EXPECT_LT(eA, 1e-12);
  EXPECT_LT(eB, 1e-12);
  EXPECT_LT(eW, 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Inits, AdamwHfLora, ::testing::Values(Init::zero, Init::symmetric),
                         [](const ::testing::TestParamInfo<Init>& i) { return std::string(to_string(i.param)); });

TEST(AdamwHf, ConfigNamesTheTypeAndRefusesAmsgrad) {
  const Config c = Config::from_yaml_string("optimizer: {type: adamw_hf}\ntargets: []\n");
  EXPECT_EQ(c.optimizer.type, InnerType::adamw_hf);
  EXPECT_EQ(c.optimizer.effective_weight_decay(), 0.0);  // transformers' and galore_torch's default
  try {
    Config::from_yaml_string("optimizer: {type: adamw_hf, amsgrad: true}\ntargets: []\n");
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer.amsgrad"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("adamw_hf"), std::string::npos) << e.what();
  }
  try {
    Config::from_yaml_string("optimizer: {type: adamw_tf}\ntargets: []\n");
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("adamw_hf"), std::string::npos) << e.what();  // listed among the choices
  }
}

// Every method with adamw_hf (weight decay on, so each decay path runs): a run resumed from
// a checkpoint continues bit for bit, and the checkpoint does not load under adamw.
TEST(AdamwHf, EveryMethodResumesBitForBitAndRecordsTheRule) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("gradlora_adamw_hf_" + std::to_string(::getpid()) + ".ckpt")).string();
  struct Case {
    Method method;
    Init init;
    std::map<std::string, OptionValue> options;
  };
  const std::vector<Case> cases = {
      {Method::lora, Init::zero, {{"lr_ratio", 4.0}}},
      {Method::lora, Init::symmetric, {}},
      {Method::random, Init::zero, {{"resample_every", int64_t{2}}}},
      {Method::additive, Init::zero, {}},
      {Method::galore, Init::zero, {{"update_proj_gap", int64_t{2}}}},
      {Method::hadamard, Init::symmetric, {}},
      {Method("apollo"), Init::zero, {{"update_proj_gap", int64_t{2}}}},
      {Method::full, Init::zero, {}},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(to_string(k.method) + std::string(" init ") + to_string(k.init));
    Config c = method_testing::config(k.method, InnerType::adamw_hf, 1e-2, 0.1, 2);
    c.targets[0].init = k.init;
    c.targets[0].options = k.options;
    torch::Tensor W = seeded(8, 6, 10, 0.5);
    LowRankOptimizer opt(named(W), c);
    for (int64_t t = 0; t < 3; ++t) {
      W.mutable_grad() = regression_grad(W, t);
      opt.step();
    }
    save_checkpoint(opt, path);
    torch::Tensor W2 = W.clone();
    for (int64_t t = 3; t < 6; ++t) {
      W.mutable_grad() = regression_grad(W, t);
      opt.step();
    }
    LowRankOptimizer resumed(named(W2), c);
    load_checkpoint(resumed, path);
    for (int64_t t = 3; t < 6; ++t) {
      W2.mutable_grad() = regression_grad(W2, t);
      resumed.step();
    }
    EXPECT_TRUE(torch::equal(W, W2)) << "max |W - W_resumed| = " << max_abs(W, W2);
    Config other = c;
    other.optimizer.type = InnerType::adamw;
    torch::Tensor W3 = W.clone();
    LowRankOptimizer wrong(named(W3), other);
    try {
      load_checkpoint(wrong, path);
      ADD_FAILURE() << "expected CheckpointError";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("'adamw_hf' in the checkpoint, 'adamw' here"), std::string::npos)
          << e.what();
    }
  }
  std::filesystem::remove(path);
}

// ---------------------------------------- galore with adamw_hf vs the fixture

// splitmix64 (Steele, Lea & Flood 2014) as uniform doubles in [-1, 1): the generator of
// scripts/galore_reference.py, so that both sides train on the same numbers.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53 * 2.0 - 1.0; }
  torch::Tensor matrix(int64_t n, int64_t m, double scale) {
    std::vector<double> v(static_cast<size_t>(n * m));
    for (auto& x : v) x = uniform() * scale;
    return torch::tensor(v, torch::kDouble).view({n, m});
  }
};

struct FixtureCase {
  std::string name;
  std::map<std::string, std::string> keys;
  std::map<std::string, std::map<int64_t, std::vector<double>>> rows;  // W / G / Q, by step
  double num(const std::string& k) const { return std::stod(keys.at(k)); }
  int64_t integer(const std::string& k) const { return std::stoll(keys.at(k)); }
  torch::Tensor tensor(const std::string& what, int64_t t, int64_t n, int64_t m) const {
    return torch::tensor(rows.at(what).at(t), torch::kDouble).view({n, m});
  }
};

std::vector<FixtureCase> read_fixture() {
  const std::string path = std::string(GRADLORA_SOURCE_DIR) + "/tests/data/galore_adamw_hf/trajectory.txt";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<FixtureCase> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string head;
    ls >> head;
    if (head == "case") {
      cases.emplace_back();
      ls >> cases.back().name;
      std::string k, v;
      while (ls >> k >> v) cases.back().keys[k] = v;
    } else {
      int64_t t = 0;
      ls >> t;
      std::vector<double> values;
      std::string tok;
      while (ls >> tok) values.push_back(std::strtod(tok.c_str(), nullptr));
      cases.at(cases.size() - 1).rows[head][t] = std::move(values);
    }
  }
  return cases;
}

// Trains the fixture case with `type` (rank, gap, scale, lr, betas, eps, weight decay from
// the fixture; `galore` defaults otherwise: proj_side auto, on_resample keep) and returns
// the largest |W_t − W_t(fixture)| over the 30 steps, relative to max |W_t(fixture) − W_0|;
// `q_diff` gets the largest |Q − Q(fixture)| over the refreshes.
double trajectory_difference(const FixtureCase& fc, InnerType type, double* q_diff = nullptr) {
  const int64_t n = fc.integer("n"), m = fc.integer("m"), steps = fc.integer("steps"), gap = fc.integer("gap");
  SplitMix64 rng{static_cast<uint64_t>(fc.integer("seed"))};
  torch::Tensor W = rng.matrix(n, m, 0.5);
  EXPECT_TRUE(torch::equal(W, fc.tensor("W", 0, n, m))) << fc.name << ": the start weights differ";
  std::vector<torch::Tensor> grads;
  for (int64_t t = 0; t < steps; ++t) grads.push_back(rng.matrix(n, m, fc.num("grad_scale")));
  EXPECT_TRUE(torch::equal(grads[0], fc.tensor("G", 0, n, m))) << fc.name << ": the generators differ";

  Config c = method_testing::config(Method::galore, type, fc.num("lr"), fc.num("weight_decay"), fc.integer("rank"));
  c.optimizer.betas = {fc.num("beta1"), fc.num("beta2")};
  c.optimizer.eps = fc.num("eps");
  c.targets[0].options["update_proj_gap"] = gap;
  c.targets[0].options["scale"] = fc.num("scale");
  LowRankOptimizer opt(named(W), c);
  double worst = 0.0, span = 0.0, worst_q = 0.0;
  const torch::Tensor W0 = W.clone();
  for (int64_t t = 0; t < steps; ++t) {
    W.mutable_grad() = grads[static_cast<size_t>(t)].clone();
    opt.step();
    if (t % gap == 0) {
      const torch::Tensor Q = opt.state_tensors("w").at("Q");
      worst_q = std::max(worst_q, max_abs(Q, fc.tensor("Q", t, Q.size(0), Q.size(1))));
    }
    const torch::Tensor ref = fc.tensor("W", t + 1, n, m);
    worst = std::max(worst, max_abs(W, ref));
    span = std::max(span, (ref - W0).abs().max().item<double>());
  }
  if (q_diff) *q_diff = worst_q;
  return worst / span;
}

// The fixture is GaLore + galore_torch's AdamW from its formulas in float64 (PyTorch's SVD);
// gradlora's `galore` with `adamw_hf` on double weights takes the same SVD (LAPACK, same
// input) and so the same projector, signs included, and follows the trajectory to float64
// rounding. LibTorch's `adamw` on the same run is the control: where eps enters and when the
// decay acts make it leave the trajectory, by far more at |G| ~ 1e-3 than at |G| ~ 1.
TEST(AdamwHf, GaloreFollowsTheGaloreTorchTrajectory) {
  const std::vector<FixtureCase> cases = read_fixture();
  ASSERT_EQ(cases.size(), 2u);
  for (const auto& fc : cases) {
    SCOPED_TRACE(fc.name);
    double q_diff = 0.0;
    const double hf = trajectory_difference(fc, InnerType::adamw_hf, &q_diff);
    const double torch_adamw = trajectory_difference(fc, InnerType::adamw);
    std::printf(
        "galore vs the fixture, case %s: max|Q - Q_ref| %.3g; max|W_t - W_t,ref| / max|W_t,ref - W_0|: "
        "adamw_hf %.3g, adamw (LibTorch) %.3g\n",
        fc.name.c_str(), q_diff, hf, torch_adamw);
    EXPECT_LT(q_diff, 1e-12);
    EXPECT_LT(hf, 1e-12);
    EXPECT_GT(torch_adamw, 1e-6);
  }
}

}  // namespace
}  // namespace gradlora
