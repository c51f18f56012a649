// The trainer end to end: tiny runs of the real program, resumption to the same
// weights, the inspect table against a golden file, and bad configs.
#include "data.h"
#include "memory.h"
#include "model.h"
#include "settings.h"
#include "trainer.h"
#include "trainer_test_util.h"

#include <gradlora/checkpoint.h>
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace fs = std::filesystem;
using namespace gradlora::app;
using namespace gradlora::app::cli_test;

namespace {

const std::string kTiny = std::string(GRADLORA_SOURCE_DIR) + "/configs/tiny.yaml";

/// The weights a run saved in <dir>/model.pt, by name.
std::map<std::string, torch::Tensor> weights(const fs::path& dir) {
  const Settings s = load_settings(kTiny, {});
  CharTransformer m = make_model(s.model, 123);
  torch::serialize::InputArchive a;
  a.load_from((dir / "model.pt").string());
  m->load(a);
  std::map<std::string, torch::Tensor> w;
  for (const auto& kv : m->named_parameters()) w[kv.key()] = kv.value().detach().clone();
  return w;
}

}  // namespace

// ------------------------------------------------------------- settings

TEST(TrainerSettings, OverridesWriteIntoTheTreeBeforeParsing) {
  YAML::Node root = YAML::Load("optimizer: {lr: 0.1}\ntargets: [{match: a, rank: 4}]\n");
  apply_override(root, "optimizer.lr", "1e-3");
  apply_override(root, "training.steps", "10");
  apply_override(root, "targets[0].rank", "2");
  apply_override(root, "compare.seeds", "[4, 5]");
  EXPECT_DOUBLE_EQ(root["optimizer"]["lr"].as<double>(), 1e-3);
  EXPECT_EQ(root["training"]["steps"].as<int>(), 10);
  EXPECT_EQ(root["targets"][0]["rank"].as<int>(), 2);
  EXPECT_EQ(root["targets"][0]["match"].as<std::string>(), "a");
  EXPECT_EQ(root["compare"]["seeds"][1].as<int>(), 5);
  EXPECT_THROW(apply_override(root, "targets[3].rank", "2"), SettingsError);
  EXPECT_THROW(split_override("training.steps"), SettingsError);
  EXPECT_EQ(split_override("a.b=c=d").second, "c=d");
}

TEST(TrainerSettings, MethodTreeMergesOptimizerAndReplacesTargets) {
  const Settings s = load_settings(kTiny, {});
  ASSERT_TRUE(s.has_compare);
  const MethodSpec& random = s.compare.methods.at(1);
  ASSERT_EQ(random.name, "random");
  const YAML::Node t = method_tree(s, random, 7);
  EXPECT_EQ(t["seed"].as<int>(), 7);
  EXPECT_EQ(t["targets"][0]["method"].as<std::string>(), "random");
  EXPECT_EQ(t["targets"].size(), 2u);
  EXPECT_DOUBLE_EQ(t["optimizer"]["lr"].as<double>(), s.root["optimizer"]["lr"].as<double>());
  EXPECT_FALSE(t["compare"]);
}

TEST(TrainerData, BatchOrderIsAFunctionOfSeedAndStepOnly) {
  const Settings s = load_settings(kTiny, {});
  const Corpus c = load_corpus(s.data.finetune, s.base_dir, s.model.context);
  const int64_t window = s.model.context + 1;
  BatchSampler a(c, window, 8, 3), b(c, window, 8, 3), other(c, window, 8, 4);
  const int64_t far = 3 * a.windows_per_epoch() / 8 + 1;  // a few epochs in
  const torch::Tensor late = a.batch(far);
  for (int64_t i = 0; i < 5; ++i) a.batch(i);
  EXPECT_TRUE(torch::equal(b.batch(far), late));  // straight to `far`, no history
  EXPECT_TRUE(torch::equal(a.batch(far), late));
  EXPECT_FALSE(torch::equal(other.batch(far), late));
  EXPECT_EQ(late.sizes(), (std::vector<int64_t>{8, window}));
  // Windows are slices of the training split.
  const torch::Tensor w = late[0];
  bool found = false;
  for (int64_t start = 0; start + window <= c.train.numel() && !found; ++start) {
    found = torch::equal(c.train.slice(start, start + window), w);
  }
  EXPECT_TRUE(found);
}

