// The experiment's machinery: three splits per corpus, pre-training to a
// plateau, learning rates chosen on the validation split, runs in parallel
// processes, forgetting at matched learning.
#include "data.h"
#include "pretrain_cache.h"
#include "run_files.h"
#include "settings.h"
#include "trainer.h"
#include "trainer_test_util.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using namespace gradlora::app;
using namespace gradlora::app::cli_test;

namespace {

const std::string kSweep = std::string(GRADLORA_SOURCE_DIR) + "/tests/trainer/configs/sweep_tiny.yaml";
const std::string kTiny = std::string(GRADLORA_SOURCE_DIR) + "/configs/tiny.yaml";

std::vector<std::map<std::string, std::string>> read_csv(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::vector<std::string> head;
  std::getline(in, line);
  {
    std::stringstream ss(line);
    for (std::string c; std::getline(ss, c, ',');) head.push_back(c);
  }
  std::vector<std::map<std::string, std::string>> rows;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::stringstream ss(line);
    std::map<std::string, std::string> row;
    size_t i = 0;
    for (std::string c; std::getline(ss, c, ',');) row[head.at(i++)] = c;
    rows.push_back(row);
  }
  return rows;
}

nlohmann::json summary(const fs::path& dir) {
  std::ifstream in(dir / "summary.json");
  return nlohmann::json::parse(in);
}

MetricRow row(double b, double a) {
  MetricRow r;
  r.eval_loss = b;
  r.base_eval_loss = a;
  return r;
}

}  // namespace

// ------------------------------------------------------------- splits

TEST(ExperimentSplits, EachFileIsTrainingThenValidationThenHeldOut) {
  const fs::path d = scratch("splits");
  std::string text;
  for (int i = 0; i < 1000; ++i) text += static_cast<char>('a' + i % 26);
  std::ofstream(d / "f.txt") << text;
  CorpusSettings c;
  c.key = "data.finetune";
  c.files = {(d / "f.txt").string()};
  c.validation = 0.15;
  c.holdout = 0.1;
  const Corpus corpus = load_corpus(c, d.string(), 8);
  // 1000 bytes: 100 held out (the tail), 150 validation before them, 750 training.
  EXPECT_EQ(corpus.train.numel(), 750);
  EXPECT_EQ(corpus.validation.numel(), 150);
  EXPECT_EQ(corpus.heldout.numel(), 100);
  EXPECT_EQ(corpus.files.at(0).validation_tokens, 150);
  auto bytes = [](const TokenStream& s, int64_t a, int64_t b) {
    std::string out;
    const torch::Tensor t = s.slice(a, b);
    for (int64_t i = 0; i < t.numel(); ++i) out += static_cast<char>(t[i].item<int64_t>());
    return out;
  };
  EXPECT_EQ(bytes(corpus.train, 0, 750), text.substr(0, 750));
  EXPECT_EQ(bytes(corpus.validation, 0, 150), text.substr(750, 150));
  EXPECT_EQ(bytes(corpus.heldout, 0, 100), text.substr(900, 100));
  fs::remove_all(d);
}

TEST(ExperimentSplits, InspectListsTheValidationSplit) {
  const fs::path d = scratch("splits_inspect");
  const Result r = run("inspect --data --config " + kSweep, d);
  ASSERT_EQ(r.code, 0) << r.err;
  // stdio.h: 31526 bytes here would be 3152 + 3152; the numbers come from the file itself.
  const auto n = static_cast<int64_t>(fs::file_size("/usr/include/stdio.h"));
  const int64_t tenth = n / 10;
  EXPECT_NE(r.out.find(fmt::format("{} training, {} validation, {} held out", n - 2 * tenth, tenth, tenth)),
            std::string::npos)
      << r.out;
  fs::remove_all(d);
}

