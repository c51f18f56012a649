// One training run (`gradlora train`) and the dry run (`gradlora inspect`).
#include "trainer.h"

#include "data.h"
#include "language_model.h"
#include "memory.h"
#include "pretrain_cache.h"
#include "ranks.h"
#include "run_files.h"
#include "run_loop.h"

#include <gradlora/adapter.h>
#include <gradlora/checkpoint.h>
#include <gradlora/distributed.h>
#include <gradlora/gradlora.h>
#include <gradlora/jit.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <sstream>

namespace gradlora::app {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kCheckpointFormat = 1;

// --------------------------------------------------------- the selection

Config optimizer_config(const YAML::Node& tree) {
  Config cfg = Config::from_yaml_string(to_yaml(tree));
  cfg.log_report = false;
  return cfg;
}

}  // namespace

// at::set_num_threads, and the same for OpenBLAS when LibTorch uses it: its
// own worker threads would otherwise compete with LibTorch's (looked up at
// run time, so there is no link dependency on OpenBLAS).
void set_threads(int64_t n) {
  at::set_num_threads(static_cast<int>(n));
  using SetThreads = void (*)(int);
  if (void* f = ::dlsym(RTLD_DEFAULT, "openblas_set_num_threads")) {
    reinterpret_cast<SetThreads>(f)(static_cast<int>(n));
  }
}

std::string inspect_text(const Settings& s, const YAML::Node& tree) {
  Config cfg = optimizer_config(tree);
  if (!s.model.torchscript()) check_memory(s, /*training=*/false);  // before the model exists
  const std::unique_ptr<LanguageModel> model = open_model(s, 0);
  LowRankOptimizer opt(model->named_parameters(), cfg);
  return "model: " + model->describe() + "\n" + opt.report().to_string() + "\n";
}

std::string data_text(const Settings& s) {
  std::string out;
  auto one = [&](const CorpusSettings& c) {
    Corpus corpus = load_corpus(c, s.base_dir, s.model.context);
    const std::string unit = c.format == "bytes" ? "bytes" : c.format + " tokens";
    const bool val = corpus.validation.numel() > 0;
    out += fmt::format("{}: {} files, {} {} ({} training, {}{} held out)\n", c.key, corpus.files.size(),
                       corpus.total_tokens(), unit, corpus.train.numel(),
                       val ? fmt::format("{} validation, ", corpus.validation.numel()) : "", corpus.heldout.numel());
    for (const auto& f : corpus.files) {
      out += val ? fmt::format("  {:>8}  {:>7}  {:>7}  {}\n", f.tokens, f.validation_tokens, f.heldout_tokens, f.path)
                 : fmt::format("  {:>8}  {:>7}  {}\n", f.tokens, f.heldout_tokens, f.path);
    }
  };
  if (s.data.has_pretrain) one(s.data.pretrain);
  one(s.data.finetune);
  if (s.data.has_reference) one(s.data.reference);
  return out;
}

namespace {

/// <out>/adapter: the PEFT adapter of the `lora` parameters, written into a
/// temporary folder and renamed, so a failure leaves no half-written adapter.
void write_adapter(const LowRankOptimizer& opt, const LanguageModel& model, const Settings& s,
                   const std::string& out_dir) {
  if (!has_adapter_parameters(opt)) return;
  const fs::path dst = fs::path(out_dir) / "adapter";
  const fs::path tmp = fs::path(out_dir) / fmt::format("adapter.tmp.{}", static_cast<long>(::getpid()));
  fs::remove_all(tmp);
  AdapterOptions ao;
  ao.embedding_modules = model.embedding_modules();
  if (s.model.torchscript()) ao.base_model_name_or_path = s.model.path;
  try {
    const AdapterExport x = export_adapter(opt, tmp.string(), ao);
    if (!x.skipped.empty()) {
      spdlog::warn("adapter: {} trained parameter(s) are not LoRA factors and are not in it: {} (model.pt has them)",
                   x.skipped.size(), fmt::join(x.skipped, ", "));
    }
    fs::remove_all(dst);
    fs::rename(tmp, dst);
    spdlog::info("PEFT adapter of {} module(s): {}", x.modules.size(), dst.string());
  } catch (const AdapterError& e) {
    fs::remove_all(tmp);
    spdlog::warn("no adapter written: {}", e.what());
  }
}

}  // namespace