TEST(TrainerSettings, DuplicateKeysNameTheFileTheKeyAndBothLines) {
  // yaml-cpp keeps both entries and a lookup takes the first: without the check
  // each file here would load, silently dropping the second value.
  const fs::path d = scratch("dup_keys");
  const std::string tiny = slurp(kTiny);
  auto expect_dup = [&](const std::string& name, const std::string& text, const std::vector<std::string>& needles) {
    const fs::path p = d / name;
    std::ofstream(p) << text;
    try {
      load_settings(p.string(), {});
      ADD_FAILURE() << name << ": expected SettingsError";
    } catch (const SettingsError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
      EXPECT_NE(msg.find("given twice"), std::string::npos) << msg;
      for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
  };
  expect_dup("top.yaml", "seed: 0\nseed: 1\n" + tiny.substr(tiny.find("optimizer:")),
             {"config key 'seed'", "lines 1 and 2"});
  expect_dup("nested.yaml", "optimizer:\n  lr: 0.1\n  lr: 0.2\n" + tiny.substr(tiny.find("targets:")),
             {"config key 'optimizer.lr'", "lines 2 and 3"});
  expect_dup("item.yaml",
             "targets:\n  - match: a\n  - match: b\n    rank: 2\n    rank: 3\n" + tiny.substr(tiny.find("default:")),
             {"config key 'targets[1].rank'", "lines 4 and 5"});
  expect_dup("trainer.yaml", tiny + "training:\n  steps: 5\n", {"config key 'training'"});
  // A --set value is YAML too.
  YAML::Node root = YAML::Load("optimizer: {lr: 0.1}\n");
  try {
    apply_override(root, "optimizer", "{lr: 1, lr: 2}");
    ADD_FAILURE() << "expected SettingsError";
  } catch (const SettingsError& e) {
    EXPECT_NE(std::string(e.what()).find("config key 'optimizer.lr': given twice"), std::string::npos) << e.what();
  }
  fs::remove_all(d);
}

namespace {

/// The ConfigError message of `fn`, or "" (with a failure) when it does not throw one.
template <typename Fn>
std::string config_error(Fn&& fn) {
  try {
    fn();
  } catch (const gradlora::ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected gradlora::ConfigError";
  return "";
}

void expect_in(const std::string& msg, const std::vector<std::string>& needles) {
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
}

}  // namespace

TEST(TrainerMemory, EstimateGrowsWithEachSizeAndFairConfigsFit) {
  const Settings tiny = load_settings(kTiny, {});
  const MemoryEstimate e = estimate_memory(tiny.model, tiny.training.batch);
  // The parameter count is the model's own.
  int64_t numel = 0;
  for (const auto& p : make_model(tiny.model, 0)->parameters()) numel += p.numel();
  EXPECT_DOUBLE_EQ(e.parameters, static_cast<double>(numel));
  EXPECT_DOUBLE_EQ(e.weights, 16.0 * numel);
  EXPECT_GT(e.activations, 0);
  // Quadratic in the context once the attention scores dominate, linear in the batch.
  ModelSettings m = tiny.model;
  m.context = 1024;
  const double at_1k = estimate_memory(m, tiny.training.batch).activations;
  m.context = 4096;
  EXPECT_GT(estimate_memory(m, tiny.training.batch).activations, 12 * at_1k);
  EXPECT_GT(estimate_memory(tiny.model, 4 * tiny.training.batch).activations, 3.9 * e.activations);
  // The tiny config and the defaults fit in 1 GB, and on this machine.
  EXPECT_NO_THROW(check_memory(tiny, 1e9, "the test allows"));
  Settings defaults = tiny;
  defaults.model = ModelSettings{};
  defaults.training = TrainingSettings{};
  EXPECT_LT(estimate_memory(defaults.model, defaults.training.batch).total(), 1e9);
  EXPECT_NO_THROW(check_memory(defaults, 1e9, "the test allows"));
  EXPECT_NO_THROW(check_memory(tiny));
  // The same sizes refused when less is available, naming the biggest contributor.
  Settings wide = tiny;
  wide.model.d_model = 4096;
  expect_in(config_error([&] { check_memory(wide, 1e9, "the test allows"); }),
            {"config key 'model.d_model': 4096", "bytes", "the test allows 1000000000 bytes (1.00 GB) available"});
  Settings deep = tiny;
  deep.model.layers = 2000;
  expect_in(config_error([&] { check_memory(deep, 1e9, "the test allows"); }), {"config key 'model.layers': 2000"});
}

TEST(TrainerMemory, HugeContextOrBatchFailsFastNamingTheKeyAndTheBytes) {
  const fs::path d = scratch("memory");
  const auto t0 = std::chrono::steady_clock::now();
  {
    // The case: pos_embed alone, 1e8 positions × 32 widths, would be 12.8 GB.
    const Settings s = load_settings(kTiny, {{"model.context", "100000000"}});
    const std::string inspect = config_error([&] { inspect_text(s, s.root); });
    expect_in(inspect, {"config key 'model.context': 100000000", "rather than its default 128", "GB) available"});
    RunOptions o;
    o.out_dir = (d / "context").string();
    const std::string train = config_error([&] { train_run(s, s.root, o); });
    expect_in(train, {"config key 'model.context': 100000000", "activations of one batch", "GB) available"});
    EXPECT_FALSE(fs::exists(o.out_dir)) << "refused before anything was written";
  }
  {
    const Settings s = load_settings(kTiny, {{"training.batch", "1000000000"}});
    RunOptions o;
    o.out_dir = (d / "batch").string();
    expect_in(config_error([&] { train_run(s, s.root, o); }),
              {"config key 'training.batch': 1000000000", "bytes", "available"});
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(seconds, 5.0) << "the check must come before any allocation of these sizes";
  // The program: one clean error (exit 2), not LibTorch's "can't allocate memory".
  const Result r = run("train --config " + kTiny + " --set model.context=100000000 --out " + (d / "o").string(), d);
  expect_clean_error(r, {"config key 'model.context': 100000000", "bytes", "available"});
  EXPECT_EQ(r.code, 2);
  expect_clean_error(run("inspect --config " + kTiny + " --set model.context=100000000", d),
                     {"config key 'model.context': 100000000", "GB) available"});
  fs::remove_all(d);
}

// ----------------------------------------------------------- end to end

TEST(TrainerEndToEnd, TinyTrainLearnsAndWritesMetricsPlotAndWeights) {
  const fs::path d = scratch("e2e");
  const Result r = run("train --config " + kTiny + " --out " + (d / "run").string(), d);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* f : {"metrics.csv", "loss.svg", "model.pt", "summary.json"}) {
    EXPECT_TRUE(fs::exists(d / "run" / f)) << f;
  }
  EXPECT_TRUE(fs::exists(d / "run" / "cache"));
  EXPECT_FALSE(fs::exists(d / "run" / "checkpoint.pt"));  // a complete run leaves none behind
  const nlohmann::json j = nlohmann::json::parse(slurp(d / "run" / "summary.json"));
  EXPECT_EQ(j["steps_done"].get<int>(), 40);
  // Learning: the held-out loss on the fine-tuning corpus falls.
  EXPECT_LT(j["eval_after"].get<double>(), j["eval_before"].get<double>() - 0.05) << j.dump();
  // metrics.csv: header + step 0 + every 10 steps.
  std::stringstream csv(slurp(d / "run" / "metrics.csv"));
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(csv, line)) lines.push_back(line);
  ASSERT_EQ(lines.size(), 6u);
  EXPECT_EQ(lines[0], "step,lr,train_loss,eval_loss,base_eval_loss,tokens,elapsed_s");
  EXPECT_EQ(lines[5].substr(0, 3), "40,");
  const std::string svg = slurp(d / "run" / "loss.svg");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("held-out loss (pre-training corpus)"), std::string::npos);
  // The second run finds the pre-trained model in the cache.
  const Result again = run("train --config " + kTiny + " --out " + (d / "run").string(), d / "2");
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.err.find("pre-trained model: cached"), std::string::npos) << again.err;
  fs::remove_all(d);
}

