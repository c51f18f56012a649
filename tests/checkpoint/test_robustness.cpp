// Merge-and-restart, non-finite gradients, bf16 weights, write-back drift and
// a corpus of malformed configs.
#include "ckpt_util.h"

#include <fmt/format.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace gradlora::ckpt_test {
namespace {

namespace fs = std::filesystem;

using ::gradlora::testing::seeded_randn;
using ::gradlora::testing::single_weight;

// Captures what spdlog's default logger writes while it lives.
class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)) {
    spdlog::default_logger()->sinks().push_back(sink_);
  }
  ~LogCapture() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

// ------------------------------------------------------ merge-and-restart

struct MergeRun {
  torch::Tensor W0, W;
  std::vector<torch::Tensor> history;  // W after each step
  bool continuous = true;
  std::string why;
  bool state_reset = true;
};

// 20 SGD-with-momentum steps on 0.5·‖W − T‖² (10×8, float64), rank 1.
MergeRun run_merge(const std::string& init, const std::string& writeback, int64_t merge_every) {
  MergeRun run;
  torch::Tensor W = seeded_randn({10, 8}, 1);
  const torch::Tensor T = seeded_randn({10, 8}, 2);
  run.W0 = W.clone();
  auto params = single_weight(W.set_requires_grad(true));
  const Config cfg = quiet(fmt::format(
      "optimizer:\n  type: sgd\n  lr: 0.05\n  momentum: 0.5\ntargets:\n  - match: w\n    method: lora\n    rank: 1\n"
      "    alpha: 2\n    init: {}\n    writeback: {}\n    merge_every: {}\n",
      init, writeback, merge_every));
  LowRankOptimizer opt(params, cfg);
  const double s = 2.0;
  for (int64_t t = 1; t <= 20; ++t) {
    auto [A, B] = opt.factors("w");
    const torch::Tensor A_before = A.clone(), B_before = B.clone(), W_before = W.detach().clone();
    W.mutable_grad() = (W.detach() - T).clone();
    opt.step();
    auto [A1, B1] = opt.factors("w");
    const bool restarted = merge_every > 0 && t % merge_every == 0;
    if (!restarted) {
      // Every change of W is exactly the change of s·A·B: nothing jumps, also
      // on the first step after a restart (whose "before" is the fresh factors).
      const torch::Tensor expected = W_before + s * (torch::mm(A1, B1) - torch::mm(A_before, B_before));
      const double err = (W.detach() - expected).abs().max().item<double>();
      if (err > 1e-13 * (1.0 + W_before.abs().max().item<double>())) {
        run.continuous = false;
        run.why += fmt::format("step {}: |dW - s*d(AB)| = {:.3g}; ", t, err);
      }
    } else if (opt.state_tensors("w").count("inner.0.momentum_buffer")) {
      run.state_reset = false;
    }
    run.history.push_back(W.detach().clone());
  }
  run.W = W.detach().clone();
  return run;
}

int64_t rank_of(const torch::Tensor& M) { return torch::linalg_matrix_rank(M).item<int64_t>(); }

TEST(MergeAndRestart, WeightIsContinuousAndTotalChangeExceedsRank) {
  for (const char* init : {"zero", "symmetric"}) {
    for (const char* wb : {"incremental", "exact"}) {
      SCOPED_TRACE(fmt::format("init {}, writeback {}", init, wb));
      const MergeRun merged = run_merge(init, wb, 5);
      const MergeRun plain = run_merge(init, wb, 0);
      EXPECT_TRUE(merged.continuous) << merged.why;
      EXPECT_TRUE(merged.state_reset) << "the inner state must be reset at a restart";
      // The restart itself does not move W: up to step 5 both runs are the same.
      for (int t = 0; t < 5; ++t) EXPECT_TRUE(torch::equal(merged.history[t], plain.history[t])) << "step " << t + 1;
      // One cycle changes W by s·(A·B − A0·B0): rank ≤ r = 1 (zero init) or ≤ 2r (symmetric).
      // Four cycles exceed that; without merges it holds.
      const int64_t one_cycle = std::string(init) == "zero" ? 1 : 2;
      EXPECT_LE(rank_of(plain.W - plain.W0), one_cycle);
      EXPECT_GT(rank_of(merged.W - merged.W0), one_cycle);
      EXPECT_GE(rank_of(merged.W - merged.W0), 4);
    }
  }
}

// ------------------------------------------------------- non-finite grads

std::map<std::string, torch::Tensor> clone_state(const LowRankOptimizer& opt, const std::string& name) {
  std::map<std::string, torch::Tensor> m;
  for (const auto& kv : opt.state_tensors(name)) m[kv.first] = kv.second.clone();
  return m;
}

