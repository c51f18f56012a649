// The pre-training cache.
#include "pretrain_cache.h"

#include "run_loop.h"
#include "trainer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace gradlora::app {

namespace fs = std::filesystem;

// ----------------------------------------------------------- pre-training

void load_pretrained(LanguageModel& model, const std::string& path) {
  torch::serialize::InputArchive a;
  a.load_from(path, model.device());
  builtin(model)->load(a);
}

std::string pretrain_curve_path(const std::string& model_path) {
  return (fs::path(model_path).replace_extension(".csv")).string();
}

int64_t plateau_step(const std::vector<std::pair<int64_t, double>>& hist, int64_t window, double min_delta) {
  if (hist.empty()) return -1;
  const int64_t now = hist.back().first;
  double best_now = std::numeric_limits<double>::infinity(), best_then = best_now;
  bool any_then = false;
  for (const auto& [step, v] : hist) {
    best_now = std::min(best_now, v);
    if (step <= now - window) {
      best_then = std::min(best_then, v);
      any_then = true;
    }
  }
  return any_then && best_then - best_now < min_delta ? now : -1;
}

std::string ensure_pretrained(const Settings& s, const Corpus& corpus, const std::string& cache_dir) {
  const TrainingSettings& t = s.training;
  const ModelSettings& m = s.model;
  const PretrainSettings& P = t.pretrain;
  std::string key =
      fmt::format(
          "format 1; model {} {} {} {} {} {}; data {} {}; pretrain {} {} {} {} {}; batch {} threads {} clip {} "
          "min_lr_ratio {}",
          m.type, m.layers, m.d_model, m.heads, m.context, m.mlp_ratio, fmt::join(s.data.pretrain.files, "|"),
          s.data.pretrain.holdout, P.steps, P.lr, P.weight_decay, P.warmup, P.seed, t.batch, t.threads, t.grad_clip,
          t.min_lr_ratio) +
      // Byte corpora keep the key they had before token formats existed.
      (s.data.pretrain.format == "bytes" ? "" : "; format " + s.data.pretrain.format);
  // Keys of the earlier settings stay as they were (their cache files stay valid).
  if (s.data.pretrain.validation > 0) key += fmt::format("; validation {}", s.data.pretrain.validation);
  if (P.has_plateau) {
    key += fmt::format("; plateau {} {} {} {} eval_windows {}", P.plateau.eval_every, P.plateau.window,
                       P.plateau.min_delta, P.plateau.cooldown, t.eval_windows);
  }
  std::string path = (fs::path(cache_dir) / fmt::format("pretrained-{}.pt", stable_hash(key))).string();
  if (fs::exists(path)) {
    spdlog::info("pre-trained model: cached {}", path);
    return path;
  }
  fs::create_directories(cache_dir);
  spdlog::info("pre-training on {} ({} tokens, {}{} steps); cached afterwards in {}", corpus.key, corpus.total_tokens(),
               P.has_plateau ? "until the plateau, at most " : "", P.steps, path);
  const std::unique_ptr<LanguageModel> model = make_builtin_model(s, P.seed);
  torch::optim::AdamW opt(builtin(*model)->parameters(), torch::optim::AdamWOptions(P.lr).weight_decay(P.weight_decay));
  BatchSampler sampler(corpus, s.model.context + 1, t.batch, P.seed);
  const torch::Tensor held = eval_windows(corpus.heldout, s.model.context + 1, t.eval_windows);
  torch::Tensor val;
  if (corpus.validation.numel() > 0) val = eval_windows(corpus.validation, s.model.context + 1, t.eval_windows);
  LoopSpec L;
  L.label = "pre-train";
  L.device = model->device();
  L.steps = P.steps;
  L.batch = t.batch;
  L.warmup = P.warmup;
  L.schedule = "cosine";
  L.min_lr_ratio = t.min_lr_ratio;
  L.grad_clip = t.grad_clip;
  L.eval_every = P.has_plateau ? P.plateau.eval_every : std::max<int64_t>(1, P.steps / 4);
  L.log_every = t.log_every;
  L.checkpoint_every = std::numeric_limits<int64_t>::max();
  L.base_lr = {P.lr};
  // One row per evaluation; its phase says what the schedule was doing: "schedule" (no
  // plateau rule: warm-up and cosine decay), "warmup", "constant", "plateau" (the last
  // constant-lr evaluation, where the rule found the plateau), "budget" (the same, where
  // training.pretrain.steps ran out first), "cooldown".
  std::vector<std::string> rows, phases;
  std::vector<std::pair<int64_t, double>> hist;
  bool cooling = false;
  auto on_eval = [&](int64_t step, double train_loss, double lr) {
    const double test = evaluate(*model, held, t.batch);
    const double v = val.defined() ? evaluate(*model, val, t.batch) : kNaN;
    hist.emplace_back(step, v);
    rows.push_back(fmt::format("{},{},{},{},{}", step, fmt_num(lr), fmt_num(train_loss), fmt_num(v), fmt_num(test)));
    phases.emplace_back(!P.has_plateau ? "schedule" : cooling ? "cooldown" : step < P.warmup ? "warmup" : "constant");
    spdlog::info("pre-train step {}: train loss {}, validation {}, held-out {:.4f}", step, fmt_num(train_loss),
                 fmt_num(v), test);
  };
  auto no_checkpoint = [](int64_t, double, int64_t) {};
  const auto t0 = Clock::now();
  int64_t stop = -1;
  if (P.has_plateau) {
    const int64_t warmup = P.warmup;
    L.lr_at = [warmup](int64_t step) {
      return step < warmup ? static_cast<double>(step + 1) / static_cast<double>(warmup) : 1.0;
    };
    L.finish = [&] {
      stop = plateau_step(hist, P.plateau.window, P.plateau.min_delta);
      return stop >= 0;
    };
  }
  LoopResult r = run_loop(*model, opt, sampler, L, on_eval, no_checkpoint);
  if (r.interrupted) return "";
  if (P.has_plateau) {
    const int64_t at = r.steps_done;
    if (!hist.empty() && hist.back().first == at) phases.back() = stop >= 0 ? "plateau" : "budget";
    cooling = true;
    if (stop >= 0) {
      spdlog::info(
          "pre-train: plateau at step {} (best validation loss improved by less than {} over the last {} "
          "steps); cooling down over {} steps",
          at, P.plateau.min_delta, P.plateau.window, P.plateau.cooldown);
    } else {
      spdlog::warn(
          "pre-train: no plateau within training.pretrain.steps = {} (the best validation loss still "
          "improved by {} or more over the last {} steps); cooling down anyway",
          P.steps, P.plateau.min_delta, P.plateau.window);
    }
    if (P.plateau.cooldown > 0) {
      LoopSpec C = L;
      C.start = at;
      C.steps = at + P.plateau.cooldown;
      C.finish = nullptr;
      const double len = static_cast<double>(P.plateau.cooldown);
      const int64_t end = C.steps;
      C.lr_at = [end, len](int64_t step) { return static_cast<double>(end - step) / len; };
      LoopResult c = run_loop(*model, opt, sampler, C, on_eval, no_checkpoint);
      if (c.interrupted) return "";
    }
  }
  std::string curve = "step,lr,train_loss,val_loss,test_loss,phase\n";
  for (size_t i = 0; i < rows.size(); ++i) curve += rows[i] + "," + phases[i] + "\n";
  write_file_atomic(pretrain_curve_path(path), curve);
  model->save(path);
  spdlog::info("pre-training took {:.0f} s", seconds_since(t0));
  return path;
}

}  // namespace gradlora::app