class TrainerResume : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainerResume, ResumedRunEndsWithTheWeightsOfAnUninterruptedOne) {
  const std::string method = GetParam();
  const fs::path d = scratch("resume_" + method);
  const std::string common = "train --config " + kTiny + " --method " + method + " --set training.steps=24 " +
                             "--set training.checkpoint_every=5 --set training.cache_dir=" + (d / "cache").string();
  const Result full = run(common + " --out " + (d / "full").string(), d / "l0");
  ASSERT_EQ(full.code, 0) << full.err;

  // Stops after 13 steps (the checkpoint holds step 13, not a multiple of 5), then resumes.
  const Result part = run(common + " --set training.halt_after=13 --out " + (d / "part").string(), d / "l1");
  ASSERT_EQ(part.code, 130) << part.err;
  ASSERT_TRUE(fs::exists(d / "part" / "checkpoint.pt"));
  EXPECT_FALSE(fs::exists(d / "part" / "model.pt"));
  const Result rest = run(common + " --resume --out " + (d / "part").string(), d / "l2");
  ASSERT_EQ(rest.code, 0) << rest.err;
  EXPECT_NE(rest.err.find("resuming from step 13"), std::string::npos) << rest.err;

  const auto a = weights(d / "full"), b = weights(d / "part");
  ASSERT_EQ(a.size(), b.size());
  // The run did train: the weights moved away from the pre-trained model.
  // The cache holds one model and its pre-training curve.
  std::vector<fs::path> models;
  for (const auto& e : fs::directory_iterator(d / "cache")) {
    if (e.path().extension() == ".pt") models.push_back(e.path());
  }
  ASSERT_EQ(models.size(), 1u);
  EXPECT_TRUE(fs::exists(fs::path(models[0]).replace_extension(".csv")));
  CharTransformer pre = make_model(load_settings(kTiny, {}).model, 5);
  torch::serialize::InputArchive pa;
  pa.load_from(models[0].string());
  pre->load(pa);
  for (const char* name : {"head.weight", "blocks.0.attn.qkv.weight"}) {
    EXPECT_FALSE(torch::equal(pre->named_parameters()[name], a.at(name))) << name;
  }
  // The resumed metrics continue the interrupted ones: same rows as the uninterrupted run.
  std::stringstream fa(slurp(d / "full" / "metrics.csv")), fb(slurp(d / "part" / "metrics.csv"));
  std::string la, lb;
  int rows = 0;
  while (std::getline(fa, la) && std::getline(fb, lb)) {
    // step,lr,train_loss,eval_loss,base_eval_loss are identical; elapsed_s is not.
    EXPECT_EQ(la.substr(0, la.rfind(',')), lb.substr(0, lb.rfind(','))) << "row " << rows;
    ++rows;
  }
  EXPECT_EQ(rows, 5);  // header, 0, 10, 20, 24
  fs::remove_all(d);
}