bool same_state(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end() || !torch::equal(v, it->second)) return false;
  }
  return true;
}

const char* kNonFiniteYaml =
    "optimizer:\n  type: adam\n  lr: 0.01\ntargets:\n  - match: \"*.weight\"\n    method: lora\n    rank: 2\n"
    "  - match: \"*.bias\"\n    method: full\non_nonfinite: {}\n";

void backward_on(Net& net, int64_t i) {
  auto [x, y] = batch(i);
  torch::mse_loss(net->forward(x), y).backward();
}

TEST(NonFinite, SkipLeavesParameterFactorsAndStateUntouchedAndWarns) {
  for (const float bad : {std::nanf(""), INFINITY}) {
    SCOPED_TRACE(bad);
    Net net = make_net(1);
    LowRankOptimizer opt(net->named_parameters(), quiet(fmt::format(kNonFiniteYaml, "skip")));
    train(net, opt, 0, 2);
    const torch::Tensor w1 = net->fc(1)->weight.detach().clone(), b2 = net->fc(2)->bias.detach().clone();
    const torch::Tensor w2 = net->fc(2)->weight.detach().clone();
    const auto s1 = clone_state(opt, "fc1.weight"), sb2 = clone_state(opt, "fc2.bias");
    const auto [A, B] = opt.factors("fc1.weight");
    const torch::Tensor A0 = A.clone(), B0 = B.clone();
    const int64_t steps = opt.projector("fc1.weight").steps();

    opt.zero_grad();
    backward_on(net, 2);
    net->fc(1)->weight.mutable_grad()[3][4] = bad;
    net->fc(2)->bias.mutable_grad()[1] = bad;
    LogCapture log;
    opt.step();

    EXPECT_TRUE(torch::equal(net->fc(1)->weight, w1));
    EXPECT_TRUE(torch::equal(net->fc(2)->bias, b2));
    EXPECT_TRUE(torch::equal(opt.factors("fc1.weight").first, A0));
    EXPECT_TRUE(torch::equal(opt.factors("fc1.weight").second, B0));
    EXPECT_TRUE(same_state(s1, clone_state(opt, "fc1.weight")));
    EXPECT_TRUE(same_state(sb2, clone_state(opt, "fc2.bias")));
    EXPECT_EQ(opt.projector("fc1.weight").steps(), steps);
    EXPECT_EQ(opt.skipped_count(), 2);
    // The other parameters took their step.
    EXPECT_FALSE(torch::equal(net->fc(2)->weight, w2));
    const std::string text = log.text();
    EXPECT_NE(text.find("'fc1.weight'"), std::string::npos) << text;
    EXPECT_NE(text.find("'fc2.bias'"), std::string::npos) << text;
    EXPECT_NE(text.find("non-finite"), std::string::npos) << text;
    EXPECT_EQ(text.find("'fc2.weight'"), std::string::npos) << text;

    // Training goes on normally with finite gradients.
    train(net, opt, 3, 4);
    EXPECT_FALSE(torch::equal(net->fc(1)->weight, w1));
    EXPECT_TRUE(torch::isfinite(net->fc(1)->weight).all().item<bool>());
  }
}

// A gradient with more than 2^20 elements takes the library's check, a small double one the
// host check's double form: a NaN in either skips the step, and a finite one steps.
TEST(NonFinite, LargeAndDoubleGradientsAreCheckedToo) {
  const std::vector<std::pair<int64_t, torch::Dtype>> cases = {{1025, torch::kFloat}, {8, torch::kDouble}};
  for (const auto& [rows, dtype] : cases) {
    SCOPED_TRACE(rows);
    torch::Tensor w = torch::zeros({rows, 1024}, torch::TensorOptions().dtype(dtype)).requires_grad_(true);
    torch::OrderedDict<std::string, torch::Tensor> params;
    params.insert("w", w);
    LowRankOptimizer opt(params, quiet("optimizer:\n  type: adam\n  lr: 0.01\ntargets:\n  - match: w\n"
                                       "    method: full\non_nonfinite: skip\n"));
    w.mutable_grad() = torch::ones_like(w);
    w.mutable_grad()[rows - 1][5] = std::nan("");
    opt.step();
    EXPECT_TRUE(torch::equal(w, torch::zeros_like(w)));
    EXPECT_EQ(opt.skipped_count(), 1);
    w.mutable_grad() = torch::ones_like(w);
    opt.step();
    EXPECT_FALSE(torch::equal(w, torch::zeros_like(w)));
    EXPECT_EQ(opt.skipped_count(), 1);
  }
}

