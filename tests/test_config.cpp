// Config: YAML schema, and every bad input giving a clear ConfigError that
// names the key, the parameter and the value.
#include "test_util.h"

#include <fstream>

using namespace gradlora;
using gradlora::testing::expect_config_error;
using gradlora::testing::make_mlp;
using gradlora::testing::quiet;

TEST(Config, ParsesTheFullSchema) {
  Config c = Config::from_yaml_string(R"(
seed: 42
optimizer:
  type: sgd
  lr: 0.5
  betas: [0.8, 0.99]
  eps: 1.0e-6
  weight_decay: 0.01
  momentum: 0.9
  dampening: 0.0
  nesterov: true
targets:
  - match: "layers.*.weight"
    method: lora
    rank: 4
    alpha: 8
    init: symmetric
    lr: 0.1
    weight_decay: 0.0
    writeback: exact
    merge_every: 100
  - match: "re:.*\\.bias"
    method: full
  - match: "emb.weight"
    method: random
    rank: 2
    resample_every: 5
    on_resample: transfer
default: full
on_nonfinite: error
allow_unmatched_targets: true
)");
  EXPECT_EQ(c.seed, 42u);
  EXPECT_EQ(c.optimizer.type, InnerType::sgd);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.5);
  EXPECT_DOUBLE_EQ(c.optimizer.betas[1], 0.99);
  EXPECT_TRUE(c.optimizer.nesterov);
  ASSERT_EQ(c.targets.size(), 3u);
  EXPECT_EQ(c.targets[0].method, Method::lora);
  EXPECT_EQ(c.targets[0].rank, 4);
  EXPECT_DOUBLE_EQ(c.targets[0].scale(), 2.0);
  EXPECT_EQ(c.targets[0].init, Init::symmetric);
  EXPECT_EQ(c.targets[0].writeback, WriteBack::exact);
  EXPECT_EQ(option_int(c.targets[0], "merge_every"), 100);
  EXPECT_DOUBLE_EQ(*c.targets[0].lr, 0.1);
  EXPECT_EQ(c.targets[1].method, Method::full);
  EXPECT_EQ(c.targets[2].on_resample, OnResample::transfer);
  EXPECT_EQ(option_int(c.targets[2], "resample_every"), 5);
  EXPECT_EQ(c.default_method, Method::full);
  EXPECT_EQ(c.on_nonfinite, OnNonFinite::error);
  EXPECT_TRUE(c.allow_unmatched_targets);
}

TEST(Config, DefaultsFollowLibTorch) {
  Config c = Config::from_yaml_string("optimizer: {type: adamw}");
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.optimizer.effective_weight_decay(), 1e-2);  // AdamWOptions default
  c = Config::from_yaml_string("optimizer: {type: adam}");
  EXPECT_DOUBLE_EQ(c.optimizer.effective_weight_decay(), 0.0);
  EXPECT_EQ(c.default_method, Method::frozen);
}

TEST(Config, ReferenceConfigsLoad) {
  for (const char* f : {"configs/reference.yaml", "configs/example_mlp.yaml"}) {
    const std::string path = std::string(GRADLORA_SOURCE_DIR) + "/" + f;
    EXPECT_NO_THROW(Config::from_yaml_file(path)) << path;
  }
}

TEST(Config, GlobAndRegexMatching) {
  EXPECT_TRUE(pattern_matches("layers.*.weight", "layers.0.attn.weight"));
  EXPECT_TRUE(pattern_matches("*.bias", "fc1.bias"));
  EXPECT_FALSE(pattern_matches("*.bias", "fc1.weight"));
  EXPECT_TRUE(pattern_matches("fc?.weight", "fc1.weight"));
  EXPECT_TRUE(pattern_matches("re:fc[12]\\.weight", "fc2.weight"));
  EXPECT_FALSE(pattern_matches("re:fc[12]\\.weight", "fc3.weight"));
  EXPECT_FALSE(pattern_matches("re:fc", "fc1.weight"));  // whole-name match
}

// ---- bad input: YAML level

TEST(ConfigErrors, UnknownKeys) {
  expect_config_error([] { Config::from_yaml_string("sed: 1"); }, {"'sed'", "unknown key", "line 1"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {type: adamw, learning_rate: 1}"); },
                      {"optimizer.learning_rate", "unknown key"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, methd: lora}]"); },
                      {"targets[0].methd", "unknown key"});
}

TEST(ConfigErrors, UnknownEnumValues) {
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, method: lorax}]"); },
                      {"targets[0].method", "'lorax'", "lora | random"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, init: gaussian}]"); },
                      {"targets[0].init", "'gaussian'"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {type: rmsprop}"); }, {"optimizer.type", "'rmsprop'"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, method: random, on_resample: swap}]"); },
                      {"targets[0].on_resample", "'swap'", "keep | reset | transfer"});
  expect_config_error([] { Config::from_yaml_string("default: lora"); }, {"'default'", "lora"});
}