INSTANTIATE_TEST_SUITE_P(Methods, TrainerResume, ::testing::Values("lora", "random"));

TEST(TrainerDiagnostics, EnergyAndOverlapColumnsAPlotAndResumptionToTheSameRows) {
  // diagnostics: true adds energy_kept:<parameter> per low-rank target (and overlap:<parameter>
  // for galore's refreshes) to metrics.csv and draws subspace.svg; a resumed run writes the
  // rows of an uninterrupted one (the running sums travel in the checkpoint).
  const fs::path d = scratch("diagnostics");
  const std::string common =
      "train --config " + kTiny + " --set diagnostics=true --set training.steps=24 --set training.checkpoint_every=5 " +
      "--set 'targets=[{match: \"blocks.*.*.*.weight\", method: galore, rank: 4, update_proj_gap: 6}, {match: " +
      "\"head.*\", method: full}]' --set training.cache_dir=" + (d / "cache").string();
  ASSERT_EQ(run(common + " --out " + (d / "full").string(), d / "l0").code, 0);
  ASSERT_EQ(run(common + " --set training.halt_after=13 --out " + (d / "part").string(), d / "l1").code, 130);
  const Result rest = run(common + " --resume --out " + (d / "part").string(), d / "l2");
  ASSERT_EQ(rest.code, 0) << rest.err;
  auto cells = [](const std::string& text) {
    std::vector<std::vector<std::string>> rows;
    std::stringstream ss(text);
    for (std::string line; std::getline(ss, line);) {
      std::vector<std::string> row;
      std::stringstream ls(line);
      for (std::string c; std::getline(ls, c, ',');) row.push_back(c);
      if (!line.empty() && line.back() == ',') row.emplace_back();
      row.erase(row.begin() + 6);  // elapsed_s
      rows.push_back(row);
    }
    return rows;
  };
  const auto a = cells(slurp(d / "full" / "metrics.csv")), b = cells(slurp(d / "part" / "metrics.csv"));
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), 5u);  // header, 0, 10, 20, 24
  const std::vector<std::string>& header = a[0];
  const std::vector<std::string> want{"energy_kept:blocks.0.attn.qkv.weight", "energy_kept:blocks.0.attn.proj.weight",
                                      "energy_kept:blocks.0.mlp.fc1.weight", "energy_kept:blocks.0.mlp.fc2.weight",
                                      "overlap:blocks.0.attn.qkv.weight"};
  for (const auto& w : want) EXPECT_NE(std::find(header.begin(), header.end(), w), header.end()) << w;
  // Every energy is a share in (0, 1]; the step-0 row has none yet.
  for (size_t col = 0; col < header.size(); ++col) {
    if (header[col].rfind("energy_kept:", 0) != 0) continue;
    EXPECT_EQ(a[1][col], "") << header[col];
    for (size_t row = 2; row < a.size(); ++row) {
      const double v = std::stod(a[row][col]);
      EXPECT_GT(v, 0.0);
      EXPECT_LE(v, 1.0 + 1e-9);
    }
  }
  EXPECT_NE(slurp(d / "full" / "subspace.svg").find("energy kept"), std::string::npos);
  EXPECT_NE(slurp(d / "full" / "subspace.svg").find("projector refresh"), std::string::npos);
  fs::remove_all(d);
}