RunSummary train_run(const Settings& s, const YAML::Node& tree, const RunOptions& o) {
  // Before the data, the sampler and the model: sizes that cannot fit are one
  // clear error naming the key, not an allocation failure somewhere inside.
  // (The estimate follows the built-in model; a TorchScript model is the user's.)
  if (!s.model.torchscript()) check_memory(s);
  set_threads(s.training.threads);
  const TrainingSettings& t = s.training;
  const uint64_t seed = tree["seed"] ? tree["seed"].as<uint64_t>() : 0;
  Config cfg = optimizer_config(tree);
  // The optimizer clips (exact in fused mode too, where no full gradient reaches .grad):
  // training.grad_clip sets its max_grad_norm unless the config sets that key itself.
  if (cfg.max_grad_norm && tree["training"] && tree["training"]["grad_clip"]) {
    throw ConfigError(fmt::format(
        "config keys 'training.grad_clip' ({}) and 'max_grad_norm' ({}) both set the gradient clip of fine-tuning; "
        "keep one",
        t.grad_clip, *cfg.max_grad_norm));
  }
  if (!cfg.max_grad_norm && t.grad_clip > 0) cfg.max_grad_norm = t.grad_clip;

  RunSummary sum;
  sum.method = o.method;
  sum.seed = seed;
  sum.hash = result_hash(tree, s);
  const std::string ckpt_path = (fs::path(o.out_dir) / "checkpoint.pt").string();
  if (o.resume) {
    if (auto done = read_summary(o.out_dir); done && done->hash == sum.hash && !done->interrupted) {
      spdlog::info("{} seed {}: already complete in {}", o.method, seed, o.out_dir);
      return *done;
    }
  }

  // Data first: a bad corpus fails before any training.
  Corpus fine = load_corpus(s.data.finetune, s.base_dir, s.model.context);
  std::optional<Corpus> pre, ref;
  if (s.data.has_pretrain) pre = load_corpus(s.data.pretrain, s.base_dir, s.model.context);
  if (s.data.has_reference) ref = load_corpus(s.data.reference, s.base_dir, s.model.context);
  const int64_t window = s.model.context + 1;
  BatchSampler sampler(fine, window, t.batch, seed);
  if (pre) BatchSampler check(*pre, window, t.batch, t.pretrain.seed);  // batch vs data, before pre-training
  const torch::Tensor held = eval_windows(fine.heldout, window, t.eval_windows);
  // The validation split (choosing learning rates) is evaluated next to the held-out one.
  torch::Tensor val_held;
  if (fine.validation.numel() > 0) val_held = eval_windows(fine.validation, window, t.eval_windows);
  // Forgetting: the loss on what the model knew before, data.reference or the
  // held-out part of data.pretrain.
  torch::Tensor base_held;
  if (ref) {
    base_held = eval_windows(ref->heldout, window, t.eval_windows);
  } else if (pre) {
    base_held = eval_windows(pre->heldout, window, t.eval_windows);
  }
  const bool has_base = base_held.defined();
  const std::string base_corpus = ref ? "reference" : pre ? "pre-training" : "";
  const std::string unit = fine.format == "bytes" ? "bytes" : "tokens";
  spdlog::info("{}: {} files, {} {}; {} windows of {} {} per epoch, {} held-out windows", fine.key, fine.files.size(),
               fine.total_tokens(), unit, sampler.windows_per_epoch(), window, unit, held.size(0));

  const std::unique_ptr<LanguageModel> model_ptr = open_model(s, seed);
  LanguageModel& model = *model_ptr;
  spdlog::info("model: {}", model.describe());
  // Every token id of every corpus must be one the model has.
  const std::string model_name = s.model.torchscript() ? fmt::format("model '{}'", s.model.path) : s.model.type;
  for (const Corpus* c : {&fine, pre ? &*pre : nullptr, ref ? &*ref : nullptr}) {
    if (c) check_vocabulary(*c, model.vocab(), model_name);
  }
  // Building the optimizer validates the selection before the (long) pre-training.
  model.prepare_gradients(nullptr);
  { LowRankOptimizer probe(model.named_parameters(), cfg); }
  fs::create_directories(o.out_dir);  // the inputs are good

  // Data-parallel run (gradlora train --nproc N, or RANK/WORLD_SIZE from a launcher).
  Ranks d = join_ranks(t);
  if (pre) {
    // Rank 0 pre-trains (or finds the cache); the others receive its weights
    // when DataParallel broadcasts them, below.
    std::string path;
    if (d.main()) {
      const std::string cache = t.cache_dir.empty() ? (fs::path(o.out_dir) / "cache").string() : t.cache_dir;
      path = ensure_pretrained(s, *pre, cache);
    }
    if (!d.agree_on_rank0(!path.empty() || !d.main())) {
      sum.interrupted = true;
      spdlog::warn("interrupted during pre-training: nothing was cached");
      return sum;
    }
    if (d.main()) load_pretrained(model, path);
  }
  LowRankOptimizer opt(model.named_parameters(), cfg);
  model.prepare_gradients(&opt);  // no gradients for frozen parameters of a TorchScript model
  std::vector<double> base_lr;
  for (auto& g : opt.param_groups()) base_lr.push_back(g.options().get_lr());
  const SelectionReport& rep = opt.report();
  sum.total_params = rep.total_params;
  sum.trainable = rep.total_trainable;
  sum.state_bytes = rep.total_state_bytes;
  sum.adamw_state_bytes = rep.total_adamw_state_bytes;

  // Subspace diagnostics (`diagnostics: true`): per low-rank parameter the sum and count of
  // energy_kept since the last evaluation, and the last projector overlap. Kept in the
  // checkpoint, so a resumed run writes the rows an uninterrupted one does.
  struct Diag {
    std::string name;
    double sum = 0;
    int64_t n = 0;
    double overlap = kNaN;
  };
  std::vector<Diag> diag;
  for (const SubspaceStats& st : opt.subspace_stats()) diag.push_back({st.name});
  auto diag_text = [&] {
    std::string out;
    for (const Diag& x : diag) out += fmt::format("{}\t{:a}\t{}\t{:a}\n", x.name, x.sum, x.n, x.overlap);
    return out;
  };

  int64_t start = 0, loss_n = 0;
  double elapsed0 = 0, loss_sum = 0;
  if (o.resume) {
    if (!fs::exists(ckpt_path)) {
      throw SettingsError(fmt::format("--resume: no checkpoint '{}' to resume from", ckpt_path));
    }
    // The library's checkpoint, with the trainer's own values as extras: checked
    // before anything is restored.
    const CheckpointExtras x = read_checkpoint_extras(ckpt_path);
    auto extra = [&](const char* key) -> const c10::IValue& {
      auto it = x.find(key);
      if (it == x.end()) {
        throw SettingsError(
            fmt::format("--resume: checkpoint '{}' has no '{}': not written by this trainer", ckpt_path, key));
      }
      return it->second;
    };
    if (extra("trainer_format").toInt() != kCheckpointFormat) {
      throw SettingsError(fmt::format("--resume: checkpoint '{}': trainer format {} is not supported (expected {})",
                                      ckpt_path, extra("trainer_format").toInt(), kCheckpointFormat));
    }
    if (extra("hash").toStringRef() != sum.hash) {
      throw SettingsError(fmt::format(
          "--resume: checkpoint '{}' was written with different settings (hash {} here {}); use another --out or "
          "start afresh without --resume",
          ckpt_path, extra("hash").toStringRef(), sum.hash));
    }
    start = extra("step").toInt();
    sum.rows = parse_metrics_csv(extra("metrics").toStringRef());
    loss_sum = extra("loss_sum").toDouble();
    loss_n = extra("loss_n").toInt();
    if (auto it = x.find("diagnostics"); it != x.end()) {
      std::istringstream in(it->second.toStringRef());
      for (std::string line; std::getline(in, line);) {
        std::istringstream f(line);
        std::string name, sum, n, overlap;
        std::getline(f, name, '\t');
        std::getline(f, sum, '\t');
        std::getline(f, n, '\t');
        std::getline(f, overlap, '\t');
        for (Diag& d : diag) {
          if (d.name == name)
            d = {name, std::strtod(sum.c_str(), nullptr), std::stoll(n), std::strtod(overlap.c_str(), nullptr)};
        }
      }
    }
    load_checkpoint(opt, model.state_module(), ckpt_path);
    if (!sum.rows.empty()) elapsed0 = sum.rows.back().elapsed_s;
    spdlog::info("{} seed {}: resuming from step {} ({})", o.method, seed, start, ckpt_path);
  }

  std::unique_ptr<DataParallel> dp;
  if (d.pg) {
    // Same config on every rank (checked), parameters and factors from rank 0,
    // projected gradients averaged in every step(). Rank 0 evaluates and writes
    // files while the others wait at the next all-reduce: allow for it.
    DataParallelOptions dpo;
    dpo.timeout = kRankWait;
    dp = make_data_parallel(opt, d.pg, dpo);
    if (d.main()) {
      spdlog::info("data-parallel: {} ranks, {} windows each per step; {} all-reduced per step instead of {}", d.world,
                   t.batch / d.world, human_bytes(dp->expected_step_bytes()), human_bytes(full_gradient_bytes(opt)));
      if (cfg.max_grad_norm) {
        spdlog::warn(
            "gradient clip {}: each rank clips the gradient of its own shard before the ranks average, so the "
            "run differs from a single-process one (training.grad_clip=0 makes them equal)",
            *cfg.max_grad_norm);
      }
    }
  }

  const auto t0 = Clock::now();
  const std::string title = fmt::format("{} (seed {})", o.method, seed);
  auto on_eval = [&](int64_t step, double train_loss, double lr) {
    if (!d.main()) return;
    MetricRow r;
    r.step = step;
    r.lr = lr;
    r.train_loss = train_loss;
    r.eval_loss = evaluate(model, held, t.batch);
    if (has_base) r.base_eval_loss = evaluate(model, base_held, t.batch);
    if (val_held.defined()) r.val_loss = evaluate(model, val_held, t.batch);
    r.tokens = step * t.batch * s.model.context;
    r.elapsed_s = elapsed0 + seconds_since(t0);
    for (Diag& x : diag) {
      r.extra.emplace_back("energy_kept:" + x.name, x.n > 0 ? x.sum / static_cast<double>(x.n) : kNaN);
      if (std::isfinite(x.overlap)) r.extra.emplace_back("overlap:" + x.name, x.overlap);
      x.sum = 0;
      x.n = 0;
    }
    sum.rows.push_back(r);
    spdlog::info("{} seed {} step {}: train {} held-out {:.4f}{}{}", o.method, seed, step, fmt_num(train_loss),
                 r.eval_loss, std::isfinite(r.val_loss) ? fmt::format(" validation {:.4f}", r.val_loss) : "",
                 has_base ? fmt::format(" {} held-out {:.4f}", base_corpus, r.base_eval_loss) : "");
    write_file_atomic((fs::path(o.out_dir) / "metrics.csv").string(), metrics_csv(sum.rows));
    if (!diag.empty()) {
      write_file_atomic((fs::path(o.out_dir) / "subspace.svg").string(), subspace_svg(sum.rows, title));
    }
    write_file_atomic((fs::path(o.out_dir) / "loss.svg").string(),
                      loss_svg(sum.rows, title, base_corpus, fine.format == "bytes" ? "byte" : "token"));
  };
  auto on_checkpoint = [&](int64_t step, double running_sum, int64_t running_n) {
    if (!d.main()) return;  // every rank holds the same weights and state
    save_checkpoint(opt, model.state_module(), ckpt_path,
                    {{"trainer_format", c10::IValue(kCheckpointFormat)},
                     {"hash", c10::IValue(sum.hash)},
                     {"step", c10::IValue(step)},
                     {"metrics", c10::IValue(metrics_csv(sum.rows))},
                     {"loss_sum", c10::IValue(running_sum)},
                     {"loss_n", c10::IValue(running_n)},
                     {"diagnostics", c10::IValue(diag_text())}});
  };

  LoopSpec L;
  L.label = fmt::format("{} seed {}", o.method, seed);
  L.device = model.device();
  L.steps = t.steps;
  L.start = start;
  L.batch = t.batch;
  L.warmup = t.warmup;
  L.schedule = t.schedule;
  L.min_lr_ratio = t.min_lr_ratio;
  L.grad_clip = 0;  // the optimizer's max_grad_norm clips
  L.eval_every = t.eval_every;
  L.log_every = t.log_every;
  L.checkpoint_every = t.checkpoint_every;
  L.halt_after = t.halt_after;
  L.base_lr = base_lr;
  L.loss_sum = loss_sum;
  L.loss_n = loss_n;
  L.rank = d.rank;
  L.world = d.world;
  if (d.pg) L.sync = [&d](double& loss, bool& stop) { d.sync(loss, stop); };
  if (!diag.empty()) {
    L.after_step = [&] {
      const std::vector<SubspaceStats> stats = opt.subspace_stats();
      for (size_t i = 0; i < stats.size() && i < diag.size(); ++i) {
        if (std::isfinite(stats[i].energy_kept)) {
          diag[i].sum += stats[i].energy_kept;
          ++diag[i].n;
        }
        if (std::isfinite(stats[i].overlap)) diag[i].overlap = stats[i].overlap;
      }
    };
  }
  LoopResult r;
  try {
    r = run_loop(model, opt, sampler, L, on_eval, on_checkpoint);
  } catch (const DivergedError& e) {
    // Kept as a result (a learning-rate sweep reaches such rates): its summary
    // says so and the run is not retried with the same settings.
    sum.diverged = true;
    sum.error = e.what();
    if (!sum.rows.empty()) {
      sum.eval_before = sum.rows.front().eval_loss;
      sum.base_before = sum.rows.front().base_eval_loss;
      sum.steps_done = sum.rows.back().step;
    }
    if (!d.main()) return sum;
    spdlog::warn("{}", e.what());
    write_file_atomic((fs::path(o.out_dir) / "summary.json").string(), summary_json(sum).dump(2) + "\n");
    std::error_code ec;
    fs::remove(ckpt_path, ec);
    return sum;
  }

  sum.steps_done = r.steps_done;
  sum.interrupted = r.interrupted;
  sum.step_ms = r.step_ms;
  sum.opt_ms = r.opt_ms;
  if (!sum.rows.empty()) {
    sum.eval_before = sum.rows.front().eval_loss;
    sum.base_before = sum.rows.front().base_eval_loss;
    sum.eval_after = sum.rows.back().eval_loss;
    sum.base_after = sum.rows.back().base_eval_loss;
    sum.val_after = sum.rows.back().val_loss;
  }
  if (!d.main()) return sum;  // rank 0 writes the results
  if (r.interrupted) {
    spdlog::warn("{} seed {}: stopped at step {}; checkpoint {} (continue with --resume)", o.method, seed, r.steps_done,
                 ckpt_path);
    return sum;
  }
  model.save((fs::path(o.out_dir) / "model.pt").string());
  write_adapter(opt, model, s, o.out_dir);
  write_file_atomic((fs::path(o.out_dir) / "summary.json").string(), summary_json(sum).dump(2) + "\n");
  std::error_code ec;
  fs::remove(ckpt_path, ec);  // the run is complete: model.pt and summary.json stand for it
  return sum;
}

}  // namespace gradlora::app
