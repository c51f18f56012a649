// gradlora — command-line trainer: train, inspect, compare.
#include "settings.h"
#include "trainer.h"

#include <gradlora/config.h>
#include <gradlora/distributed.h>
#include <gradlora/method.h>

#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace gradlora::app;

namespace {

int fail(const std::string& msg, int code) {
  const char* rank = gradlora::launched_distributed() ? std::getenv("RANK") : nullptr;
  std::fprintf(stderr, "gradlora: error: %s%s%s\n", rank ? "rank " : "", rank ? fmt::format("{}: ", rank).c_str() : "",
               msg.c_str());
  return code;
}

/// Runs `body`, turning exceptions into a one-line error and an exit status
/// (2: bad settings or config; 1: anything else).
template <typename Body>
int guarded(Body&& body) {
  try {
    return body();
  } catch (const SettingsError& e) {
    return fail(e.what(), 2);
  } catch (const gradlora::ConfigError& e) {
    return fail(e.what(), 2);
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace(), 1);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  }
}

std::vector<std::pair<std::string, std::string>> parse_sets(const std::vector<std::string>& sets) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& s : sets) out.push_back(split_override(s));
  return out;
}

const MethodSpec& find_method(const Settings& s, const std::string& name) {
  if (!s.has_compare) throw SettingsError(fmt::format("--method '{}': the config has no compare.methods", name));
  std::string known;
  for (const auto& m : s.compare.methods) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw SettingsError(fmt::format("--method '{}': no such method in compare.methods (known: {})", name, known));
}

/// `train`: one run of the top-level optimizer, or of the compare.methods entry
/// `method`. `report` prints the one-line summary (rank 0 of a data-parallel run).
int run_train(const Settings& s, const std::string& method, const std::string& out, bool resume, bool report,
              const std::string& label) {
  RunOptions o;
  o.out_dir = out;
  o.resume = resume;
  YAML::Node tree = s.root;
  if (!method.empty()) {
    tree = method_tree(s, find_method(s, method), s.seed);
    o.method = method;
  }
  if (!label.empty()) o.method = label;
  const RunSummary r = train_run(parse_settings(tree, s.base_dir, s.source), tree, o);
  if (r.interrupted) return 130;
  if (r.diverged) return fail(r.error, 1);
  if (!report) return 0;
  std::printf("%s: %lld steps, held-out loss %.4f -> %.4f", o.method.c_str(), static_cast<long long>(r.steps_done),
              r.eval_before, r.eval_after);
  if (std::isfinite(r.base_before))
    std::printf(", %s held-out loss %.4f -> %.4f", s.data.has_reference ? "reference" : "pre-training", r.base_before,
                r.base_after);
  std::printf("; %.1f ms/step; outputs in %s\n", r.step_ms, out.c_str());
  return 0;
}

std::string default_out(const std::string& config, bool quick) {
  return (fs::path("out") / (fs::path(config).stem().string() + (quick ? "-quick" : ""))).string();
}

}  // namespace