TEST(TrainerDataParallel, TwoRanksOnHalfBatchesEqualOneProcessOnTheFullBatch) {
  // gradlora train --nproc 2: each rank trains half of every batch and the
  // optimizer averages the projected gradients; without gradient clipping (which
  // each rank applies to its own shard) the weights equal a single-process run.
  // The two-rank run is stopped after 7 steps and resumed, also on two ranks.
  const fs::path d = scratch("nproc");
  const std::string common =
      "train --config " + kTiny + " --method lora --set training.steps=12 " +
      "--set training.grad_clip=0 --set training.eval_every=4 --set training.pretrain.steps=10 " +
      "--set training.cache_dir=" + (d / "cache").string();
  // The cache is empty: rank 0 pre-trains while rank 1 waits for it.
  const Result part = run(common + " --nproc 2 --set training.halt_after=7 --out " + (d / "dp").string(), d / "l0");
  ASSERT_EQ(part.code, 130) << part.err;
  EXPECT_NE(part.err.find("data-parallel: 2 ranks, 4 windows each per step"), std::string::npos) << part.err;
  EXPECT_NE(part.err.find("rank 0"), std::string::npos) << part.err;
  EXPECT_EQ(part.err.find("rank 1 info"), std::string::npos) << "rank 1 logs only warnings: " << part.err;
  ASSERT_TRUE(fs::exists(d / "dp" / "checkpoint.pt"));
  const Result rest = run(common + " --nproc 2 --resume --out " + (d / "dp").string(), d / "l1");
  ASSERT_EQ(rest.code, 0) << rest.err;
  EXPECT_NE(rest.err.find("resuming from step 7"), std::string::npos) << rest.err;
  // Rank 0 alone prints the summary line.
  EXPECT_EQ(std::count(rest.out.begin(), rest.out.end(), '\n'), 1) << rest.out;

  const Result single = run(common + " --out " + (d / "one").string(), d / "l2");
  ASSERT_EQ(single.code, 0) << single.err;
  const auto a = weights(d / "one"), b = weights(d / "dp");
  ASSERT_EQ(a.size(), b.size());
  double worst = 0;
  for (const auto& [name, w] : a) worst = std::max(worst, (w - b.at(name)).abs().max().item<double>());
  EXPECT_LE(worst, 1e-5);
  // The run did train: the head moved by far more than the tolerance.
  CharTransformer pre = make_model(load_settings(kTiny, {}).model, 5);
  torch::serialize::InputArchive pa;
  pa.load_from(fs::directory_iterator(d / "cache")->path().string());
  pre->load(pa);
  EXPECT_GT((pre->named_parameters()["head.weight"] - a.at("head.weight")).abs().max().item<double>(), 1e-3);
  // The logged mean train loss is the full batch's (the mean of the two halves').
  std::stringstream fa(slurp(d / "one" / "metrics.csv")), fb(slurp(d / "dp" / "metrics.csv"));
  std::string la, lb;
  int rows = 0;
  while (std::getline(fa, la) && std::getline(fb, lb)) {
    if (rows++ == 0) continue;
    auto cells = [](const std::string& l) {
      std::vector<double> v;
      std::stringstream ls(l);
      std::string c;
      while (std::getline(ls, c, ',')) v.push_back(c.empty() ? std::nan("") : std::stod(c));
      return v;
    };
    const auto ca = cells(la), cb = cells(lb);
    for (size_t k : {2u, 3u, 4u}) {  // train_loss, eval_loss, base_eval_loss
      if (std::isnan(ca[k])) {
        EXPECT_TRUE(std::isnan(cb[k])) << la << " vs " << lb;
      } else {
        EXPECT_NEAR(ca[k], cb[k], 1e-4) << la << " vs " << lb;
      }
    }
  }
  EXPECT_EQ(rows, 5);  // header, 0, 4, 8, 12
  fs::remove_all(d);
}

