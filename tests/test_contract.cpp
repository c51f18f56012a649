// The contract every registered method keeps, run over the registry: a method
// gets these tests by being registered. The model is unchanged until the first
// step; a skipped non-finite step changes nothing; fused equals unfused; a
// checkpoint round trip continues bit-identically; a checkpoint saved with other
// settings is refused without changing anything.
#include "test_util.h"

#include <fstream>
#include <map>
#include <sstream>

using namespace gradlora;
using namespace gradlora::testing;  // the shared test helpers (test_util.h)

namespace {

std::vector<std::string> trained_methods() {
  std::vector<std::string> v;
  for (const auto& m : registered_methods()) {
    if (m.make) v.push_back(m.name);  // frozen trains nothing
  }
  return v;
}

// Both weight matrices get the method (rank 2, alpha 4), the biases `full`; a method's
// options that would keep it from acting within a few steps are shortened.
std::string yaml_for(const std::string& method, double alpha = 4.0, bool fused = false) {
  std::string extra;
  if (method == "galore" || method == "apollo") extra = ", update_proj_gap: 2";
  if (method == "random") extra = ", resample_every: 2";
  return fmt::format(
      "optimizer: {{type: adamw, lr: 0.02, weight_decay: 0.01}}\n"
      "targets:\n"
      "  - {{match: 'fc*.weight', method: {}, rank: 2, alpha: {}{}}}\n"
      "  - {{match: '*.bias', method: full}}\n"
      "fuse_into_backward: {}\n",
      method, alpha, extra, fused ? "true" : "false");
}

std::vector<torch::Tensor> weights(Mlp& m) {
  std::vector<torch::Tensor> v;
  for (const auto& p : m->parameters()) v.push_back(p.detach().clone());
  return v;
}

std::map<std::string, torch::Tensor> state(const LowRankOptimizer& opt) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& name : opt.names()) {
    for (const auto& kv : opt.state_tensors(name)) {
      if (kv.second.defined()) out[name + "/" + kv.first] = kv.second.detach().clone();
    }
  }
  return out;
}

void expect_same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << what << " " << i;
}

void expect_same(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& kv : a) {
    auto it = b.find(kv.first);
    ASSERT_NE(it, b.end()) << kv.first;
    EXPECT_TRUE(kv.second.sizes() == it->second.sizes() && torch::equal(kv.second, it->second)) << kv.first;
  }
}

