// Data-parallel training over Gloo on loopback: two ranks on half-batches equal one
// process on the full batch; a parameter unused on some or all ranks; bytes on the
// wire; config mismatch and dead peers fail on every rank within a timeout; the
// launcher propagates failures.
//
// Each test forks its ranks with gradlora::launch_local; the ranks write what they
// computed into a temporary directory and the test compares it in the parent.
#include <fmt/format.h>
#include <gradlora/distributed.h>
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.h"  // the shared test model

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

using namespace gradlora;
namespace fs = std::filesystem;

namespace {

constexpr int kWorld = 2;
constexpr int kSteps = 10;
constexpr int64_t kBatch = 8;  // full batch; each rank takes kBatch / kWorld rows
constexpr int64_t kIn = 12, kHidden = 10, kOut = 6;

/// Launcher limits that keep a broken test from hanging CI.
LaunchOptions bounded() {
  LaunchOptions o;
  o.grace = std::chrono::seconds(2);
  o.job_timeout = std::chrono::seconds(120);
  return o;
}

struct TempDir {
  TempDir() {
    std::string t = (fs::temp_directory_path() / "gradlora-dist-test-XXXXXX").string();
    if (!mkdtemp(t.data())) throw std::runtime_error("mkdtemp failed");
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  fs::path path;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

using ::gradlora::testing::Mlp;

/// The three-layer kIn → kHidden → kHidden → kOut MLP, initialised from `seed`: ranks use
/// different seeds on purpose, so that only the broadcast from rank 0 can make them agree
/// with the reference.
Mlp make_model(uint64_t seed, torch::ScalarType dtype) {
  return ::gradlora::testing::make_mlp({kIn, kHidden, kHidden, kOut}, seed, dtype);
}

/// Batch of step k (the full batch; identical in every process).
std::pair<torch::Tensor, torch::Tensor> full_batch(int k, torch::ScalarType dtype) {
  auto gen = at::detail::createCPUGenerator(5000 + k);
  auto o = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor x = at::randn({kBatch, kIn}, gen, o);
  torch::Tensor y = at::randn({kBatch, kOut}, gen, o);
  return {x.to(dtype), y.to(dtype)};
}

Config config_for(const std::string& weight_method, int64_t rank, const std::string& inner) {
  std::string yaml;
  if (weight_method == "mixed") {
    yaml = "seed: 3\noptimizer: " + inner +
           "\ntargets:\n"
           "  - {match: fc1.weight, method: lora, rank: 3, alpha: 6, init: symmetric}\n"
           "  - {match: fc2.weight, method: random, rank: 2}\n"
           "  - {match: fc3.weight, method: additive, rank: 4}\n"
           "  - {match: '*.bias', method: full}\n";
  } else {
    yaml = "seed: 3\noptimizer: " + inner + "\ntargets:\n  - {match: '*.weight', method: " + weight_method +
           (weight_method == "full" ? "" : ", rank: " + std::to_string(rank)) +
           "}\n  - {match: '*.bias', method: full}\n";
  }
  return ::gradlora::testing::quiet(yaml);
}

const char* kSgd = "{type: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.01}";
const char* kAdamW = "{type: adamw, lr: 0.02, weight_decay: 0.1}";

/// Trains for kSteps on rows [begin, end) of every batch; returns the parameters.
std::vector<torch::Tensor> train(Mlp& model, LowRankOptimizer& opt, int64_t begin, int64_t end, torch::ScalarType dtype,
                                 int steps = kSteps) {
  for (int k = 0; k < steps; ++k) {
    auto [x, y] = full_batch(k, dtype);
    opt.zero_grad();
    // A mean over this rank's rows: the average over ranks is the full-batch mean.
    torch::Tensor loss = torch::mse_loss(model->forward(x.slice(0, begin, end)), y.slice(0, begin, end));
    loss.backward();
    opt.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.detach().clone());
  return out;
}

/// What one rank of the equivalence test does; exit status 0 when it ran.
int equivalence_rank(int rank, int world, const std::string& method, const std::string& inner, torch::ScalarType dtype,
                     int64_t bucket_bytes, const std::string& out_dir) {
  auto pg = process_group_from_env(std::chrono::seconds(30));
  Mlp model = make_model(100 + static_cast<uint64_t>(rank), dtype);
  LowRankOptimizer opt(model->named_parameters(), config_for(method, 2, inner));
  DataParallelOptions o;
  o.bucket_bytes = bucket_bytes;
  o.timeout = std::chrono::seconds(30);
  DataParallel dp(opt, pg, o);
  const int64_t per_rank = kBatch / world;
  std::vector<torch::Tensor> params = train(model, opt, rank * per_rank, (rank + 1) * per_rank, dtype);
  torch::save(params, out_dir + "/rank" + std::to_string(rank) + ".pt");
  write_text(out_dir + "/stats" + std::to_string(rank) + ".txt",
             std::to_string(dp.stats().steps) + " " + std::to_string(dp.stats().last_step_collectives));
  return 0;
}

struct EquivalenceCase {
  std::string method;
  std::string inner;
  torch::ScalarType dtype;
  int64_t bucket_bytes;
  double tol;
};

void check_equivalence(const EquivalenceCase& c) {
  TempDir dir;
  const int rc = launch_local(
      kWorld,
      [&](int rank, int world) {
        return equivalence_rank(rank, world, c.method, c.inner, c.dtype, c.bucket_bytes, dir.path.string());
      },
      bounded());
  ASSERT_EQ(rc, 0) << "a rank failed (see its stderr above)";

  // Reference: one process, the full batch, no communication, rank 0's initial model.
  Mlp model = make_model(100, c.dtype);
  LowRankOptimizer opt(model->named_parameters(), config_for(c.method, 2, c.inner));
  std::vector<torch::Tensor> ref = train(model, opt, 0, kBatch, c.dtype);

  std::vector<torch::Tensor> init;
  for (const auto& p : make_model(100, c.dtype)->parameters()) init.push_back(p.detach().clone());
  for (int r = 0; r < kWorld; ++r) {
    std::vector<torch::Tensor> got;
    torch::load(got, dir.file("rank" + std::to_string(r) + ".pt"));
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      const double diff = (got[i].to(torch::kDouble) - ref[i].to(torch::kDouble)).abs().max().item<double>();
      EXPECT_LE(diff, c.tol) << c.method << ": rank " << r << ", parameter " << i;
    }
    std::istringstream stats(read_text(dir.file("stats" + std::to_string(r) + ".txt")));
    int64_t steps = 0, calls = 0;
    stats >> steps >> calls;
    EXPECT_EQ(steps, kSteps) << "the reducer must run once per step";
    EXPECT_GE(calls, 1);
  }
  // The comparison has teeth: training moved the parameters well beyond the tolerance.
  double moved = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    moved = std::max(moved, (ref[i].to(torch::kDouble) - init[i].to(torch::kDouble)).abs().max().item<double>());
  }
  EXPECT_GT(moved, 1e3 * c.tol);
}

class Equivalence : public ::testing::TestWithParam<std::string> {};

TEST_P(Equivalence, TwoRanksOnHalfBatchesEqualOneProcessOnFullBatch) {
  check_equivalence({GetParam(), kSgd, torch::kFloat, int64_t{25} << 20, 1e-5});
}

INSTANTIATE_TEST_SUITE_P(Methods, Equivalence, ::testing::Values("lora", "random", "additive", "hadamard", "full"),
                         [](const auto& info) { return info.param; });

TEST(Distributed, MixedMethodsWithAdamWInDoubleAndSmallBuckets) {
  // One method per layer, AdamW, float64, and 96-byte buckets (many all-reduce calls).
  check_equivalence({"mixed", kAdamW, torch::kDouble, 96, 1e-10});
}

TEST(Distributed, BytesPerStepAreTheLowRankPayload) {
  TempDir dir;
  const int rc = launch_local(
      kWorld,
      [&](int rank, int world) {
        auto pg = process_group_from_env(std::chrono::seconds(30));
        Mlp model = make_model(7, torch::kFloat);
        LowRankOptimizer opt(model->named_parameters(), config_for("lora", 4, kSgd));
        DataParallel dp(opt, pg);
        auto [x, y] = full_batch(0, torch::kFloat);
        const int64_t per = kBatch / world;
        opt.zero_grad();
        torch::mse_loss(model->forward(x.slice(0, rank * per, (rank + 1) * per)),
                        y.slice(0, rank * per, (rank + 1) * per))
            .backward();
        opt.step();
        write_text(dir.file("bytes" + std::to_string(rank) + ".txt"),
                   std::to_string(dp.stats().last_step_bytes) + " " + std::to_string(dp.stats().total_bytes) + " " +
                       std::to_string(dp.expected_step_bytes()) + " " +
                       std::to_string(dp.stats().last_step_collectives) + " " +
                       std::to_string(opt.report().total_allreduce_bytes));
        return 0;
      },
      bounded());
  ASSERT_EQ(rc, 0);
  // 4·r·(n+m) per lora matrix (float32 factors gA n×r, gB r×m) plus the full biases.
  const int64_t r = 4;
  const int64_t lora = 4 * r * ((kHidden + kIn) + (kHidden + kHidden) + (kOut + kHidden));
  const int64_t biases = 4 * (kHidden + kHidden + kOut);
  const int64_t full_gradients = 4 * (kHidden * kIn + kHidden * kHidden + kOut * kHidden) + biases;
  const int64_t flags = 4 * 6;  // one float32 presence flag per parameter (3 weights, 3 biases)
  for (int rk = 0; rk < kWorld; ++rk) {
    std::istringstream in(read_text(dir.file("bytes" + std::to_string(rk) + ".txt")));
    int64_t last = -1, total = -1, expected = -1, calls = -1, report = -1;
    in >> last >> total >> expected >> calls >> report;
    EXPECT_EQ(last, lora + biases + flags) << "rank " << rk;
    EXPECT_EQ(total, lora + biases + flags) << "rank " << rk;
    EXPECT_EQ(expected, report + flags) << "the selection report must agree with what is sent";
    EXPECT_EQ(report, lora + biases);
    EXPECT_EQ(calls, 1) << "one float32 bucket, the flags included";
    EXPECT_LT(last, full_gradients);
  }
}

// ------------------------------------------------- unused parameters

/// The model of make_model with a side branch `extra` (kHidden -> kOut) that a forward pass
/// takes or not, in double.
Mlp make_branch_net(uint64_t seed) {
  return ::gradlora::testing::make_mlp({kIn, kHidden, kHidden, kOut}, seed, torch::kDouble, torch::kCPU,
                                       /*side_branch=*/true);
}

/// Which ranks take the branch at step k.
enum class Schedule {
  one_rank,  // rank 0 at k % 4 != 3, rank 1 only at k % 4 == 1: one rank, both, neither
  no_rank,   // never
};
bool takes_branch(Schedule s, int rank, int k) {
  if (s == Schedule::no_rank) return false;
  return rank == 0 ? k % 4 != 3 : k % 4 == 1;
}

/// One method per layer; `extra.weight` gets `x_method`; SGD with momentum and weight
/// decay, whose update is linear in the gradient (a wrong average shows) and changes a
/// parameter even for a zero gradient (a wrong step shows).
Config branch_config(const std::string& x_method, bool fused) {
  std::string yaml = std::string("seed: 3\noptimizer: ") + kSgd +
                     "\ntargets:\n"
                     "  - {match: fc1.weight, method: lora, rank: 3, alpha: 6, init: symmetric}\n"
                     "  - {match: fc2.weight, method: random, rank: 2}\n"
                     "  - {match: fc3.weight, method: additive, rank: 4}\n"
                     "  - {match: extra.weight, method: " +
                     x_method + (x_method == "full" ? "" : ", rank: 2") +
                     "}\n"
                     "  - {match: '*.bias', method: full}\n";
  if (fused) yaml += "fuse_into_backward: true\n";
  return ::gradlora::testing::quiet(yaml);
}

std::vector<torch::Tensor> params_of(const Mlp& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// The reference, in one process and without any reducer: at every step compute both
/// ranks' gradients (rank r on its half of the batch, taking the branch as the schedule
/// says), average them by hand with a zero for a rank that has none, and step on that.
/// A parameter neither rank has a gradient for keeps an undefined .grad. With
/// `mean_over_present` the average is instead taken over the ranks that have a
/// gradient only: the wrong formula the test must be able to tell apart.
std::vector<torch::Tensor> reference_run(const std::string& x_method, Schedule sched, bool mean_over_present) {
  Mlp model = make_branch_net(100);
  LowRankOptimizer opt(model->named_parameters(), branch_config(x_method, false));
  const int64_t per = kBatch / kWorld;
  const auto params = model->parameters();
  for (int k = 0; k < kSteps; ++k) {
    auto [x, y] = full_batch(k, torch::kDouble);
    std::vector<torch::Tensor> sum(params.size());
    std::vector<int> count(params.size(), 0);
    for (int r = 0; r < kWorld; ++r) {
      model->zero_grad(/*set_to_none=*/true);
      torch::mse_loss(model->forward(x.slice(0, r * per, (r + 1) * per), takes_branch(sched, r, k)),
                      y.slice(0, r * per, (r + 1) * per))
          .backward();
      for (size_t i = 0; i < params.size(); ++i) {
        const torch::Tensor g = params[i].grad();
        if (!g.defined()) continue;
        sum[i] = sum[i].defined() ? sum[i] + g : g.clone();
        ++count[i];
      }
    }
    model->zero_grad(/*set_to_none=*/true);
    for (size_t i = 0; i < params.size(); ++i) {
      if (count[i] == 0) continue;
      params[i].mutable_grad() = sum[i] / static_cast<double>(mean_over_present ? count[i] : kWorld);
    }
    opt.step();
  }
  return params_of(model);
}

/// What one rank of the unused-parameter tests writes: its final parameters, the
/// state of extra.weight before and after training, and per step the bytes sent.
int branch_rank(int rank, const std::string& x_method, bool fused, Schedule sched, const std::string& out_dir) {
  auto pg = process_group_from_env(std::chrono::seconds(30));
  Mlp model = make_branch_net(100 + static_cast<uint64_t>(rank));
  LowRankOptimizer opt(model->named_parameters(), branch_config(x_method, fused));
  DataParallelOptions o;
  o.timeout = std::chrono::seconds(30);
  o.bucket_bytes = 512;  // several buckets, so that a layout difference would shift many tensors
  DataParallel dp(opt, pg, o);
  const std::string tag = std::to_string(rank);
  std::vector<torch::Tensor> before;
  for (const auto& kv : opt.state_tensors("extra.weight")) before.push_back(kv.second.clone());
  const int64_t state_before = static_cast<int64_t>(opt.state_tensors("extra.weight").size());
  const int64_t per = kBatch / kWorld;
  std::string log;
  for (int k = 0; k < kSteps; ++k) {
    auto [x, y] = full_batch(k, torch::kDouble);
    model->zero_grad(/*set_to_none=*/true);
    torch::mse_loss(model->forward(x.slice(0, rank * per, (rank + 1) * per), takes_branch(sched, rank, k)),
                    y.slice(0, rank * per, (rank + 1) * per))
        .backward();
    opt.step();
    log += std::to_string(dp.stats().last_step_bytes) + " " + std::to_string(dp.stats().last_step_collectives) + " " +
           (model->extra->weight.grad().defined() ? "grad" : "nograd") + "\n";
  }
  torch::save(params_of(model), out_dir + "/rank" + tag + ".pt");
  std::vector<torch::Tensor> after;
  for (const auto& kv : opt.state_tensors("extra.weight")) after.push_back(kv.second.clone());
  torch::save(before, out_dir + "/before" + tag + ".pt");
  torch::save(after, out_dir + "/after" + tag + ".pt");
  write_text(out_dir + "/steps" + tag + ".txt", log);
  write_text(out_dir + "/summary" + tag + ".txt",
             std::to_string(dp.expected_step_bytes()) + " " + std::to_string(dp.flag_bytes()) + " " +
                 std::to_string(opt.report().total_allreduce_bytes) + " " +
                 std::to_string(opt.projector("extra.weight").steps()) + " " + std::to_string(state_before) + " " +
                 std::to_string(opt.state_tensors("extra.weight").size()));
  return 0;
}

struct BranchCase {
  std::string x_method;
  bool fused;
};
void PrintTo(const BranchCase& c, std::ostream* os) { *os << c.x_method << (c.fused ? ", fused" : ", unfused"); }
std::string branch_case_name(const ::testing::TestParamInfo<BranchCase>& info) {
  return info.param.x_method + (info.param.fused ? "_fused" : "_unfused");
}
std::vector<BranchCase> branch_cases() {
  std::vector<BranchCase> v;
  for (const char* m : {"lora", "random", "additive", "hadamard", "full"}) {
    for (bool f : {false, true}) v.push_back({m, f});
  }
  return v;
}

struct BranchRun {
  std::vector<std::vector<torch::Tensor>> params, before, after;
  std::vector<std::string> steps;
  std::vector<std::vector<int64_t>> summary;  // expected, flag bytes, report bytes, extra steps, state sizes
};

BranchRun run_branch(const BranchCase& c, Schedule sched) {
  TempDir dir;
  const int rc = launch_local(
      kWorld, [&](int rank, int) { return branch_rank(rank, c.x_method, c.fused, sched, dir.path.string()); },
      bounded());
  EXPECT_EQ(rc, 0) << "a rank failed (see its stderr above)";
  BranchRun out;
  if (rc != 0) return out;
  for (int r = 0; r < kWorld; ++r) {
    const std::string tag = std::to_string(r);
    std::vector<torch::Tensor> p, b, a;
    torch::load(p, dir.file("rank" + tag + ".pt"));
    torch::load(b, dir.file("before" + tag + ".pt"));
    torch::load(a, dir.file("after" + tag + ".pt"));
    out.params.push_back(p);
    out.before.push_back(b);
    out.after.push_back(a);
    out.steps.push_back(read_text(dir.file("steps" + tag + ".txt")));
    std::istringstream in(read_text(dir.file("summary" + tag + ".txt")));
    std::vector<int64_t> v(6, -1);
    for (auto& x : v) in >> x;
    out.summary.push_back(v);
  }
  return out;
}

/// Every step sent the same bytes in the same number of calls on both ranks, whichever
/// gradients each had.
void expect_fixed_layout(const BranchRun& run) {
  std::vector<std::vector<int64_t>> calls_per_rank;
  for (int r = 0; r < kWorld; ++r) {
    const int64_t expected = run.summary[r][0], flags = run.summary[r][1], report = run.summary[r][2];
    EXPECT_EQ(flags, 8 * 8) << "one float64 flag per non-frozen parameter (8)";
    EXPECT_EQ(expected, report + flags);
    std::istringstream in(run.steps[r]);
    int64_t bytes = 0, calls = 0;
    std::string grad;
    std::vector<int64_t> c;
    while (in >> bytes >> calls >> grad) {
      EXPECT_EQ(bytes, expected) << "rank " << r << ", step " << c.size();
      c.push_back(calls);
    }
    EXPECT_EQ(c.size(), static_cast<size_t>(kSteps));
    EXPECT_EQ(c, std::vector<int64_t>(c.size(), c.empty() ? 0 : c.front())) << "rank " << r;
    calls_per_rank.push_back(c);
  }
  EXPECT_EQ(calls_per_rank[1], calls_per_rank[0]) << "the ranks must issue the same all-reduce calls";
}

class UnusedParameter : public ::testing::TestWithParam<BranchCase> {};

TEST_P(UnusedParameter, UsedOnOneRankStepsOnTheAverageWithZeros) {
  const BranchCase c = GetParam();
  const BranchRun run = run_branch(c, Schedule::one_rank);
  ASSERT_EQ(run.params.size(), static_cast<size_t>(kWorld));
  const std::vector<torch::Tensor> ref = reference_run(c.x_method, Schedule::one_rank, false);
  const std::vector<torch::Tensor> wrong = reference_run(c.x_method, Schedule::one_rank, true);
  const std::vector<torch::Tensor> init = params_of(make_branch_net(100));
  const double tol = 1e-10;
  const size_t x = 6;  // extra.weight in parameters(): fc1.w, fc1.b, fc2.w, fc2.b, fc3.w, fc3.b, extra.w, extra.b
  ASSERT_EQ(ref.size(), 8u);
  ASSERT_TRUE(ref[x].sizes() == at::IntArrayRef({kOut, kHidden}));
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_EQ(run.params[r].size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_LE(max_diff(run.params[r][i], ref[i]), tol) << "rank " << r << ", parameter " << i;
    }
    // extra.weight and extra.bias: the mean over the ranks that had a gradient is another result.
    EXPECT_GT(max_diff(run.params[r][x], wrong[x]), 1e3 * tol) << "rank " << r;
    EXPECT_GT(max_diff(run.params[r][x + 1], wrong[x + 1]), 1e3 * tol) << "rank " << r;
  }
  EXPECT_GT(max_diff(ref[x], init[x]), 1e3 * tol) << "extra.weight must have trained";
  // It stepped at the 8 of 10 steps where some rank took the branch (not at k = 3, 7).
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(run.summary[r][3], 8) << "rank " << r;
  expect_fixed_layout(run);
}

TEST_P(UnusedParameter, UsedOnNoRankIsSkippedAndItsStateUntouched) {
  const BranchCase c = GetParam();
  const BranchRun run = run_branch(c, Schedule::no_rank);
  ASSERT_EQ(run.params.size(), static_cast<size_t>(kWorld));
  const std::vector<torch::Tensor> ref = reference_run(c.x_method, Schedule::no_rank, false);
  const std::vector<torch::Tensor> init = params_of(make_branch_net(100));
  const size_t x = 6;
  for (int r = 0; r < kWorld; ++r) {
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_LE(max_diff(run.params[r][i], ref[i]), 1e-10) << "rank " << r << ", parameter " << i;
    }
    // Bit-identical to rank 0's initial values (the broadcast), as a single process leaves them.
    EXPECT_TRUE(torch::equal(run.params[r][x], init[x])) << "rank " << r << ": extra.weight changed";
    EXPECT_TRUE(torch::equal(run.params[r][x + 1], init[x + 1])) << "rank " << r << ": extra.bias changed";
    EXPECT_TRUE(torch::equal(ref[x], init[x]));
    EXPECT_EQ(run.summary[r][3], 0) << "rank " << r << ": extra.weight must not count a step";
    EXPECT_EQ(run.summary[r][4], run.summary[r][5]) << "rank " << r << ": extra.weight gained state";
    ASSERT_EQ(run.before[r].size(), run.after[r].size());
    for (size_t i = 0; i < run.before[r].size(); ++i) {
      EXPECT_TRUE(torch::equal(run.before[r][i], run.after[r][i])) << "rank " << r << ", state tensor " << i;
    }
    EXPECT_EQ(run.steps[r].find(" grad\n"), std::string::npos) << "no gradient may be left behind:\n" << run.steps[r];
  }
  EXPECT_GT(max_diff(ref[0], init[0]), 1e-6) << "the other parameters trained";
  expect_fixed_layout(run);
}