TEST(ExperimentSplits, BadSplitsAreCleanErrors) {
  const fs::path d = scratch("splits_bad");
  expect_clean_error(run("inspect --config " + kSweep + " --set data.finetune.validation=0.95", d),
                     {"data.finetune.validation", "0.95", "holdout 0.1"});
  expect_clean_error(run("inspect --config " + kSweep + " --set data.finetune.validation=-0.1", d),
                     {"data.finetune.validation", "-0.1"});
  // Choosing a learning rate needs the validation split of B ...
  expect_clean_error(run("inspect --config " + kSweep + " --set data.finetune.validation=0", d),
                     {"compare.methods[0].lrs", "lora", "data.finetune.validation"});
  // ... and the plateau that of A.
  expect_clean_error(run("inspect --config " + kSweep + " --set data.pretrain.validation=0", d),
                     {"training.pretrain.plateau", "data.pretrain.validation"});
  expect_clean_error(run("inspect --config " + kSweep + " --set compare.methods[0].lrs=[0.01,-1]", d),
                     {"compare.methods[0].lrs[1]", "-1"});
  expect_clean_error(run("inspect --config " + kSweep + " --set compare.methods[0].lrs=[0.01,0.01]", d),
                     {"compare.methods[0].lrs[1]", "twice"});
  expect_clean_error(run("inspect --config " + kSweep + " --set training.pretrain.plateau.window=25", d),
                     {"training.pretrain.plateau.window", "25", "eval_every (10)"});
  fs::remove_all(d);
}

// ------------------------------------------------------------ plateau

TEST(ExperimentPlateau, TheTestComparesTheBestLossWithTheBestOneWindowEarlier) {
  using H = std::vector<std::pair<int64_t, double>>;
  // Nothing is a window old yet.
  EXPECT_EQ(plateau_step(H{{0, 5.0}, {100, 3.0}}, 200, 0.01), -1);
  // Best up to step 100: 3.0; best now: 2.995; improved by 0.005 < 0.01.
  EXPECT_EQ(plateau_step(H{{0, 5.0}, {100, 3.0}, {200, 2.995}}, 100, 0.01), 200);
  // Improved by 0.02: not yet.
  EXPECT_EQ(plateau_step(H{{0, 5.0}, {100, 3.0}, {200, 2.98}}, 100, 0.01), -1);
  // Rising again (over-fitting) is a plateau: the best stays 3.0 at both ends.
  EXPECT_EQ(plateau_step(H{{0, 5.0}, {100, 3.0}, {200, 3.1}, {300, 3.2}}, 200, 0.01), 300);
  // A best reached inside the window counts: 3.0 at 100, 2.5 at 200, window 200 from 300.
  EXPECT_EQ(plateau_step(H{{0, 5.0}, {100, 3.0}, {200, 2.5}, {300, 2.6}}, 200, 0.01), -1);
}