TEST(ConfigErrors, WrongTypes) {
  expect_config_error([] { Config::from_yaml_string("optimizer: {lr: fast}"); },
                      {"optimizer.lr", "a number", "'fast'"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, rank: [1, 2]}]"); },
                      {"targets[0].rank", "an integer", "a list"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, rank: 2.5}]"); },
                      {"targets[0].rank", "'2.5'"});
  expect_config_error([] { Config::from_yaml_string("targets: {match: a}"); }, {"'targets'", "a list"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {betas: [0.9]}"); }, {"optimizer.betas"});
  expect_config_error([] { Config::from_yaml_string("seed: -3"); }, {"'seed'", "'-3'"});
  expect_config_error([] { Config::from_yaml_string("- just\n- a list"); }, {"top level", "a mapping"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {lr: [1"); }, {"not valid YAML"});
  expect_config_error([] { Config::from_yaml_string("targets: [{method: lora}]"); }, {"targets[0].match", "missing"});
}

TEST(ConfigErrors, OutOfRange) {
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, rank: 0}]"); }, {"targets[0].rank", "got 0"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, rank: -4}]"); },
                      {"targets[0].rank", "got -4"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {lr: -0.1}"); }, {"optimizer.lr", "-0.1"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {eps: -1.0e-8}"); }, {"optimizer.eps", "-1e-08"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {betas: [1.0, 0.999]}"); },
                      {"optimizer.betas[0]", "got 1"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {betas: [0.9, -0.1]}"); },
                      {"optimizer.betas[1]", "-0.1"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {weight_decay: -1}"); },
                      {"optimizer.weight_decay", "-1"});
  expect_config_error([] { Config::from_yaml_string("optimizer: {type: sgd, nesterov: true}"); },
                      {"optimizer.nesterov", "momentum"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, method: random, resample_every: -1}]"); },
                      {"targets[0].resample_every", "-1"});
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, alpha: 0}]"); },
                      {"targets[0].alpha", "got 0"});
}

TEST(ConfigErrors, RegexThatDoesNotCompile) {
  expect_config_error([] { Config::from_yaml_string("targets: [{match: 're:fc[1', method: lora}]"); },
                      {"targets[0].match", "fc[1", "does not compile"});
}

TEST(ConfigErrors, FileErrorsNameTheFile) {
  expect_config_error([] { Config::from_yaml_file("/nonexistent/x.yaml"); }, {"/nonexistent/x.yaml", "cannot"});
  const std::string path = ::testing::TempDir() + "/bad_config.yaml";
  std::ofstream(path) << "optimizer:\n  lr: abc\n";
  expect_config_error([&] { Config::from_yaml_file(path); }, {path.c_str(), "optimizer.lr", "line 2"});
}

TEST(ConfigErrors, DuplicateKeysNameTheKeyAndBothLines) {
  // yaml-cpp keeps both entries and a lookup takes the first: without the check
  // each of these would load, silently dropping the second value.
  expect_config_error([] { Config::from_yaml_string("seed: 0\nseed: 1\n"); },
                      {"config key 'seed'", "given twice", "lines 1 and 2"});
  expect_config_error([] { Config::from_yaml_string("optimizer:\n  lr: 0.1\n  type: sgd\n  lr: 0.2\n"); },
                      {"config key 'optimizer.lr'", "given twice", "lines 2 and 4"});
  expect_config_error(
      [] {
        Config::from_yaml_string(
            "targets:\n  - match: a\n    rank: 2\n  - match: b\n    rank: 4\n    method: lora\n    rank: 8\n");
      },
      {"config key 'targets[1].rank'", "given twice", "lines 5 and 7"});
  // Flow style too, and the file loader names the file.
  expect_config_error([] { Config::from_yaml_string("targets: [{match: a, match: b}]"); },
                      {"'targets[0].match'", "given twice", "at line 1, columns 12 and 22"});
  const std::string path = ::testing::TempDir() + "/dup_config.yaml";
  std::ofstream(path) << "seed: 3\noptimizer:\n  lr: 0.1\nseed: 4\n";
  expect_config_error([&] { Config::from_yaml_file(path); }, {path.c_str(), "'seed'", "lines 1 and 4"});
  // The same key in different mappings is not a duplicate.
  EXPECT_NO_THROW(
      Config::from_yaml_string("optimizer: {lr: 0.1}\ntargets: [{match: a, lr: 0.2}, {match: b, lr: 0.3}]"));
}

// ---- bad input: selection against a model

TEST(SelectionErrors, RankAboveSmallerSide) {
  auto m = make_mlp();  // fc1 16x12, fc2 6x16
  expect_config_error(
      [&] { LowRankOptimizer(m->named_parameters(), quiet("targets: [{match: fc2.weight, rank: 7}]")); },
      {"'rank'", "fc2.weight", "6x16", "got 7"});
}