INSTANTIATE_TEST_SUITE_P(Methods, UnusedParameter, ::testing::ValuesIn(branch_cases()), branch_case_name);

TEST(Distributed, DifferentConfigFailsOnEveryRankNamingTheKey) {
  TempDir dir;
  const int rc = launch_local(
      kWorld,
      [&](int rank, int) {
        auto pg = process_group_from_env(std::chrono::seconds(30));
        Mlp model = make_model(7, torch::kFloat);
        LowRankOptimizer opt(model->named_parameters(), config_for("lora", rank == 0 ? 2 : 4, kSgd));
        DataParallelOptions o;
        o.timeout = std::chrono::seconds(20);
        try {
          DataParallel dp(opt, pg, o);
        } catch (const DistributedError& e) {
          write_text(dir.file("error" + std::to_string(rank) + ".txt"), e.what());
          return 0;
        }
        return 3;  // no error: the check let a mismatch through
      },
      bounded());
  ASSERT_EQ(rc, 0) << "every rank must raise DistributedError";
  for (int rk = 0; rk < kWorld; ++rk) {
    const std::string msg = read_text(dir.file("error" + std::to_string(rk) + ".txt"));
    EXPECT_NE(msg.find("do not run the same optimizer config"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'targets[0].rank' (rank 0: 2, rank 1: 4)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("parameter 'fc1.weight'"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("within"), std::string::npos) << "a mismatch must not surface as a timeout: " << msg;
  }
}

// galore with projector: randomized under data parallel: at each refresh the ranks
// average their sketches of the gradient (every product with G of the range finder),
// which are the sketches of the averaged gradient, so every rank finds the projector
// one process finds from the full batch. 20 steps, a refresh every 8: 3 refreshes.
constexpr int kGaloreSteps = 20, kGap = 8, kOversample = 2, kPower = 1;
const char* kGaloreYaml =
    "seed: 3\noptimizer: {type: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.01}\ntargets:\n"
    "  - {match: '*.weight', method: galore, rank: 2, projector: randomized, oversample: 2, power_iters: 1, "
    "update_proj_gap: 8, scale: 1.0}\n"
    "  - {match: '*.bias', method: full}\n";

TEST(Distributed, GaloreRandomizedTwoRanksOnHalfBatchesEqualOneProcessOnFullBatch) {
  TempDir dir;
  const int rc = launch_local(
      kWorld,
      [&](int rank, int world) {
        auto pg = process_group_from_env(std::chrono::seconds(30));
        Mlp model = make_model(100 + static_cast<uint64_t>(rank), torch::kFloat);
        LowRankOptimizer opt(model->named_parameters(), ::gradlora::testing::quiet(kGaloreYaml));
        DataParallel dp(opt, pg);
        const int64_t per_rank = kBatch / world;
        std::vector<torch::Tensor> params =
            train(model, opt, rank * per_rank, (rank + 1) * per_rank, torch::kFloat, kGaloreSteps);
        torch::save(params, dir.file("rank" + std::to_string(rank) + ".pt"));
        int64_t full_bytes = 0;  // what DDP would all-reduce per step
        for (const auto& p : model->parameters()) full_bytes += p.numel() * static_cast<int64_t>(p.element_size());
        write_text(dir.file("stats" + std::to_string(rank) + ".txt"),
                   fmt::format("{} {} {} {}", dp.stats().projector_collectives, dp.stats().projector_bytes,
                               dp.stats().last_step_bytes, full_bytes));
        return 0;
      },
      bounded());
  ASSERT_EQ(rc, 0) << "a rank failed (see its stderr above)";
  Mlp model = make_model(100, torch::kFloat);
  LowRankOptimizer opt(model->named_parameters(), ::gradlora::testing::quiet(kGaloreYaml));
  const std::vector<torch::Tensor> ref = train(model, opt, 0, kBatch, torch::kFloat, kGaloreSteps);
  std::vector<torch::Tensor> init;
  for (const auto& p : make_model(100, torch::kFloat)->parameters()) init.push_back(p.detach().clone());
  double moved = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) moved = std::max(moved, (ref[i] - init[i]).abs().max().item<double>());
  EXPECT_GT(moved, 1e-1) << "the comparison must have teeth";
  // Sketch bytes per refresh: for each weight (h×w on the projector's side, k = r +
  // oversample columns) Y = H·Ω (h·k), per power iteration Hᵀ·Y (w·k) and H·Z (h·k), and
  // the final Yᵀ·H (k·w). fc1 10×12 (left: h 10), fc2 10×10 (right: h 10), fc3 6×10 (left: h 6).
  const int64_t k = 2 + kOversample;
  int64_t per_refresh = 0;
  for (const auto& [h, w] : std::vector<std::pair<int64_t, int64_t>>{{10, 12}, {10, 10}, {6, 10}}) {
    per_refresh += 4 * k * (h + w) * (1 + kPower);
  }
  const int64_t refreshes = (kGaloreSteps + kGap - 1) / kGap;
  for (int r = 0; r < kWorld; ++r) {
    std::vector<torch::Tensor> got;
    torch::load(got, dir.file("rank" + std::to_string(r) + ".pt"));
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_LE((got[i] - ref[i]).abs().max().item<double>(), 1e-5) << "rank " << r << ", parameter " << i;
    }
    std::istringstream stats(read_text(dir.file("stats" + std::to_string(r) + ".txt")));
    int64_t calls = 0, bytes = 0, step_bytes = 0, full_bytes = 0;
    stats >> calls >> bytes >> step_bytes >> full_bytes;
    EXPECT_EQ(calls, refreshes * 3 * (2 + 2 * kPower)) << "one all-reduce per product with G";
    EXPECT_EQ(bytes, refreshes * per_refresh);
    // Per step the projected gradients (r×m or n×r per weight), the biases and the flags,
    // against the n·m of every full gradient that DDP would send.
    std::printf(
        "galore randomized, 2 ranks: %lld B per refresh (sketches), %lld B per step, vs %lld B of full "
        "gradients per step\n",
        static_cast<long long>(per_refresh), static_cast<long long>(step_bytes), static_cast<long long>(full_bytes));
    EXPECT_LT(step_bytes, full_bytes);
  }
}