TEST(NonFinite, ErrorThrowsNamingTheParameterAndChangesNothing) {
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(fmt::format(kNonFiniteYaml, "error")));
  train(net, opt, 0, 2);
  const auto before = snapshot(opt, *net);
  opt.zero_grad();
  backward_on(net, 2);
  net->fc(2)->weight.mutable_grad()[0][0] = INFINITY;
  try {
    opt.step();
    ADD_FAILURE() << "expected an exception";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'fc2.weight'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("on_nonfinite: error"), std::string::npos) << msg;
  }
  const auto after = snapshot(opt, *net);
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    ASSERT_EQ(before[i].first, after[i].first);
    if (before[i].first == "step_count") continue;  // step() counts the call; all else is as it was
    EXPECT_TRUE(torch::equal(before[i].second, after[i].second)) << before[i].first;
  }
  const torch::Tensor w2 = net->fc(2)->weight.detach().clone();
  train(net, opt, 3, 4);
  EXPECT_FALSE(torch::equal(net->fc(2)->weight, w2));
}

// ---------------------------------------------------------------- bf16

struct Bf16Run {
  torch::Tensor W0, W;
  double max_step = 0;  // largest change of one element in one step
};

// 1000 small SGD steps of rank-4 lora on a 64×48 matrix with a fixed gradient
// stream (rounded to bf16, so both precisions see the same numbers).
Bf16Run run_small_steps(torch::ScalarType dtype, const std::string& writeback) {
  const torch::Tensor init = seeded_randn({64, 48}, 11).mul_(0.5).to(torch::kBFloat16);
  torch::Tensor W = init.to(dtype);
  auto params = single_weight(W.set_requires_grad(true));
  const Config cfg =
      quiet(fmt::format("optimizer:\n  type: sgd\n  lr: 1.0e-3\ntargets:\n  - match: w\n    method: lora\n    rank: 4\n"
                        "    writeback: {}\n",
                        writeback));
  LowRankOptimizer opt(params, cfg);
  const torch::Tensor G0 = seeded_randn({64, 48}, 12).mul_(0.1);
  Bf16Run run{W.detach().to(torch::kFloat).clone(), {}};
  for (int64_t t = 0; t < 1000; ++t) {
    const torch::Tensor g = (G0 + seeded_randn({64, 48}, 100 + t).mul_(0.03)).to(torch::kBFloat16);
    W.mutable_grad() = g.to(dtype);
    const torch::Tensor before = W.detach().to(torch::kFloat).clone();  // .to() of a float tensor aliases it
    opt.step();
    run.max_step = std::max(run.max_step, (W.detach().to(torch::kFloat) - before).abs().max().item<double>());
  }
  run.W = W.detach().to(torch::kFloat);
  return run;
}

TEST(LowPrecision, Bf16WeightsFollowTheFp32ReferenceWithinBf16Resolution) {
  const Bf16Run ref = run_small_steps(torch::kFloat, "auto");
  const Bf16Run bf = run_small_steps(torch::kBFloat16, "auto");  // exact write-back by default
  ASSERT_TRUE(torch::equal(ref.W0, bf.W0));
  // Half a bf16 ulp of the value (8 significant bits), plus fp32 round-off of the reference.
  const torch::Tensor bound = ref.W.abs() * std::ldexp(1.0, -8) + 1e-5;
  const torch::Tensor err = (bf.W - ref.W).abs();
  EXPECT_TRUE((err <= bound).all().item<bool>()) << "max excess " << (err - bound).max().item<double>();
  // The steps are far below bf16 resolution (~4e-3 near 1) one by one, yet add up to many ulps.
  const double change = (ref.W - ref.W0).abs().max().item<double>();
  std::printf("bf16: max change %.3g over 1000 steps, at most %.3g per step (bf16 spacing in [0.5, 1): %.3g)\n", change,
              ref.max_step, std::ldexp(1.0, -8));
  EXPECT_GT(change, 0.02);
  EXPECT_LT(ref.max_step, std::ldexp(1.0, -10));
  // Incremental write-back into bf16 loses them: the same bound fails there.
  const Bf16Run inc = run_small_steps(torch::kBFloat16, "incremental");
  EXPECT_FALSE(((inc.W - ref.W).abs() <= bound).all().item<bool>());
}

// --------------------------------------------------------------- drift