void train(Mlp& m, LowRankOptimizer& opt, int from, int to) {
  for (int i = from; i < to; ++i) {
    opt.zero_grad();
    auto [x, y] = batch(i, torch::kDouble);
    torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
}

std::string saved(const LowRankOptimizer& opt) {
  torch::serialize::OutputArchive a;
  opt.save(a);
  std::ostringstream os;
  a.save_to(os);
  return os.str();
}

void restore(LowRankOptimizer& opt, const std::string& bytes) {
  std::istringstream is(bytes);
  torch::serialize::InputArchive a;
  a.load_from(is);
  opt.load(a);
}

class Contract : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(Contract, ModelUnchangedUntilTheFirstStep) {
  for (bool fused : {false, true}) {
    Mlp m = make_mlp(torch::kDouble);
    const auto w0 = weights(m);
    LowRankOptimizer opt(m->named_parameters(), quiet(yaml_for(GetParam(), 4.0, fused)));
    expect_same(w0, weights(m), "after construction");
    auto [x, y] = batch(0, torch::kDouble);
    torch::mse_loss(m->forward(x), y).backward();
    expect_same(w0, weights(m), "after backward");
    opt.step();
    EXPECT_GT(max_abs_diff(w0[0], m->fc(1)->weight), 0.0) << "the first step must move fc1.weight";
  }
}

TEST_P(Contract, SkippedNonFiniteStepChangesNothing) {
  Mlp m = make_mlp(torch::kDouble);
  LowRankOptimizer opt(m->named_parameters(), quiet(yaml_for(GetParam())));
  train(m, opt, 0, 3);
  const auto w = weights(m);
  const auto s = state(opt);
  const int64_t steps = opt.projector("fc1.weight").steps();
  opt.zero_grad();
  auto [x, y] = batch(3, torch::kDouble);
  torch::mse_loss(m->forward(x), y).backward();
  m->fc(1)->weight.mutable_grad()[1][2] = std::numeric_limits<double>::quiet_NaN();
  opt.step();
  EXPECT_EQ(opt.projector("fc1.weight").steps(), steps);
  EXPECT_GE(opt.skipped_count(), 1);
  // fc2 and the biases may step; fc1 and its state must be exactly as they were.
  EXPECT_TRUE(torch::equal(w[0], m->fc(1)->weight));
  for (const auto& kv : state(opt)) {
    if (kv.first.rfind("fc1.weight/", 0) == 0) EXPECT_TRUE(torch::equal(kv.second, s.at(kv.first))) << kv.first;
  }
}

TEST_P(Contract, FusedEqualsUnfused) {
  std::vector<torch::Tensor> out[2];
  for (bool fused : {false, true}) {
    Mlp m = make_mlp(torch::kDouble);
    LowRankOptimizer opt(m->named_parameters(), quiet(yaml_for(GetParam(), 4.0, fused)));
    train(m, opt, 0, 6);
    out[fused] = weights(m);
  }
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_LE(max_abs_diff(out[0][i], out[1][i]), 1e-12) << i;
}

TEST_P(Contract, CheckpointRoundTripContinuesBitIdentically) {
  Mlp a = make_mlp(torch::kDouble);
  LowRankOptimizer opt_a(a->named_parameters(), quiet(yaml_for(GetParam())));
  train(a, opt_a, 0, 3);
  const std::string bytes = saved(opt_a);
  // A fresh model and optimizer, given the weights and the checkpoint.
  Mlp b = make_mlp(torch::kDouble, 12, 16, 6, /*seed=*/99);
  {
    torch::NoGradGuard guard;
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) pb[i].copy_(pa[i]);
  }
  LowRankOptimizer opt_b(b->named_parameters(), quiet(yaml_for(GetParam())));
  restore(opt_b, bytes);
  expect_same(state(opt_a), state(opt_b));
  train(a, opt_a, 3, 7);
  train(b, opt_b, 3, 7);
  expect_same(weights(a), weights(b), "after resuming");
  expect_same(state(opt_a), state(opt_b));
}

TEST_P(Contract, CheckpointWithOtherSettingsIsRefusedAndChangesNothing) {
  if (GetParam() == "full") GTEST_SKIP() << "full has no settings beyond the inner rule's";
  Mlp a = make_mlp(torch::kDouble);
  LowRankOptimizer opt_a(a->named_parameters(), quiet(yaml_for(GetParam(), /*alpha=*/4.0)));
  train(a, opt_a, 0, 2);
  const std::string bytes = saved(opt_a);
  Mlp b = make_mlp(torch::kDouble);
  LowRankOptimizer opt_b(b->named_parameters(), quiet(yaml_for(GetParam(), /*alpha=*/6.0)));
  train(b, opt_b, 0, 1);
  const auto before = state(opt_b);
  try {
    restore(opt_b, bytes);
    ADD_FAILURE() << "a checkpoint saved with alpha 4 was accepted by an optimizer with alpha 6";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("settings are"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("fc1.weight"), std::string::npos) << e.what();
  }
  expect_same(before, state(opt_b));
}