int main(int argc, char** argv) {
  auto logger = spdlog::stderr_color_mt("gradlora");
  logger->set_pattern("[%H:%M:%S %^%l%$] %v");
  spdlog::set_default_logger(logger);

  CLI::App app{
      "gradlora: low-rank training from the optimizer side. Trains a byte-level Transformer language model "
      "with gradlora::LowRankOptimizer."};
  app.require_subcommand(1);
  std::string config, out, method;
  std::vector<std::string> sets;
  bool resume = false, quick = false, fresh = false, data = false;
  int nproc = 1, jobs = 1;
  std::string label, base_dir;

  auto* train = app.add_subcommand("train", "train one model (pre-training once, cached; then fine-tuning)");
  auto* inspect = app.add_subcommand("inspect", "dry run: which parameter gets which method, rank and state");
  auto* compare = app.add_subcommand("compare", "run every method of compare.methods for every seed; one table");
  for (auto* sub : {train, inspect, compare}) {
    sub->add_option("--config,-c", config, "YAML file (optimizer config plus model/data/training/compare)");
    sub->add_option("--set", sets, "override a config key before parsing, e.g. training.steps=10 (repeatable)")
        ->type_name("KEY=VALUE");
  }
  train->get_option("--config")->required();
  inspect->get_option("--config")->required();
  compare->get_option("--config")->default_val("configs/experiment.yaml");
  for (auto* sub : {train, compare}) {
    sub->add_option("--out,-o", out, "output folder (default: out/<config name>)");
    sub->add_flag("--quick", quick, "apply the config's compare.quick overrides (a short version of the run)");
  }
  train->add_flag("--resume", resume, "continue from <out>/checkpoint.pt");
  train
      ->add_option("--nproc", nproc,
                   "data-parallel training in N processes on this machine (Gloo on loopback); each trains "
                   "training.batch/N windows of every batch")
      ->check(CLI::PositiveNumber);
  train->add_option("--method,-m", method, "train this entry of compare.methods instead of the top-level optimizer");
  inspect->add_option("--method,-m", method, "show only this entry of compare.methods");
  inspect->add_flag("--data", data, "also list the corpora: files, sizes, held-out bytes");
  compare->add_flag("--fresh", fresh, "train every run again instead of reusing finished ones");
  compare
      ->add_option("--jobs,-j", jobs,
                   "train this many runs at a time, each in its own process (its log in <run>/train.log)")
      ->check(CLI::PositiveNumber);
  train->add_option("--label", label, "name of the run in logs and summary.json (compare sets it)");
  train->add_option("--base-dir", base_dir, "resolve relative data paths against this folder (compare sets it)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  // One rank of a data-parallel job (RANK and WORLD_SIZE set, by --nproc or by
  // a launcher such as torchrun): logs below warnings carry its rank only.
  if (gradlora::launched_distributed()) {
    const std::string rank = std::getenv("RANK");
    logger->set_pattern(fmt::format("[%H:%M:%S rank {} %^%l%$] %v", rank));
    if (rank != "0") logger->set_level(spdlog::level::warn);
  }

  return guarded([&]() -> int {
    Settings s = load_settings(config, parse_sets(sets), quick);
    if (!base_dir.empty()) s = parse_settings(s.root, fs::absolute(base_dir).string(), s.source);
    if (out.empty()) out = default_out(config, quick);
    if (*inspect) {
      if (data) std::fputs(data_text(s).c_str(), stdout);
      if (!method.empty()) {
        std::fputs(inspect_text(s, method_tree(s, find_method(s, method), s.seed)).c_str(), stdout);
      } else if (s.has_compare && !s.root["targets"]) {
        for (const auto& m : s.compare.methods) {
          std::fputs(fmt::format("== method: {}\n", m.name).c_str(), stdout);
          std::fputs(inspect_text(s, method_tree(s, m, s.seed)).c_str(), stdout);
        }
      } else {
        std::fputs(inspect_text(s, s.root).c_str(), stdout);
      }
      return 0;
    }
    install_interrupt_handler();
    if (*train && nproc > 1) {
      if (gradlora::launched_distributed()) {
        return fail("--nproc: this process is already one rank of a job (RANK and WORLD_SIZE are set); drop --nproc",
                    2);
      }
      // Checked here so that an error is printed once, not by every rank.
      const YAML::Node tree = method.empty() ? s.root : method_tree(s, find_method(s, method), s.seed);
      const int64_t batch = parse_settings(tree, s.base_dir, s.source).training.batch;
      const gradlora::Config cfg = gradlora::Config::from_yaml_string(to_yaml(tree));  // ConfigError names the key
      const std::string refusal = gradlora::data_parallel_refusal(cfg);
      if (!refusal.empty()) throw SettingsError(fmt::format("{} (--nproc {})", refusal, nproc));
      if (batch % nproc != 0) {
        throw SettingsError(
            fmt::format("training.batch: {} windows cannot be split evenly over --nproc {}; use a multiple of {}",
                        batch, nproc, nproc));
      }
      // Forked before any torch work: each rank re-enters main's train path
      // with RANK/WORLD_SIZE set (rendezvous through a FileStore).
      return gradlora::launch_local(nproc, [&](int rank, int) {
        logger->set_pattern(fmt::format("[%H:%M:%S rank {} %^%l%$] %v", rank));
        if (rank != 0) logger->set_level(spdlog::level::warn);
        return guarded([&] { return run_train(s, method, out, resume, rank == 0, label); });
      });
    }
    if (*train) return run_train(s, method, out, resume, true, label);
    if (gradlora::launched_distributed()) {
      return fail(
          "compare runs in a single process (RANK and WORLD_SIZE are set); train one method data-parallel "
          "with `gradlora train --method NAME` instead",
          2);
    }
    return run_compare(s, out, fresh, jobs);
  });
}