// Incremental vs exact write-back over 10,000 fp32 Adam steps on a 32×16 matrix
// (noisy gradients of 0.5·‖W − T‖²): each is compared with P0 + s·A·B evaluated
// in float64 from its own fp32 factors. The figures are printed
// (docs/checkpoints.md quotes them).
TEST(Drift, IncrementalWriteBackStaysCloseToExactOver10000Steps) {
  torch::Tensor Wi = seeded_randn({32, 16}, 21, torch::kFloat), We = Wi.clone();
  const torch::Tensor P0 = Wi.to(torch::kDouble);
  const torch::Tensor T = seeded_randn({32, 16}, 22, torch::kFloat);
  torch::OrderedDict<std::string, torch::Tensor> params;
  params.insert("inc", Wi.set_requires_grad(true));
  params.insert("exact", We.set_requires_grad(true));
  const Config cfg = quiet(
      "optimizer:\n  type: adam\n  lr: 1.0e-3\ntargets:\n  - match: inc\n    method: lora\n"
      "    rank: 4\n    writeback: incremental\n  - match: exact\n    method: lora\n    rank: 4\n"
      "    writeback: exact\n");
  LowRankOptimizer opt(params, cfg);
  auto gen = at::detail::createCPUGenerator(23);
  for (int64_t t = 0; t < 10000; ++t) {
    const torch::Tensor noise = 0.3 * at::randn({32, 16}, gen, torch::TensorOptions().dtype(torch::kFloat));
    Wi.mutable_grad() = Wi.detach() - T + noise;
    We.mutable_grad() = We.detach() - T + noise;
    opt.step();
  }
  auto ideal = [&](const std::string& name) {
    auto [A, B] = opt.factors(name);
    return P0 + torch::mm(A.to(torch::kDouble), B.to(torch::kDouble));  // s = 1, zero init: A0 = 0
  };
  const torch::Tensor Ii = ideal("inc"), Ie = ideal("exact");
  const double change = (Ii - P0).abs().max().item<double>();
  const double wmax = Ii.abs().max().item<double>();
  const double drift_inc = (Wi.detach().to(torch::kDouble) - Ii).abs().max().item<double>();
  const double drift_exact = (We.detach().to(torch::kDouble) - Ie).abs().max().item<double>();
  const double ulp = wmax * std::ldexp(1.0, -23);  // fp32 spacing at max|W| (upper bound)
  std::printf(
      "drift after 10000 fp32 Adam steps (32x16, rank 4, lr 1e-3): max|W-W0| = %.4g, max|W| = %.4g (ulp %.3g)\n"
      "  incremental: max|W - (P0 + s*A*B)| = %.3g (%.3g ulp, %.3g of max|W-W0|)\n"
      "  exact:       max|W - (P0 + s*A*B)| = %.3g (%.3g ulp)\n",
      change, wmax, ulp, drift_inc, drift_inc / ulp, drift_inc / change, drift_exact, drift_exact / ulp);
  EXPECT_GT(change, 0.5);  // the factors moved a lot: the drift figure means something
  // exact: a few roundings of the fp32 evaluation of P0 + s·A·B, no accumulation.
  EXPECT_LE(drift_exact, 4 * ulp);
  // incremental: 10,000 rounding errors add up, but stay small.
  EXPECT_LE(drift_inc, 5e-5 * change);
}

// ------------------------------------------------------- malformed configs

// Every file in tests/data/bad_configs/ is rejected with gradlora::ConfigError,
// by the YAML loader or when the optimizer is built over a small MLP. Its first
// lines `# expect: <text>` list fragments the message must contain.
TEST(BadConfigs, EachIsRejectedWithAClearConfigError) {
  const fs::path dir = fs::path(GRADLORA_SOURCE_DIR) / "tests" / "data" / "bad_configs";
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".yaml") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  ASSERT_GE(files.size(), 30u);
  for (const auto& f : files) {
    SCOPED_TRACE(f.filename().string());
    std::ifstream in(f);
    std::vector<std::string> expect;
    for (std::string line; std::getline(in, line) && line.rfind("# expect: ", 0) == 0;) {
      expect.push_back(line.substr(10));
    }
    ASSERT_FALSE(expect.empty()) << "the file names no expected fragment";
    std::string msg;
    bool thrown = false;
    try {
      Config cfg = Config::from_yaml_file(f.string());
      cfg.log_report = false;
      Net net = make_net(1);
      LowRankOptimizer opt(net->named_parameters(), cfg);
    } catch (const ConfigError& e) {
      thrown = true;
      msg = e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a ConfigError: " << e.what();
      continue;
    }
    ASSERT_TRUE(thrown) << "accepted";
    for (const auto& x : expect) EXPECT_NE(msg.find(x), std::string::npos) << "'" << x << "' not in: " << msg;
    EXPECT_NE(msg.find("config"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace gradlora::ckpt_test