TEST_P(Contract, FootprintKnownBeforeConstructionIsWhatTheProjectorHolds) {
  // MethodInfo::footprint (what the memory check adds up before allocating) equals the
  // built projector's persistent bytes and trainable values, across its variants.
  const MethodInfo& info = method_info(GetParam());
  ASSERT_TRUE(info.footprint) << GetParam();
  for (const char* extra : {"", ", writeback: exact", ", init: symmetric", ", resample_every: 1", ", proj_side: left",
                            ", fan_in_fan_out: true"}) {
    const std::string e = extra;
    if (e.find("resample_every") != std::string::npos && GetParam() != "random") continue;
    if (e.find("proj_side") != std::string::npos && GetParam() != "galore" && GetParam() != "apollo") continue;
    if (e.find("init") != std::string::npos && GetParam() != "lora" && GetParam() != "hadamard") continue;
    if ((e.find("writeback") != std::string::npos || e.find("fan_in") != std::string::npos) && !info.low_rank) continue;
    for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
      SCOPED_TRACE(GetParam() + e + " " + c10::toString(dtype));
      Mlp m = make_mlp(dtype);
      const std::string yaml = fmt::format("targets: [{{match: fc1.weight, method: {}{}{}}}]", GetParam(),
                                           info.low_rank ? ", rank: 3" : "", e);
      const Config c = quiet(yaml);
      LowRankOptimizer opt(m->named_parameters(), c);
      const auto [bytes, trainable] =
          info.footprint(ProjectorContext{"fc1.weight", m->fc(1)->weight, c.targets[0], c.seed});
      const ParamReport& r = opt.report().params[0];
      EXPECT_EQ(bytes, r.persistent_bytes);
      EXPECT_EQ(trainable, r.trainable);
    }
  }
}

TEST(ContractMemory, StateThatDoesNotFitIsRefusedNamingTheTargetAndTheBytes) {
  Mlp m = make_mlp();
  const std::string yaml =
      "optimizer: {type: adam, amsgrad: true}\n"
      "targets: [{match: fc1.weight, method: lora, rank: 12, writeback: exact}, {match: '*.bias', method: full}]";
  // fc1.weight 16x12: A, B hold 12·28 values, each with its gradient and 3 amsgrad moments,
  // + P0's 192 floats; the biases' 22 values: a gradient and 3 moments each.
  const double lora_bytes = (12.0 * 28 * 5 + 192) * 4, bias_bytes = (16 + 6) * 4 * 4;
  gradlora::detail::set_available_host_memory(lora_bytes + bias_bytes);  // fits exactly
  EXPECT_NO_THROW(LowRankOptimizer(m->named_parameters(), quiet(yaml)));
  gradlora::detail::set_available_host_memory(lora_bytes + bias_bytes - 1);
  expect_config_error(
      [&] { LowRankOptimizer(m->named_parameters(), quiet(yaml)); },
      {"'targets[0].rank' (lora rank 12)", "1 parameter(s)", fmt::format("{:.0f} bytes", lora_bytes).c_str(),
       fmt::format("{:.0f} bytes available", lora_bytes + bias_bytes - 1).c_str()});
  gradlora::detail::set_available_host_memory(std::nullopt);
  EXPECT_NO_THROW(LowRankOptimizer(m->named_parameters(), quiet(yaml)));
}

INSTANTIATE_TEST_SUITE_P(Registered, Contract, ::testing::ValuesIn(trained_methods()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// The README's method table shows, per registered method, where weight decay acts:
// the same text as the registry's MethodInfo::weight_decay_on.
TEST(ContractDocs, ReadmeTableSaysWhereEachMethodDecays) {
  std::ifstream in(std::string(GRADLORA_SOURCE_DIR) + "/README.md");
  ASSERT_TRUE(in) << "README.md not found";
  std::map<std::string, std::string> row;  // method → its table row
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("| `", 0) != 0) continue;
    const size_t end = line.find('`', 3);
    if (end != std::string::npos) row[line.substr(3, end - 3)] = line;
  }
  for (const auto& m : registered_methods()) {
    ASSERT_FALSE(m.weight_decay_on.empty()) << m.name;
    ASSERT_TRUE(row.count(m.name)) << "README.md has no table row for method " << m.name;
    EXPECT_NE(row[m.name].find("| " + m.weight_decay_on + " |"), std::string::npos)
        << m.name << ": README row does not say '" << m.weight_decay_on << "'";
  }
}