TEST(ExperimentPlateau, PretrainingStopsAtThePlateauAndCoolsDownLinearly) {
  const fs::path d = scratch("plateau");
  // min_delta 100: the first evaluation a window (20 steps) after step 0 is the plateau.
  const Result r = run("train --config " + kSweep + " --method head --set training.steps=1 --out " +
                           (d / "o").string() + " --set training.cache_dir=" + (d / "cache").string(),
                       d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("plateau at step 20"), std::string::npos) << r.err;
  fs::path curve;
  for (const auto& e : fs::directory_iterator(d / "cache")) {
    if (e.path().extension() == ".csv") curve = e.path();
  }
  ASSERT_FALSE(curve.empty());
  const auto rows = read_csv(curve);
  ASSERT_EQ(rows.size(), 4u);  // steps 0, 10, 20, then the end of the 10-step cool-down
  EXPECT_EQ(rows[2].at("step"), "20");
  EXPECT_EQ(rows[3].at("step"), "30");
  // lr at an evaluation is that of the step before it: constant 1e-2 up to the
  // plateau, then 1e-2 * (30 - 29) / 10 at the last step of the cool-down.
  EXPECT_DOUBLE_EQ(std::stod(rows[2].at("lr")), 1e-2);
  EXPECT_NEAR(std::stod(rows[3].at("lr")), 1e-3, 1e-9);
  EXPECT_EQ(rows[2].at("phase"), "plateau");
  EXPECT_EQ(rows[3].at("phase"), "cooldown");
  for (const auto& row : rows) {
    EXPECT_FALSE(row.at("val_loss").empty());
    EXPECT_FALSE(row.at("test_loss").empty());
  }

  // min_delta 0 never declares a plateau: the budget, then the cool-down, and a warning.
  const Result b = run("train --config " + kSweep +
                           " --method head --set training.steps=1 --set training.pretrain.steps=40 "
                           "--set training.pretrain.plateau.min_delta=0 --out " +
                           (d / "o2").string() + " --set training.cache_dir=" + (d / "cache2").string(),
                       d);
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_NE(b.err.find("no plateau within training.pretrain.steps = 40"), std::string::npos) << b.err;
  EXPECT_NE(b.err.find("pre-train step 50:"), std::string::npos) << b.err;  // 40 + 10
  std::vector<std::string> phases;
  for (const auto& e : fs::directory_iterator(d / "cache2"))
    if (e.path().extension() == ".csv")
      for (const auto& row : read_csv(e.path())) phases.push_back(row.at("step") + " " + row.at("phase"));
  EXPECT_EQ(phases, (std::vector<std::string>{"0 warmup", "10 constant", "20 constant", "30 constant", "40 budget",
                                              "50 cooldown"}));
  fs::remove_all(d);
}

// ------------------------------------------------------------ frontier

TEST(ExperimentFrontier, ForgettingAtALevelIsInterpolatedAtTheFirstCrossing) {
  // B: 4.0 -> 3.0 -> 2.0 -> 2.5 -> 1.0; A: 2.0, 2.2, 2.6, 2.7, 3.0.
  const std::vector<MetricRow> rows{row(4.0, 2.0), row(3.0, 2.2), row(2.0, 2.6), row(2.5, 2.7), row(1.0, 3.0)};
  EXPECT_NEAR(forgetting_at(rows, 3.5), 0.1, 1e-12);  // halfway between the first two
  EXPECT_NEAR(forgetting_at(rows, 2.5), 0.4, 1e-12);  // first crossing (2.2 + 0.5 * 0.4), not the later one
  EXPECT_NEAR(forgetting_at(rows, 3.0), 0.2, 1e-12);  // exactly at an evaluation
  EXPECT_NEAR(forgetting_at(rows, 1.5), 0.9, 1e-12);  // 2.5 -> 1.0 crosses it 2/3 of the way: 2.7 + 0.2 - 2.0
  EXPECT_TRUE(std::isnan(forgetting_at(rows, 0.5)));  // never reached
  EXPECT_TRUE(std::isnan(forgetting_at(rows, 4.5)));  // above the start: never crossed
}

// ------------------------------------------------------- sweep, compare