TEST(Distributed, GaloreWithTheSvdProjectorIsRejectedBecauseItIsLocal) {
  TempDir dir;
  const int rc = launch_local(
      1,
      [&](int, int) {
        auto pg = process_group_from_env(std::chrono::seconds(30));
        Mlp model = make_model(7, torch::kFloat);
        LowRankOptimizer opt(model->named_parameters(), config_for("galore", 2, kSgd));
        try {
          DataParallel dp(opt, pg);
        } catch (const ConfigError& e) {
          write_text(dir.file("error.txt"), e.what());
          return 0;
        }
        return 3;
      },
      bounded());
  ASSERT_EQ(rc, 0);
  const std::string msg = read_text(dir.file("error.txt"));
  EXPECT_NE(msg.find("parameter 'fc1.weight' uses method 'galore'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("set projector: randomized"), std::string::npos) << msg;
}

TEST(Distributed, PeerThatNeverJoinsTimesOutInsteadOfHanging) {
  TempDir dir;
  const int rc = launch_local(
      kWorld,
      [&](int rank, int) {
        if (rank == 1) return 0;  // leaves without joining
        try {
          auto pg = process_group_from_env(std::chrono::seconds(2));
        } catch (const DistributedError& e) {
          write_text(dir.file("error0.txt"), e.what());
          return 0;
        }
        return 3;
      },
      bounded());
  ASSERT_EQ(rc, 0);
  const std::string msg = read_text(dir.file("error0.txt"));
  EXPECT_NE(msg.find("rank 0 of 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("within 2 s"), std::string::npos) << msg;
}

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  close(fd);
  return port;
}

TEST(Distributed, TcpStoreFromTorchrunEnvironment) {
  TempDir dir;
  const int port = free_port();
  const int rc = launch_local(
      kWorld,
      [&](int rank, int) {
        // What torchrun provides: MASTER_ADDR / MASTER_PORT instead of a store file.
        unsetenv("GRADLORA_STORE_FILE");
        setenv("MASTER_ADDR", "127.0.0.1", 1);
        setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
        auto pg = process_group_from_env(std::chrono::seconds(30));
        std::vector<torch::Tensor> t{torch::full({3}, static_cast<float>(rank + 1))};
        allreduce_mean(*pg, t, 1 << 20, std::chrono::seconds(30));
        write_text(dir.file("mean" + std::to_string(rank) + ".txt"), std::to_string(t[0].sum().item<float>()));
        return 0;
      },
      bounded());
  ASSERT_EQ(rc, 0);
  for (int rk = 0; rk < kWorld; ++rk) {
    EXPECT_FLOAT_EQ(std::stof(read_text(dir.file("mean" + std::to_string(rk) + ".txt"))), 3 * 1.5f);
  }
}

TEST(Launcher, FailingRankStopsTheOthersAndIsReported) {
  TempDir dir;
  const int rc = launch_local(
      3,
      [&](int rank, int) {
        if (rank == 1) return 7;
        // The others would outlive the test's patience: only the launcher's kill ends them early.
        for (int i = 0; i < 200; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        write_text(dir.file("survived" + std::to_string(rank)), "yes");
        return 0;
      },
      bounded());
  EXPECT_EQ(rc, 7);
  EXPECT_FALSE(fs::exists(dir.file("survived0")));
  EXPECT_FALSE(fs::exists(dir.file("survived2")));
}

TEST(Launcher, ExceptionInARankGivesStatusOneAndAllRanksSeeTheirEnvironment) {
  TempDir dir;
  EXPECT_EQ(launch_local(
                2, [](int rank, int) -> int { throw std::runtime_error("boom " + std::to_string(rank)); }, bounded()),
            1);
  ASSERT_EQ(launch_local(
                3,
                [&](int rank, int world) {
                  write_text(dir.file("env" + std::to_string(rank)),
                             std::string(std::getenv("RANK")) + " " + std::getenv("WORLD_SIZE") + " " +
                                 std::to_string(rank) + " " + std::to_string(world));
                  return 0;
                },
                bounded()),
            0);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(read_text(dir.file("env" + std::to_string(r))), std::to_string(r) + " 3 " + std::to_string(r) + " 3");
  }
}

TEST(Distributed, FingerprintNamesWhatMustAgree) {
  Mlp model = make_model(7, torch::kFloat);
  LowRankOptimizer a(model->named_parameters(), config_for("lora", 2, kSgd));
  Config same = config_for("lora", 2, kSgd);
  same.log_report = true;  // not part of what must agree
  LowRankOptimizer b(model->named_parameters(), same);
  EXPECT_EQ(distributed_fingerprint(a), distributed_fingerprint(b));
  Config other = config_for("lora", 2, kSgd);
  other.optimizer.lr = 0.2;
  LowRankOptimizer c(model->named_parameters(), other);
  const std::string fa = distributed_fingerprint(a), fc = distributed_fingerprint(c);
  EXPECT_NE(fa, fc);
  EXPECT_NE(fa.find("optimizer.lr = 0.10000000000000001"), std::string::npos) << fa;
  EXPECT_NE(fc.find("optimizer.lr = 0.20000000000000001"), std::string::npos) << fc;
  EXPECT_NE(fa.find("parameter 'fc2.weight' = shape [10, 10], method lora, rank 2"), std::string::npos) << fa;
}

TEST(Distributed, MissingEnvironmentIsNamed) {
  const char* keep = std::getenv("WORLD_SIZE");
  const std::string saved = keep ? keep : "";
  unsetenv("WORLD_SIZE");
  try {
    process_group_from_env(std::chrono::seconds(1));
    ADD_FAILURE() << "expected DistributedError";
  } catch (const DistributedError& e) {
    EXPECT_NE(std::string(e.what()).find("WORLD_SIZE is not set"), std::string::npos) << e.what();
  }
  setenv("WORLD_SIZE", "two", 1);
  setenv("RANK", "0", 1);
  try {
    process_group_from_env(std::chrono::seconds(1));
    ADD_FAILURE() << "expected DistributedError";
  } catch (const DistributedError& e) {
    EXPECT_NE(std::string(e.what()).find("WORLD_SIZE='two'"), std::string::npos) << e.what();
  }
  unsetenv("RANK");
  if (keep)
    setenv("WORLD_SIZE", saved.c_str(), 1);
  else
    unsetenv("WORLD_SIZE");
}

}  // namespace