TEST(TrainerDataParallel, BadBatchOrConfigIsOneClearErrorBeforeTheRanksStart) {
  const fs::path d = scratch("nproc_bad");
  const Result r = run("train --config " + kTiny + " --nproc 3 --out " + (d / "o").string(), d);
  expect_clean_error(r, {"training.batch", "8", "--nproc 3"});
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one error, not one per rank: " << r.err;
  // A bad optimizer config is also reported once, before the ranks start.
  const Result c =
      run("train --config " + kTiny + " --nproc 2 --set targets[0].rank=-3 --out " + (d / "o").string(), d);
  expect_clean_error(c, {"targets[0].rank", "-3"});
  EXPECT_EQ(std::count(c.err.begin(), c.err.end(), '\n'), 1) << "one error, not one per rank: " << c.err;
  // galore's projector is local to a rank: refused before any pre-training.
  const Result g =
      run("train --config " + kTiny + " --nproc 2 --set targets[0].method=galore --out " + (d / "o").string(), d);
  expect_clean_error(g, {"targets[0].method", "galore", "--nproc 2"});
  EXPECT_EQ(std::count(g.err.begin(), g.err.end(), '\n'), 1) << g.err;
  EXPECT_FALSE(fs::exists(d / "o" / "cache"));
  fs::remove_all(d);
}

