// The pre-training cache.
#include "pretrain_cache.h"

#include "run_loop.h"
#include "trainer.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <sstream>

namespace gradlora::app {

namespace fs = std::filesystem;

// ----------------------------------------------------------- pre-training

void load_pretrained(LanguageModel& model, const std::string& path) {
  torch::serialize::InputArchive a;
  a.load_from(path, model.device());
  builtin(model)->load(a);
}

/// The pre-trained model's file in the cache, training it first when missing.
/// Returns "" when interrupted.
std::string ensure_pretrained(const Settings& s, const Corpus& corpus, const std::string& cache_dir) {
  const TrainingSettings& t = s.training;
  const ModelSettings& m = s.model;
  const std::string key =
      fmt::format(
          "format 1; model {} {} {} {} {} {}; data {} {}; pretrain {} {} {} {} {}; batch {} threads {} clip {} "
          "min_lr_ratio {}",
          m.type, m.layers, m.d_model, m.heads, m.context, m.mlp_ratio, fmt::join(s.data.pretrain.files, "|"),
          s.data.pretrain.holdout, t.pretrain.steps, t.pretrain.lr, t.pretrain.weight_decay, t.pretrain.warmup,
          t.pretrain.seed, t.batch, t.threads, t.grad_clip, t.min_lr_ratio) +
      // Byte corpora keep the key they had before token formats existed.
      (s.data.pretrain.format == "bytes" ? "" : "; format " + s.data.pretrain.format);
  std::string path = (fs::path(cache_dir) / fmt::format("pretrained-{}.pt", stable_hash(key))).string();
  if (fs::exists(path)) {
    spdlog::info("pre-trained model: cached {}", path);
    return path;
  }
  fs::create_directories(cache_dir);
  spdlog::info("pre-training on {} ({} tokens, {} steps); cached afterwards in {}", corpus.key, corpus.total_tokens(),
               t.pretrain.steps, path);
  const std::unique_ptr<LanguageModel> model = make_builtin_model(s, t.pretrain.seed);
  torch::optim::AdamW opt(builtin(*model)->parameters(),
                          torch::optim::AdamWOptions(t.pretrain.lr).weight_decay(t.pretrain.weight_decay));
  BatchSampler sampler(corpus, s.model.context + 1, t.batch, t.pretrain.seed);
  const torch::Tensor held = eval_windows(corpus.heldout, s.model.context + 1, t.eval_windows);
  LoopSpec L;
  L.label = "pre-train";
  L.device = model->device();
  L.steps = t.pretrain.steps;
  L.batch = t.batch;
  L.warmup = t.pretrain.warmup;
  L.schedule = "cosine";
  L.min_lr_ratio = t.min_lr_ratio;
  L.grad_clip = t.grad_clip;
  L.eval_every = std::max<int64_t>(1, t.pretrain.steps / 4);
  L.log_every = t.log_every;
  L.checkpoint_every = std::numeric_limits<int64_t>::max();
  L.base_lr = {t.pretrain.lr};
  auto on_eval = [&](int64_t step, double train_loss, double) {
    spdlog::info("pre-train step {}: train loss {}, held-out loss {:.4f}", step, fmt_num(train_loss),
                 evaluate(*model, held, t.batch));
  };
  LoopResult r = run_loop(*model, opt, sampler, L, on_eval, [](int64_t, double, int64_t) {});
  if (r.interrupted) return "";
  model->save(path);
  return path;
}

}  // namespace gradlora::app