TEST(SelectionErrors, LowRankMethodOnOneDimensionalParameter) {
  auto m = make_mlp();
  for (const char* method : {"lora", "random", "additive"}) {
    expect_config_error(
        [&] {
          LowRankOptimizer(m->named_parameters(),
                           quiet(std::string("targets: [{match: fc1.bias, rank: 1, method: ") + method + "}]"));
        },
        {"'method'", "fc1.bias", method, "dimension"});
  }
}

TEST(Config, FanInFanOutIsParsedAndDescribed) {
  Config c = Config::from_yaml_string("targets: [{match: c_attn.weight, fan_in_fan_out: true}, {match: wte.weight}]");
  EXPECT_TRUE(c.targets[0].fan_in_fan_out);
  EXPECT_FALSE(c.targets[1].fan_in_fan_out);
  // describe_target feeds the data-parallel config check: ranks must agree on it.
  const auto d0 = describe_target(c.targets[0]), d1 = describe_target(c.targets[1]);
  auto value = [](const std::vector<std::pair<std::string, std::string>>& d) {
    for (const auto& [k, v] : d) {
      if (k == "fan_in_fan_out") return v;
    }
    return std::string("(missing)");
  };
  EXPECT_EQ(value(d0), "true");
  EXPECT_EQ(value(d1), "false");
}

TEST(SelectionErrors, FanInFanOutNeedsATwoDimensionalWeight) {
  auto m = make_mlp();  // fc1.bias has shape [16]
  for (const char* method : {"lora", "galore", "hadamard"}) {
    expect_config_error(
        [&] {
          LowRankOptimizer(m->named_parameters(), quiet(fmt::format("targets: [{{match: fc1.bias, method: {}, rank: 1, "
                                                                    "fan_in_fan_out: true}}]",
                                                                    method)));
        },
        {"'fan_in_fan_out'", "fc1.bias", "1 dimension(s)", "[16]", "2-D", "got true"});
  }
  torch::OrderedDict<std::string, torch::Tensor> conv;
  conv.insert("conv.weight", torch::zeros({5, 3, 3, 3}).requires_grad_());
  expect_config_error(
      [&] { LowRankOptimizer(conv, quiet("targets: [{match: conv.weight, rank: 2, fan_in_fan_out: true}]")); },
      {"'fan_in_fan_out'", "conv.weight", "4 dimension(s)", "[5, 3, 3, 3]", "got true"});
  // Not a low-rank method: nothing is viewed as a matrix.
  expect_config_error(
      [&] { Config::from_yaml_string("targets: [{match: fc1.bias, method: full, fan_in_fan_out: true}]"); },
      {"targets[0].fan_in_fan_out", "'full'", "got true"});
  expect_config_error([&] { Config::from_yaml_string("targets: [{match: fc1.weight, fan_in_fan_out: 3}]"); },
                      {"targets[0].fan_in_fan_out", "true or false", "3"});
}

TEST(SelectionErrors, TargetMatchingNothing) {
  auto m = make_mlp();
  expect_config_error(
      [&] { LowRankOptimizer(m->named_parameters(), quiet("targets: [{match: 'encoder.*', rank: 2}]")); },
      {"targets[0].match", "encoder.*", "matches no parameter", "allow_unmatched_targets"});
  // Opt-out: a warning only.
  EXPECT_NO_THROW(LowRankOptimizer(m->named_parameters(),
                                   quiet("allow_unmatched_targets: true\ntargets: [{match: 'encoder.*', rank: 2}]")));
}

TEST(SelectionErrors, NonFloatingParameter) {
  torch::OrderedDict<std::string, torch::Tensor> params;
  params.insert("counts", torch::zeros({4, 4}, torch::kLong));
  expect_config_error([&] { LowRankOptimizer(params, quiet("targets: [{match: counts, rank: 2}]")); },
                      {"counts", "floating-point", "Long"});
}

TEST(SelectionErrors, TiedWeights) {
  torch::OrderedDict<std::string, torch::Tensor> params;
  torch::Tensor w = torch::zeros({4, 4});
  params.insert("enc.weight", w);
  params.insert("dec.weight", w);
  expect_config_error([&] { LowRankOptimizer(params, quiet("default: full")); }, {"enc.weight", "dec.weight"});
}

TEST(SelectionErrors, FailedConstructionChangesNothing) {
  auto m = make_mlp();
  std::vector<torch::Tensor> before;
  for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
  EXPECT_THROW(LowRankOptimizer(m->named_parameters(),
                                quiet("targets: [{match: fc1.weight, rank: 2}, {match: fc2.bias, rank: 1}]")),
               ConfigError);
  auto after = m->parameters();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i], after[i]));
}