TEST(TrainerResume, ResumingWithoutTheOptimizerStateWouldBeCaught) {
  // Negative control for the test above: a checkpoint whose optimizer state is
  // replaced by a fresh one resumes to different weights.
  const fs::path d = scratch("resume_control");
  const std::string common =
      "train --config " + kTiny +
      " --method lora --set training.steps=24 --set training.cache_dir=" + (d / "cache").string();
  ASSERT_EQ(run(common + " --out " + (d / "full").string(), d / "l0").code, 0);
  ASSERT_EQ(run(common + " --set training.halt_after=13 --out " + (d / "part").string(), d / "l1").code, 130);
  {
    const fs::path ck = d / "part" / "checkpoint.pt";
    Settings s = load_settings(kTiny, {});
    const YAML::Node tree = method_tree(s, s.compare.methods.at(0), 0);
    gradlora::Config cfg = gradlora::Config::from_yaml_string(to_yaml(tree));
    cfg.log_report = false;
    CharTransformer m = make_model(s.model, 0);
    const gradlora::CheckpointExtras extras = gradlora::read_checkpoint_extras(ck.string());
    {
      gradlora::LowRankOptimizer saved(m->named_parameters(), cfg);
      gradlora::load_checkpoint(saved, *m, ck.string());  // the weights of step 13
    }
    gradlora::LowRankOptimizer fresh(m->named_parameters(), cfg);  // and a fresh optimizer state
    gradlora::save_checkpoint(fresh, *m, ck.string(), extras);
  }
  ASSERT_EQ(run(common + " --resume --out " + (d / "part").string(), d / "l2").code, 0);
  const auto a = weights(d / "full"), b = weights(d / "part");
  bool any_differs = false;
  for (const auto& [name, t] : a) any_differs = any_differs || !torch::equal(t, b.at(name));
  EXPECT_TRUE(any_differs);
  fs::remove_all(d);
}

TEST(TrainerEndToEnd, InterruptWritesACheckpointAndExits130) {
  const fs::path d = scratch("sigint");
  const fs::path out = d / "run";
  const pid_t pid = start({"train", "--config", kTiny, "--out", out.string(), "--set", "training.steps=100000", "--set",
                           "data.pretrain=null"},
                          d / "log.txt");
  ASSERT_GE(pid, 0);
  // Wait for training to be under way (metrics.csv appears after the step-0 evaluation).
  for (int i = 0; i < 600 && !fs::exists(out / "metrics.csv"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(fs::exists(out / "metrics.csv"));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 130);
  EXPECT_TRUE(fs::exists(out / "checkpoint.pt"));
  EXPECT_FALSE(fs::exists(out / "checkpoint.pt.tmp"));
  EXPECT_NE(slurp(d / "log.txt").find("continue with --resume"), std::string::npos) << slurp(d / "log.txt");
  fs::remove_all(d);
}

TEST(TrainerEndToEnd, CompareQuickPrintsOneTableAndReusesFinishedRuns) {
  const fs::path d = scratch("compare");
  const std::string cmd = "compare --quick --config " + kTiny + " --out " + (d / "cmp").string();
  const Result r = run(cmd, d / "l0");
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* m : {"lora", "random", "head"}) EXPECT_NE(r.out.find(m), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("forgetting"), std::string::npos);
  for (const char* f : {"results.md", "results.csv", "compare.svg", "lora/seed0/summary.json"}) {
    EXPECT_TRUE(fs::exists(d / "cmp" / f)) << f;
  }
  const Result again = run(cmd, d / "l1");
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.err.find("already complete"), std::string::npos) << again.err;
  EXPECT_EQ(again.out, r.out);  // the same table, from the stored summaries
  fs::remove_all(d);
}