TEST(ExperimentCompare, TheSweepChoosesTheRateWithTheLowestValidationLossAndReportsIt) {
  const fs::path d = scratch("sweep");
  const std::string base = "compare --config " + kSweep;
  const std::string cmd = base + " --out " + (d / "o").string();
  const Result r = run(cmd + " --jobs 2", d / "l0");
  ASSERT_EQ(r.code, 0) << r.err;
  // The sweep's runs, read back independently of compare: the lowest final validation loss.
  double best = INFINITY, best_lr = 0;
  for (const char* lr : {"0.0001", "0.02"}) {
    const nlohmann::json j = summary(d / "o" / "sweep" / "lora" / (std::string("lr") + lr) / "seed0");
    EXPECT_EQ(j["seed"].get<int>(), 0);
    const double v = j["val_after"].get<double>();
    if (v < best) best = v, best_lr = std::stod(lr);
  }
  ASSERT_TRUE(std::isfinite(best));
  const auto results = read_csv(d / "o" / "results.csv");
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0].at("method"), "lora");
  EXPECT_DOUBLE_EQ(std::stod(results[0].at("lr")), best_lr);
  EXPECT_EQ(results[0].at("lr_chosen"), "1");
  EXPECT_EQ(results[1].at("lr_chosen"), "0");  // head: its own lr
  EXPECT_DOUBLE_EQ(std::stod(results[1].at("lr")), 1e-3);
  // The reported runs are the seeds of compare.seeds at that rate.
  for (int seed : {1, 2}) {
    const fs::path run_dir = d / "o" / "lora" / fmt::format("seed{}", seed);
    EXPECT_EQ(summary(run_dir)["seed"].get<int>(), seed);
    const Settings rs = load_settings((run_dir / "run.yaml").string(), {});
    EXPECT_DOUBLE_EQ(rs.root["optimizer"]["lr"].as<double>(), best_lr);
  }
  // The reported numbers are the test split's: mean of the seeds' eval_after.
  const double m = (summary(d / "o" / "lora" / "seed1")["eval_after"].get<double>() +
                    summary(d / "o" / "lora" / "seed2")["eval_after"].get<double>()) /
                   2;
  EXPECT_NEAR(std::stod(results[0].at("eval_after_mean")), m, 1e-5);
  // Frontier rows: one per level and method at the chosen rate, one per level for the swept method.
  const auto frontier = read_csv(d / "o" / "frontier.csv");
  EXPECT_EQ(frontier.size(), 2u * 2u + 2u);
  for (const char* f : {"sweep.md", "sweep.csv", "frontier.md", "frontier.svg", "pretrain.csv", "pretrain.svg",
                        "compare.svg", "results.md"}) {
    EXPECT_TRUE(fs::exists(d / "o" / f)) << f;
  }
  EXPECT_NE(slurp(d / "o" / "sweep.md").find("**"), std::string::npos);

  // In one process the same runs give the same numbers (the order of
  // evaluation and the data order do not depend on how runs are scheduled).
  const Result one = run(base + " --fresh --jobs 1 --out " + (d / "o1").string(), d / "l1");
  ASSERT_EQ(one.code, 0) << one.err;
  const auto results1 = read_csv(d / "o1" / "results.csv");
  for (size_t i = 0; i < 2; ++i) {
    for (const char* k : {"lr", "val_after_mean", "eval_after_mean", "forgetting_mean"}) {
      EXPECT_EQ(results1[i].at(k), results[i].at(k)) << k;
    }
  }
  // A second compare reuses every finished run.
  const Result again = run(cmd + " --jobs 2", d / "l2");
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.err.find("learning-rate sweep: 2 run(s), 2 already complete, 0 to train"), std::string::npos)
      << again.err;
  EXPECT_NE(again.err.find("reported runs: 4 run(s), 4 already complete, 0 to train"), std::string::npos) << again.err;
  EXPECT_EQ(again.out, r.out);
  fs::remove_all(d);
}

TEST(ExperimentCompare, ADivergingRateIsRecordedAndNotChosen) {
  const fs::path d = scratch("diverge");
  const std::string cmd = "compare --config " + kSweep + " --out " + (d / "o").string() +
                          " --set 'compare.methods[0].lrs=[0.001, 1.0e+30]' --set compare.seeds=[1]" +
                          " --set training.grad_clip=0";
  const Result r = run(cmd + " --jobs 2", d);
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = summary(d / "o" / "sweep" / "lora" / "lr1e+30" / "seed0");
  EXPECT_TRUE(j["diverged"].get<bool>()) << j.dump();
  EXPECT_NE(j["error"].get<std::string>().find("training loss is"), std::string::npos);
  const auto results = read_csv(d / "o" / "results.csv");
  EXPECT_DOUBLE_EQ(std::stod(results.at(0).at("lr")), 0.001);
  EXPECT_NE(slurp(d / "o" / "sweep.md").find("diverged"), std::string::npos);
  // Alone, a diverging run is an error.
  const Result alone = run(
      "train --config " + kTiny + " --set optimizer.lr=1.0e+30 --set training.grad_clip=0 --out " + (d / "t").string(),
      d / "t1");
  expect_clean_error(alone, {"training loss is"});
  fs::remove_all(d);
}