// ------------------------------------------------------------- inspect

TEST(TrainerInspect, MatchesTheGoldenTable) {
  const fs::path d = scratch("inspect");
  const Result r = run("inspect --config " + kTiny, d);
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string golden = slurp(fs::path(GRADLORA_TRAINER_GOLDEN) / "inspect_tiny.txt");
  ASSERT_FALSE(golden.empty());
  EXPECT_EQ(r.out, golden);
  const Result one = run("inspect --config " + kTiny + " --method head", d);
  ASSERT_EQ(one.code, 0) << one.err;
  EXPECT_NE(one.out.find("head.weight                256x32         full"), std::string::npos) << one.out;
  EXPECT_NE(one.out.find("trainable: 8448 of 26272 values"), std::string::npos) << one.out;
  fs::remove_all(d);
}

// ---------------------------------------------------------- bad configs

TEST(TrainerBadConfig, UnknownModelType) {
  const fs::path d = scratch("bad_model");
  expect_clean_error(run("train --config " + kTiny + " --set model.type=lstm --out " + (d / "o").string(), d),
                     {"model.type", "lstm", "char_transformer"});
  expect_clean_error(run("inspect --config " + kTiny + " --set model.type=lstm", d), {"model.type", "lstm"});
  fs::remove_all(d);
}

TEST(TrainerBadConfig, MissingDataPath) {
  const fs::path d = scratch("bad_path");
  expect_clean_error(run("train --config " + kTiny + " --set data.finetune.files=[/nonexistent/corpus.txt] --out " +
                             (d / "o").string(),
                         d),
                     {"data.finetune.files[0]", "/nonexistent/corpus.txt", "does not exist"});
  fs::remove_all(d);
}

TEST(TrainerBadConfig, EmptyCorpus) {
  const fs::path d = scratch("bad_empty");
  std::ofstream(d / "empty.txt").close();
  expect_clean_error(run("train --config " + kTiny + " --set data.finetune.files=[" + (d / "empty.txt").string() +
                             "] --out " + (d / "o").string(),
                         d),
                     {"data.finetune.files", "empty"});
  fs::remove_all(d);
}

TEST(TrainerBadConfig, BatchLargerThanData) {
  const fs::path d = scratch("bad_batch");
  expect_clean_error(run("train --config " + kTiny + " --set training.batch=5000 --out " + (d / "o").string(), d),
                     {"training.batch", "5000", "larger than the data"});
  fs::remove_all(d);
}

TEST(TrainerBadConfig, UnknownKeysAndBadOptimizerValues) {
  const fs::path d = scratch("bad_keys");
  expect_clean_error(run("train --config " + kTiny + " --set training.stepz=3 --out " + (d / "o").string(), d),
                     {"training.stepz", "unknown key"});
  expect_clean_error(run("train --config " + kTiny + " --set optimizer.lr=fast --out " + (d / "o").string(), d),
                     {"optimizer.lr", "fast"});
  expect_clean_error(run("train --config " + kTiny + " --set targets[0].rank=0 --out " + (d / "o").string(), d),
                     {"rank"});
  expect_clean_error(run("train --config " + (d / "missing.yaml").string(), d), {"missing.yaml", "cannot be opened"});
  expect_clean_error(run("train --config " + kTiny + " --set training.steps --out " + (d / "o").string(), d),
                     {"key=value"});
  fs::remove_all(d);
}

TEST(TrainerBadConfig, Device) {
  const fs::path d = scratch("bad_device");
  expect_clean_error(run("train --config " + kTiny + " --set training.device=tpu --out " + (d / "o").string(), d),
                     {"training.device", "tpu", "cpu, cuda or cuda:N"});
  if (!torch::cuda::is_available()) {
    expect_clean_error(run("train --config " + kTiny + " --set training.device=cuda --out " + (d / "o").string(), d),
                       {"training.device", "CUDA is not available"});
  }
  fs::remove_all(d);
}