TEST(ExperimentCompare, AFailingRunStopsTheComparisonWithItsError) {
  const fs::path d = scratch("fail");
  // Rank 9 on 32-wide matrices of a 1-layer model is fine; a target that matches
  // nothing is an error of that run's config, reported with its log.
  const Result r = run("compare --config " + kSweep + " --out " + (d / "o").string() +
                           " --set 'compare.methods[1].targets=[{match: nothing.*, method: full}]' --jobs 2",
                       d);
  expect_clean_error(r, {"nothing.*"});
  fs::remove_all(d);
}

TEST(ExperimentReport, TheScriptWritesTheRunsNumbersBetweenTheMarkers) {
  if (std::system("python3 --version > /dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  const fs::path d = scratch("report");
  const Result r = run("compare --jobs 2 --config " + kSweep + " --out " + (d / "o").string(), d / "l0");
  ASSERT_EQ(r.code, 0) << r.err;
  // A matched level that every seed of both methods reaches, whatever LibTorch's numbers
  // (head ends above the config's levels on some versions): just above the worst final
  // held-out B loss. The second compare reuses every finished run and only rewrites the
  // frontier at that level.
  double worst = 0;
  for (const auto& row : read_csv(d / "o" / "results.csv"))
    worst = std::max(worst, std::stod(row.at("eval_after_mean")) + 2 * std::stod(row.at("eval_after_sd")));
  const double level = std::ceil((worst + 0.02) * 100) / 100;
  const Result again = run("compare --jobs 2 --config " + kSweep + " --out " + (d / "o").string() +
                               fmt::format(" --set 'compare.levels=[{:.2f}]'", level),
                           d / "l1");
  ASSERT_EQ(again.code, 0) << again.err;
  ASSERT_NE(again.err.find("0 to train"), std::string::npos) << again.err;
  const fs::path doc = d / "doc.md";
  std::ofstream(doc) << "intro\n<!-- experiment:results:begin -->\nstale table\n<!-- experiment:results:end -->\n"
                     << "middle\n<!-- experiment:answers:begin -->\n<!-- experiment:answers:end -->\nend\n";
  const std::string script = std::string(GRADLORA_SOURCE_DIR) + "/scripts/experiment_report.py";
  const std::string cmd = "python3 " + script + " " + (d / "o").string() +
                          " --forgetting head,lora --additive head,lora" + " --write " + doc.string() + " > " +
                          (d / "py.out").string() + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(d / "py.out");
  const std::string text = slurp(doc);
  EXPECT_EQ(text.find("stale table"), std::string::npos) << text;
  std::string results = slurp(d / "o" / "results.md");
  while (!results.empty() && results.back() == '\n') results.pop_back();
  EXPECT_NE(text.find("<!-- experiment:results:begin -->\n" + results + "\n<!-- experiment:results:end -->"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.rfind("intro\n", 0), 0u);
  EXPECT_NE(text.find("\nmiddle\n"), std::string::npos);
  // The answer quotes the matched forgetting of frontier.csv (3 decimals) and the final losses of results.csv.
  int quoted = 0;
  for (const auto& row : read_csv(d / "o" / "frontier.csv")) {
    if (row.at("kind") != "chosen" || std::abs(std::stod(row.at("level")) - level) > 1e-9) continue;
    ASSERT_FALSE(row.at("mean").empty()) << "level " << level << " not reached by " << row.at("method");
    ++quoted;
    const std::string v = fmt::format("{:.3f} ± {:.3f}", std::stod(row.at("mean")), std::stod(row.at("sd")));
    EXPECT_NE(text.find(v), std::string::npos) << v << " not in " << text;
  }
  EXPECT_EQ(quoted, 2) << "frontier.csv: one chosen row per method at level " << level;
  for (const auto& row : read_csv(d / "o" / "results.csv")) {
    const std::string v =
        fmt::format("{:.4f} ± {:.4f}", std::stod(row.at("eval_after_mean")), std::stod(row.at("eval_after_sd")));
    EXPECT_NE(text.find(v), std::string::npos) << v << " not in " << text;
  }
  EXPECT_NE(text.find("**Is `head` as good as `lora`?** No, it learns less"), std::string::npos) << text;
  EXPECT_TRUE(fs::exists(d / "o" / "report.md"));
  // A file without the blocks is an error, not a silent no-op.
  std::ofstream(d / "plain.md") << "no markers\n";
  EXPECT_NE(std::system(("python3 " + script + " " + (d / "o").string() + " --write " + (d / "plain.md").string() +
                         " > /dev/null 2>&1")
                            .c_str()),
            0);
  // A method the run does not have is an error naming the option, the value and the methods it has.
  EXPECT_NE(std::system(("python3 " + script + " " + (d / "o").string() + " --forgetting nope,lora > " +
                         (d / "bad.out").string() + " 2>&1")
                            .c_str()),
            0);
  const std::string bad = slurp(d / "bad.out");
  EXPECT_NE(bad.find("--forgetting nope,lora: no method 'nope'"), std::string::npos) << bad;
  EXPECT_NE(bad.find("it has lora, head"), std::string::npos) << bad;
  fs::remove_all(d);
}

TEST(ExperimentCompare, CtrlCStopsEveryRunWithACheckpointAndTheNextCompareResumes) {
  const fs::path d = scratch("compare_sigint");
  const fs::path out = d / "o";
  const pid_t pid =
      start({"compare", "--jobs", "2", "--config", kSweep, "--out", out.string(), "--set", "training.steps=1500",
             "--set", "training.eval_every=500", "--set", "compare.methods[0].lrs=[0.0001, 0.02, 0.001]"},
            d / "log.txt");
  ASSERT_GE(pid, 0);
  // Three sweep runs, two at a time: the first two under way (their step-0
  // evaluations are written), the third waiting.
  const fs::path a = out / "sweep" / "lora" / "lr0.0001" / "seed0", b = out / "sweep" / "lora" / "lr0.02" / "seed0";
  for (int i = 0; i < 1200 && !(fs::exists(a / "metrics.csv") && fs::exists(b / "metrics.csv")); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(fs::exists(a / "metrics.csv") && fs::exists(b / "metrics.csv")) << slurp(d / "log.txt");
  ::kill(pid, SIGINT);
  int status = 0;
  bool ended = false;
  for (int i = 0; i < 600 && !ended; ++i) {  // 30 s at most
    ended = ::waitpid(pid, &status, WNOHANG) == pid;
    if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!ended) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL() << "compare did not end within 30 s of Ctrl-C: " << slurp(d / "log.txt");
  }
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 130) << slurp(d / "log.txt");
  // Each run stopped after a step and wrote its checkpoint; no reported run was started.
  EXPECT_TRUE(fs::exists(a / "checkpoint.pt")) << slurp(a / "train.log");
  EXPECT_TRUE(fs::exists(b / "checkpoint.pt")) << slurp(b / "train.log");
  EXPECT_FALSE(fs::exists(out / "sweep" / "lora" / "lr0.001"));  // the waiting one was not started
  EXPECT_FALSE(fs::exists(out / "lora" / "seed1"));
  // The next compare (the same settings) resumes them from their checkpoints
  // and runs to the end.
  const Result r = run("compare --jobs 2 --config " + kSweep + " --out " + out.string() +
                           " --set training.steps=1500 --set training.eval_every=500" +
                           " --set 'compare.methods[0].lrs=[0.0001, 0.02, 0.001]'",
                       d / "l1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(slurp(a / "train.log").find("resuming from step"), std::string::npos) << slurp(a / "train.log");
  fs::remove_all(d);
}
