// One training run, inspect and compare.
#include "trainer.h"

#include "data.h"
#include "model.h"
#include "svg.h"

#include <gradlora/checkpoint.h>
#include <gradlora/distributed.h>
#include <gradlora/gradlora.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

namespace fs = std::filesystem;

namespace gradlora::app {

namespace {

std::atomic<bool> g_stop{false};

extern "C" void on_sigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
}

constexpr int64_t kCheckpointFormat = 1;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string fmt_num(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : ""; }

double parse_num(const std::string& s) { return s.empty() ? kNaN : std::stod(s); }

// --------------------------------------------------------------- progress

/// A one-line progress bar on a terminal; periodic log lines otherwise.
class Progress {
 public:
  Progress(std::string label, int64_t total, int64_t log_every)
      : label_(std::move(label)), total_(total), log_every_(log_every), tty_(::isatty(STDERR_FILENO) == 1) {}

  void update(int64_t step, double loss, double tokens_per_s, double eta_s) {
    if (tty_) {
      const auto now = Clock::now();
      if (step != total_ && std::chrono::duration<double>(now - last_draw_).count() < 0.1) return;
      last_draw_ = now;
      const int width = 28;
      const int fill = static_cast<int>(width * step / std::max<int64_t>(1, total_));
      std::fprintf(stderr, "\r%s [%s%s] %lld/%lld  loss %.4f  %.1fk tok/s  ETA %s   ", label_.c_str(),
                   std::string(static_cast<size_t>(fill), '#').c_str(),
                   std::string(static_cast<size_t>(width - fill), '.').c_str(), static_cast<long long>(step),
                   static_cast<long long>(total_), loss, tokens_per_s / 1000.0, eta(eta_s).c_str());
      std::fflush(stderr);
      drawn_ = true;
    } else if (step % log_every_ == 0 || step == total_) {
      spdlog::info("{} step {}/{}  loss {:.4f}  {:.1f}k tok/s  ETA {}", label_, step, total_, loss,
                   tokens_per_s / 1000.0, eta(eta_s));
    }
  }
  /// Ends the bar's line so that log lines start on a fresh one.
  void break_line() {
    if (tty_ && drawn_) {
      std::fprintf(stderr, "\n");
      drawn_ = false;
    }
  }
  ~Progress() { break_line(); }

 private:
  static std::string eta(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    const auto t = static_cast<int64_t>(s + 0.5);
    return fmt::format("{}:{:02d}", t / 60, t % 60);
  }
  std::string label_;
  int64_t total_, log_every_;
  bool tty_;
  bool drawn_ = false;
  Clock::time_point last_draw_{};
};

// ------------------------------------------------------------ the loop

double lr_factor(int64_t step, int64_t steps, int64_t warmup, const std::string& schedule, double min_ratio) {
  if (step < warmup) return static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant" || steps <= warmup) return 1.0;
  const double t = static_cast<double>(step - warmup) / static_cast<double>(steps - warmup);
  return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * t));
}

torch::Device model_device(CharTransformer& model) { return model->parameters().front().device(); }

/// `training.device` as a torch::Device; a clear error when CUDA is asked for and absent.
torch::Device training_device(const TrainingSettings& t) {
  const torch::Device device(t.device);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw SettingsError(
        fmt::format("training.device: '{}' asked for, but CUDA is not available here (LibTorch "
                    "built without CUDA, or no GPU); use cpu",
                    t.device));
  }
  return device;
}

/// The built-in model, initialised from `seed`, on training.device.
CharTransformer build_model(const Settings& s, uint64_t seed) {
  CharTransformer model = make_model(s.model, seed);
  model->to(training_device(s.training));
  return model;
}

double evaluate(CharTransformer& model, const torch::Tensor& windows, int64_t batch) {
  torch::NoGradGuard guard;
  double sum = 0;
  for (int64_t i = 0; i < windows.size(0); i += batch) {
    torch::Tensor w = windows.slice(0, i, std::min(windows.size(0), i + batch)).to(model_device(model));
    sum += model->loss(w).item<double>() * static_cast<double>(w.size(0));
  }
  return sum / static_cast<double>(windows.size(0));
}

struct LoopSpec {
  std::string label;
  int64_t steps = 0, start = 0, batch = 0, warmup = 0, eval_every = 0, log_every = 0;
  int64_t checkpoint_every = 0, halt_after = 0;
  std::string schedule;
  double min_lr_ratio = 0, grad_clip = 0;
  /// Learning rate of each parameter group before any scheduling (from the config:
  /// a restored optimizer holds the scheduled value of its last step).
  std::vector<double> base_lr;
  /// Running train-loss sum and count since the last evaluation (restored on resume).
  double loss_sum = 0;
  int64_t loss_n = 0;
  /// Data-parallel runs: this rank trains rows [rank·batch/world, (rank+1)·batch/world)
  /// of every batch; only rank 0 draws the progress bar.
  int rank = 0, world = 1;
  /// Where the model lives: every batch is moved there.
  torch::Device device = torch::kCPU;
  /// Data-parallel runs: called after every step with this rank's loss and stop
  /// request; replaces them by the mean loss over the ranks and by whether any
  /// rank asked to stop, so that every rank stops after the same step.
  std::function<void(double& loss, bool& stop)> sync;
};

struct LoopResult {
  int64_t steps_done = 0;
  bool interrupted = false;
  double step_ms = 0, opt_ms = 0;
};

/// The training loop shared by pre-training and fine-tuning. `on_eval(step,
/// train_loss, lr)` runs at step 0 (when starting fresh), every eval_every
/// steps and at the end; `on_checkpoint(step)` every checkpoint_every steps and
/// when stopped early, with the running train-loss sum and count.
LoopResult run_loop(CharTransformer& model, torch::optim::Optimizer& opt, BatchSampler& sampler, const LoopSpec& L,
                    const std::function<void(int64_t, double, double)>& on_eval,
                    const std::function<void(int64_t, double, int64_t)>& on_checkpoint) {
  const std::vector<double>& base_lr = L.base_lr;
  TORCH_INTERNAL_ASSERT(base_lr.size() == opt.param_groups().size());
  Progress bar(L.label, L.steps, L.log_every);
  LoopResult r;
  r.steps_done = L.start;
  if (L.start == 0) {
    bar.break_line();
    on_eval(0, kNaN, 0.0);
  }
  double loss_sum = L.loss_sum, step_s = 0, opt_s = 0, lr = 0;
  int64_t loss_n = L.loss_n, timed = 0, this_run = 0;
  const auto t_start = Clock::now();
  const double tokens_per_step = static_cast<double>(L.batch * (sampler.batch(0).size(1) - 1));
  const bool show = L.rank == 0;
  bool stop_agreed = false;  // data-parallel runs stop on the agreed request only
  model->train();
  for (int64_t step = L.start; step < L.steps; ++step) {
    if (L.sync ? stop_agreed : g_stop.load()) break;
    const double f = lr_factor(step, L.steps, L.warmup, L.schedule, L.min_lr_ratio);
    for (size_t g = 0; g < base_lr.size(); ++g) opt.param_groups()[g].options().set_lr(base_lr[g] * f);
    lr = base_lr.empty() ? 0.0 : base_lr[0] * f;
    const auto t0 = Clock::now();
    torch::Tensor x = sampler.batch(step);
    if (L.world > 1) x = x.slice(0, L.rank * L.batch / L.world, (L.rank + 1) * L.batch / L.world);
    x = x.to(L.device);
    model->zero_grad();
    torch::Tensor loss = model->loss(x);
    loss.backward();
    if (L.grad_clip > 0) torch::nn::utils::clip_grad_norm_(model->parameters(), L.grad_clip);
    const auto t1 = Clock::now();
    opt.step();
    const double os = seconds_since(t1);
    double lv = loss.item<double>();
    if (L.sync) {
      stop_agreed = g_stop.load();
      L.sync(lv, stop_agreed);
    }
    const double ss = seconds_since(t0);
    if (!std::isfinite(lv)) {
      throw std::runtime_error(
          fmt::format("{}: the training loss is {} at step {} (lower the learning rate?)", L.label, lv, step + 1));
    }
    loss_sum += lv;
    ++loss_n;
    if (++this_run > 3) {  // the first steps warm caches and allocators
      step_s += ss;
      opt_s += os;
      ++timed;
    }
    const int64_t done = step + 1;
    r.steps_done = done;
    const double rate = tokens_per_step * static_cast<double>(this_run) / std::max(1e-9, seconds_since(t_start));
    const double eta = static_cast<double>(L.steps - done) * seconds_since(t_start) / static_cast<double>(this_run);
    if (show) bar.update(done, lv, rate, eta);
    if (done % L.eval_every == 0 || done == L.steps) {
      bar.break_line();
      on_eval(done, loss_sum / static_cast<double>(loss_n), lr);
      loss_sum = 0;
      loss_n = 0;
    }
    if (L.halt_after > 0 && this_run >= L.halt_after && done < L.steps) {
      g_stop.store(true);
      stop_agreed = true;  // the same step on every rank
    }
    const bool stopping = L.sync ? stop_agreed : g_stop.load();
    if (done % L.checkpoint_every == 0 && done < L.steps && !stopping) on_checkpoint(done, loss_sum, loss_n);
  }
  bar.break_line();
  if (timed > 0) {
    r.step_ms = 1e3 * step_s / static_cast<double>(timed);
    r.opt_ms = 1e3 * opt_s / static_cast<double>(timed);
  }
  if (r.steps_done < L.steps) {
    r.interrupted = true;
    on_checkpoint(r.steps_done, loss_sum, loss_n);
  }
  return r;
}

// ------------------------------------------------------- files of a run

std::string metrics_csv(const std::vector<MetricRow>& rows) {
  std::string out = "step,lr,train_loss,eval_loss,base_eval_loss,tokens,elapsed_s\n";
  for (const auto& r : rows) {
    out += fmt::format("{},{},{},{},{},{},{:.3f}\n", r.step, fmt_num(r.lr), fmt_num(r.train_loss), fmt_num(r.eval_loss),
                       fmt_num(r.base_eval_loss), r.tokens, r.elapsed_s);
  }
  return out;
}

std::vector<MetricRow> parse_metrics_csv(const std::string& text) {
  std::vector<MetricRow> rows;
  std::stringstream ss(text);
  std::string line;
  std::getline(ss, line);  // header
  while (std::getline(ss, line)) {
    if (line.empty()) continue;
    std::vector<std::string> f;
    std::stringstream ls(line);
    std::string cell;
    while (std::getline(ls, cell, ',')) f.push_back(cell);
    while (f.size() < 7) f.emplace_back();
    MetricRow r;
    r.step = std::stoll(f[0]);
    r.lr = parse_num(f[1]);
    r.train_loss = parse_num(f[2]);
    r.eval_loss = parse_num(f[3]);
    r.base_eval_loss = parse_num(f[4]);
    r.tokens = f[5].empty() ? 0 : std::stoll(f[5]);
    r.elapsed_s = parse_num(f[6]);
    rows.push_back(r);
  }
  return rows;
}

std::string loss_svg(const std::vector<MetricRow>& rows, const std::string& title, bool has_base) {
  Series train, held, base;
  train.label = "train loss (fine-tuning corpus)";
  held.label = "held-out loss (fine-tuning corpus)";
  base.label = "held-out loss (pre-training corpus)";
  base.dashed = true;
  for (const auto& r : rows) {
    if (std::isfinite(r.train_loss)) {
      train.x.push_back(static_cast<double>(r.step));
      train.y.push_back(r.train_loss);
    }
    held.x.push_back(static_cast<double>(r.step));
    held.y.push_back(r.eval_loss);
    base.x.push_back(static_cast<double>(r.step));
    base.y.push_back(r.base_eval_loss);
  }
  Panel p{"loss", "step", "cross-entropy (nats per byte)", {train, held}};
  if (has_base) p.series.push_back(base);
  return svg_chart({p}, title);
}

nlohmann::json summary_json(const RunSummary& s) {
  nlohmann::json j;
  j["method"] = s.method;
  j["seed"] = s.seed;
  j["hash"] = s.hash;
  j["steps_done"] = s.steps_done;
  j["interrupted"] = s.interrupted;
  auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  j["eval_before"] = num(s.eval_before);
  j["eval_after"] = num(s.eval_after);
  j["base_before"] = num(s.base_before);
  j["base_after"] = num(s.base_after);
  j["forgetting"] = num(s.forgetting());
  j["total_params"] = s.total_params;
  j["trainable"] = s.trainable;
  j["state_bytes"] = s.state_bytes;
  j["adamw_state_bytes"] = s.adamw_state_bytes;
  j["step_ms"] = s.step_ms;
  j["opt_ms"] = s.opt_ms;
  return j;
}

std::optional<RunSummary> read_summary(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "summary.json");
  if (!in) return std::nullopt;
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    RunSummary s;
    auto num = [&](const char* k) { return j[k].is_number() ? j[k].get<double>() : kNaN; };
    s.method = j["method"].get<std::string>();
    s.seed = j["seed"].get<uint64_t>();
    s.hash = j["hash"].get<std::string>();
    s.steps_done = j["steps_done"].get<int64_t>();
    s.interrupted = j["interrupted"].get<bool>();
    s.eval_before = num("eval_before");
    s.eval_after = num("eval_after");
    s.base_before = num("base_before");
    s.base_after = num("base_after");
    s.total_params = j["total_params"].get<int64_t>();
    s.trainable = j["trainable"].get<int64_t>();
    s.state_bytes = j["state_bytes"].get<int64_t>();
    s.adamw_state_bytes = j["adamw_state_bytes"].get<int64_t>();
    s.step_ms = num("step_ms");
    s.opt_ms = num("opt_ms");
    std::ifstream m(fs::path(dir) / "metrics.csv");
    std::stringstream ss;
    ss << m.rdbuf();
    s.rows = parse_metrics_csv(ss.str());
    return s;
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable: the run is simply done again
  }
}

/// The settings that decide a run's result (logging and stopping knobs removed).
std::string result_hash(const YAML::Node& tree) {
  YAML::Node t = YAML::Clone(tree);
  t.remove("compare");
  if (t["training"] && t["training"].IsMap()) {
    for (const char* k : {"halt_after", "log_every", "checkpoint_every", "cache_dir"}) t["training"].remove(k);
  }
  return stable_hash(to_yaml(t));
}

// ----------------------------------------------------------- pre-training

void save_model(CharTransformer& model, const std::string& path) {
  torch::serialize::OutputArchive a;
  model->save(a);
  std::ostringstream bytes;
  a.save_to(bytes);
  write_file_atomic(path, bytes.str());
}

void load_model(CharTransformer& model, const std::string& path) {
  torch::serialize::InputArchive a;
  a.load_from(path, model_device(model));
  model->load(a);
}

/// The pre-trained model's file in the cache, training it first when missing.
/// Returns "" when interrupted.
std::string ensure_pretrained(const Settings& s, const Corpus& corpus, const std::string& cache_dir) {
  const TrainingSettings& t = s.training;
  const ModelSettings& m = s.model;
  const std::string key = fmt::format(
      "format 1; model {} {} {} {} {} {}; data {} {}; pretrain {} {} {} {} {}; batch {} threads {} clip {} "
      "min_lr_ratio {}",
      m.type, m.layers, m.d_model, m.heads, m.context, m.mlp_ratio, fmt::join(s.data.pretrain.files, "|"),
      s.data.pretrain.holdout, t.pretrain.steps, t.pretrain.lr, t.pretrain.weight_decay, t.pretrain.warmup,
      t.pretrain.seed, t.batch, t.threads, t.grad_clip, t.min_lr_ratio);
  const std::string path = (fs::path(cache_dir) / fmt::format("pretrained-{}.pt", stable_hash(key))).string();
  if (fs::exists(path)) {
    spdlog::info("pre-trained model: cached {}", path);
    return path;
  }
  fs::create_directories(cache_dir);
  spdlog::info("pre-training on {} ({} bytes, {} steps); cached afterwards in {}", corpus.key, corpus.total_bytes(),
               t.pretrain.steps, path);
  CharTransformer model = build_model(s, t.pretrain.seed);
  torch::optim::AdamW opt(model->parameters(),
                          torch::optim::AdamWOptions(t.pretrain.lr).weight_decay(t.pretrain.weight_decay));
  BatchSampler sampler(corpus, s.model.context + 1, t.batch, t.pretrain.seed);
  const torch::Tensor held = eval_windows(corpus.heldout, s.model.context + 1, t.eval_windows);
  LoopSpec L;
  L.label = "pre-train";
  L.device = model_device(model);
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
                 evaluate(model, held, t.batch));
  };
  LoopResult r = run_loop(model, opt, sampler, L, on_eval, [](int64_t, double, int64_t) {});
  if (r.interrupted) return "";
  save_model(model, path);
  return path;
}

// --------------------------------------------------------- the selection

Config optimizer_config(const YAML::Node& tree) {
  Config cfg = Config::from_yaml_string(to_yaml(tree));
  cfg.log_report = false;
  return cfg;
}

/// at::set_num_threads, and the same for OpenBLAS when LibTorch uses it: its
/// own worker threads would otherwise compete with LibTorch's (looked up at
/// run time, so there is no link dependency on OpenBLAS).
void set_threads(int64_t n) {
  at::set_num_threads(static_cast<int>(n));
  using SetThreads = void (*)(int);
  if (void* f = ::dlsym(RTLD_DEFAULT, "openblas_set_num_threads")) {
    reinterpret_cast<SetThreads>(f)(static_cast<int>(n));
  }
}

// ------------------------------------------------------------ data-parallel

/// How long a rank waits for the others: rank 0 pre-trains (when the cache is
/// empty), evaluates and writes checkpoints while the other ranks wait.
constexpr std::chrono::milliseconds kRankWait = std::chrono::minutes(30);

/// This process's place in a data-parallel run; a single process has no group.
struct Ranks {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  int rank = 0, world = 1;
  /// Where the small control tensors travel: the training device under NCCL, else the CPU.
  torch::Device control = torch::kCPU;
  bool main() const { return rank == 0; }

  /// Rank 0's `value` on every rank (a barrier as well).
  bool agree_on_rank0(bool value) {
    if (!pg) return value;
    std::vector<torch::Tensor> flag{torch::full({1}, value ? 1.0 : 0.0, torch::kFloat64).to(control)};
    broadcast_tensors(*pg, flag, 0, kRankWait);
    return flag[0].cpu().item<double>() > 0.5;
  }

  /// Mean loss over the ranks; stop when any rank asks to.
  void sync(double& loss, bool& stop) {
    std::vector<torch::Tensor> v{torch::tensor({loss, stop ? 1.0 : 0.0}, torch::kFloat64).to(control)};
    allreduce_mean(*pg, v, 1 << 20, kRankWait);
    const torch::Tensor r = v[0].cpu();
    loss = r[0].item<double>();
    stop = r[1].item<double>() > 0.0;
  }
};

/// Joins the process group when this process is one rank of a job.
Ranks join_ranks(const TrainingSettings& t) {
  Ranks d;
  if (!launched_distributed()) return d;
  const torch::Device device = training_device(t);
  d.pg = process_group_from_env(kRankWait, device);
  if (d.pg->getBackendName() == "nccl") d.control = device;
  d.rank = d.pg->getRank();
  d.world = d.pg->getSize();
  if (t.batch % d.world != 0) {
    throw SettingsError(
        fmt::format("training.batch: {} windows cannot be split evenly over {} ranks (--nproc); use "
                    "a multiple of {}",
                    t.batch, d.world, d.world));
  }
  return d;
}

/// Bytes a data-parallel run would all-reduce per step if it averaged the full
/// gradient of every trainable parameter (what DDP does).
int64_t full_gradient_bytes(const LowRankOptimizer& opt) {
  int64_t b = 0;
  for (const auto& p : opt.report().params) {
    if (p.trainable > 0) b += p.adamw_state_bytes / 2;  // AdamW holds 2 tensors of its size
  }
  return b;
}

}  // namespace

// ------------------------------------------------------------------ API

void install_interrupt_handler() { std::signal(SIGINT, on_sigint); }
bool stop_requested() { return g_stop.load(); }

void write_file_atomic(const std::string& path, const std::string& text) {
  write_file_atomically(path, [&](const std::function<void(const void*, size_t)>& sink) {
    sink(text.data(), text.size());
  });
}

std::string inspect_text(const Settings& s, const YAML::Node& tree) {
  Config cfg = optimizer_config(tree);
  CharTransformer model = make_model(s.model, 0);
  LowRankOptimizer opt(model->named_parameters(), cfg);
  const ModelSettings& m = s.model;
  return fmt::format("model: {}, {} layers, d_model {}, {} heads, context {}, mlp_ratio {}\n", m.type, m.layers,
                     m.d_model, m.heads, m.context, m.mlp_ratio) +
         opt.report().to_string() + "\n";
}

std::string data_text(const Settings& s) {
  std::string out;
  auto one = [&](const CorpusSettings& c) {
    Corpus corpus = load_corpus(c, s.base_dir, s.model.context);
    out += fmt::format("{}: {} files, {} bytes ({} training, {} held out)\n", c.key, corpus.files.size(),
                       corpus.total_bytes(), corpus.train.numel(), corpus.heldout.numel());
    for (const auto& f : corpus.files) out += fmt::format("  {:>8}  {:>7}  {}\n", f.bytes, f.heldout_bytes, f.path);
  };
  if (s.data.has_pretrain) one(s.data.pretrain);
  one(s.data.finetune);
  return out;
}

RunSummary train_run(const Settings& s, const YAML::Node& tree, const RunOptions& o) {
  set_threads(s.training.threads);
  const TrainingSettings& t = s.training;
  const uint64_t seed = tree["seed"] ? tree["seed"].as<uint64_t>() : 0;
  Config cfg = optimizer_config(tree);

  RunSummary sum;
  sum.method = o.method;
  sum.seed = seed;
  sum.hash = result_hash(tree);
  fs::create_directories(o.out_dir);
  const std::string ckpt_path = (fs::path(o.out_dir) / "checkpoint.pt").string();
  if (o.resume) {
    if (auto done = read_summary(o.out_dir); done && done->hash == sum.hash && !done->interrupted) {
      spdlog::info("{} seed {}: already complete in {}", o.method, seed, o.out_dir);
      return *done;
    }
  }

  // Data first: a bad corpus fails before any training.
  Corpus fine = load_corpus(s.data.finetune, s.base_dir, s.model.context);
  std::optional<Corpus> pre;
  if (s.data.has_pretrain) pre = load_corpus(s.data.pretrain, s.base_dir, s.model.context);
  const int64_t window = s.model.context + 1;
  BatchSampler sampler(fine, window, t.batch, seed);
  if (pre) BatchSampler check(*pre, window, t.batch, t.pretrain.seed);  // batch vs data, before pre-training
  const torch::Tensor held = eval_windows(fine.heldout, window, t.eval_windows);
  torch::Tensor base_held;
  if (pre) base_held = eval_windows(pre->heldout, window, t.eval_windows);
  spdlog::info("{}: {} files, {} bytes; {} windows of {} bytes per epoch, {} held-out windows", fine.key,
               fine.files.size(), fine.total_bytes(), sampler.windows_per_epoch(), window, held.size(0));

  CharTransformer model = build_model(s, seed);
  // Building the optimizer validates the selection before the (long) pre-training.
  { LowRankOptimizer probe(model->named_parameters(), cfg); }

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
    if (d.main()) load_model(model, path);
  }
  LowRankOptimizer opt(model->named_parameters(), cfg);
  std::vector<double> base_lr;
  for (auto& g : opt.param_groups()) base_lr.push_back(g.options().get_lr());
  const SelectionReport& rep = opt.report();
  sum.total_params = rep.total_params;
  sum.trainable = rep.total_trainable;
  sum.state_bytes = rep.total_state_bytes;
  sum.adamw_state_bytes = rep.total_adamw_state_bytes;

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
        throw SettingsError(fmt::format("--resume: checkpoint '{}' has no '{}': not written by this trainer",
                                        ckpt_path, key));
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
    load_checkpoint(opt, *model, ckpt_path);
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
      if (t.grad_clip > 0) {
        spdlog::warn(
            "training.grad_clip {}: each rank clips the gradient of its own shard before the ranks "
            "average, so the run differs from a single-process one (training.grad_clip=0 makes them equal)",
            t.grad_clip);
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
    if (pre) r.base_eval_loss = evaluate(model, base_held, t.batch);
    r.tokens = step * t.batch * s.model.context;
    r.elapsed_s = elapsed0 + seconds_since(t0);
    model->train();
    sum.rows.push_back(r);
    spdlog::info("{} seed {} step {}: train {} held-out {:.4f}{}", o.method, seed, step, fmt_num(train_loss),
                 r.eval_loss, pre ? fmt::format(" pre-training held-out {:.4f}", r.base_eval_loss) : "");
    write_file_atomic((fs::path(o.out_dir) / "metrics.csv").string(), metrics_csv(sum.rows));
    write_file_atomic((fs::path(o.out_dir) / "loss.svg").string(), loss_svg(sum.rows, title, pre.has_value()));
  };
  auto on_checkpoint = [&](int64_t step, double running_sum, int64_t running_n) {
    if (!d.main()) return;  // every rank holds the same weights and state
    save_checkpoint(opt, *model, ckpt_path,
                    {{"trainer_format", c10::IValue(kCheckpointFormat)},
                     {"hash", c10::IValue(sum.hash)},
                     {"step", c10::IValue(step)},
                     {"metrics", c10::IValue(metrics_csv(sum.rows))},
                     {"loss_sum", c10::IValue(running_sum)},
                     {"loss_n", c10::IValue(running_n)}});
  };

  LoopSpec L;
  L.label = fmt::format("{} seed {}", o.method, seed);
  L.device = model_device(model);
  L.steps = t.steps;
  L.start = start;
  L.batch = t.batch;
  L.warmup = t.warmup;
  L.schedule = t.schedule;
  L.min_lr_ratio = t.min_lr_ratio;
  L.grad_clip = t.grad_clip;
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
  LoopResult r = run_loop(model, opt, sampler, L, on_eval, on_checkpoint);

  sum.steps_done = r.steps_done;
  sum.interrupted = r.interrupted;
  sum.step_ms = r.step_ms;
  sum.opt_ms = r.opt_ms;
  if (!sum.rows.empty()) {
    sum.eval_before = sum.rows.front().eval_loss;
    sum.base_before = sum.rows.front().base_eval_loss;
    sum.eval_after = sum.rows.back().eval_loss;
    sum.base_after = sum.rows.back().base_eval_loss;
  }
  if (!d.main()) return sum;  // rank 0 writes the results
  if (r.interrupted) {
    spdlog::warn("{} seed {}: stopped at step {}; checkpoint {} (continue with --resume)", o.method, seed, r.steps_done,
                 ckpt_path);
    return sum;
  }
  save_model(model, (fs::path(o.out_dir) / "model.pt").string());
  write_file_atomic((fs::path(o.out_dir) / "summary.json").string(), summary_json(sum).dump(2) + "\n");
  std::error_code ec;
  fs::remove(ckpt_path, ec);  // the run is complete: model.pt and summary.json stand for it
  return sum;
}

// ---------------------------------------------------------------- compare

namespace {

struct Stat {
  double mean = kNaN, sd = kNaN;
};

Stat stat(const std::vector<double>& v) {
  Stat s;  // sd stays NaN for a single value
  if (v.empty()) return s;
  double m = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  s.mean = m;
  if (v.size() > 1) {
    double q = 0;
    for (double x : v) q += (x - m) * (x - m);
    s.sd = std::sqrt(q / static_cast<double>(v.size() - 1));
  }
  return s;
}

std::string pm(const Stat& s, int digits) {
  if (!std::isfinite(s.mean)) return "-";
  if (!std::isfinite(s.sd)) return fmt::format("{:.{}f}", s.mean, digits);
  return fmt::format("{:.{}f} ± {:.{}f}", s.mean, digits, s.sd, digits);
}

}  // namespace

int run_compare(const Settings& s, const std::string& out_dir, bool fresh) {
  if (!s.has_compare) throw SettingsError("config key 'compare': missing (compare needs compare.methods)");
  fs::create_directories(out_dir);
  std::map<std::string, std::vector<RunSummary>> by_method;
  for (const MethodSpec& m : s.compare.methods) {
    for (uint64_t seed : s.compare.seeds) {
      const YAML::Node tree = method_tree(s, m, seed);
      const Settings rs = parse_settings(tree, s.base_dir, s.source);
      RunOptions o;
      o.method = m.name;
      o.out_dir = (fs::path(out_dir) / m.name / fmt::format("seed{}", seed)).string();
      YAML::Node tt = YAML::Clone(tree);
      // Every run shares one pre-trained model.
      if (rs.training.cache_dir.empty()) {
        apply_override(tt, "training.cache_dir", (fs::path(out_dir) / "cache").string());
      }
      const Settings rs2 = parse_settings(tt, s.base_dir, s.source);
      const std::string hash = result_hash(tt);
      auto done = read_summary(o.out_dir);
      o.resume = !fresh && ((done && done->hash == hash && !done->interrupted) ||
                            fs::exists(fs::path(o.out_dir) / "checkpoint.pt"));
      RunSummary r;
      try {
        r = train_run(rs2, tt, o);
      } catch (const SettingsError&) {
        if (!o.resume) throw;
        spdlog::warn("{}: the checkpoint does not fit the current settings; starting afresh", o.out_dir);
        o.resume = false;
        r = train_run(rs2, tt, o);
      }
      if (r.interrupted) return 130;
      by_method[m.name].push_back(r);
    }
  }

  // The table.
  std::string md =
      "| method | trainable | optimizer state | held-out loss B (after) | forgetting: Δ held-out loss A | step (ms) | "
      "opt.step (ms) |\n|---|---:|---:|---:|---:|---:|---:|\n";
  std::string csv =
      "method,seeds,trainable,state_bytes,adamw_state_bytes,eval_after_mean,eval_after_sd,forgetting_mean,"
      "forgetting_sd,step_ms_mean,step_ms_sd,opt_ms_mean,opt_ms_sd\n";
  std::string txt = fmt::format("{:<12} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}\n", "method", "trainable",
                                "opt. state", "held-out B", "forgetting (A)", "step ms", "opt ms");
  std::vector<Panel> panels(3);
  panels[0] = Panel{"learning: held-out loss on B", "fine-tuning step", "nats per byte", {}};
  panels[1] = Panel{"forgetting: held-out loss on A", "fine-tuning step", "nats per byte", {}};
  panels[2] = Panel{"trade-off (curves run right to left)", "held-out loss on B", "held-out loss on A", {}};
  panels[0].legend = "bottom-left";
  panels[1].legend = "top-left";
  int color = 0;
  for (const MethodSpec& m : s.compare.methods) {
    const auto& runs = by_method[m.name];
    if (runs.empty()) continue;
    std::vector<double> ev, fg, st, op;
    for (const auto& r : runs) {
      ev.push_back(r.eval_after);
      fg.push_back(r.forgetting());
      st.push_back(r.step_ms);
      op.push_back(r.opt_ms);
    }
    const Stat e = stat(ev), f = stat(fg), sp = stat(st), o = stat(op);
    const RunSummary& r0 = runs.front();
    txt += fmt::format("{:<12} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}\n", m.name, r0.trainable,
                       human_bytes(r0.state_bytes), pm(e, 4), pm(f, 4), pm(sp, 1), pm(o, 2));
    md += fmt::format("| {} | {} | {} | {} | {} | {} | {} |\n", m.name, r0.trainable, human_bytes(r0.state_bytes),
                      pm(e, 4), pm(f, 4), pm(sp, 1), pm(o, 2));
    csv += fmt::format("{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g}\n", m.name, runs.size(),
                       r0.trainable, r0.state_bytes, r0.adamw_state_bytes, e.mean, e.sd, f.mean, f.sd, sp.mean, sp.sd,
                       o.mean, o.sd);
    // Curves: mean ± sd over seeds at each evaluated step (runs share the schedule).
    Series sb, sa;
    sb.label = sa.label = m.name;
    sb.color = sa.color = color++;
    const size_t n = runs.front().rows.size();
    for (size_t i = 0; i < n; ++i) {
      std::vector<double> b, a;
      for (const auto& r : runs) {
        if (i < r.rows.size()) {
          b.push_back(r.rows[i].eval_loss);
          a.push_back(r.rows[i].base_eval_loss);
        }
      }
      const Stat bs = stat(b), as = stat(a);
      const double x = static_cast<double>(runs.front().rows[i].step);
      sb.x.push_back(x);
      sb.y.push_back(bs.mean);
      sb.band.push_back(bs.sd);
      sa.x.push_back(x);
      sa.y.push_back(as.mean);
      sa.band.push_back(as.sd);
    }
    Series trade;
    trade.label = m.name;
    trade.color = sb.color;
    trade.x = sb.y;
    trade.y = sa.y;
    panels[0].series.push_back(sb);
    panels[1].series.push_back(sa);
    panels[2].series.push_back(trade);
  }
  const bool has_base = s.data.has_pretrain;
  if (!has_base) panels.resize(1);
  std::string seeds;
  for (uint64_t sd : s.compare.seeds) seeds += (seeds.empty() ? "" : ", ") + std::to_string(sd);
  const std::string note = fmt::format(
      "mean ± sample std over seeds {}; losses in nats per byte; forgetting = held-out loss on the pre-training "
      "corpus after fine-tuning minus before; step = forward + backward + clip + opt.step ({} thread(s))",
      seeds, s.training.threads);
  std::fputs(txt.c_str(), stdout);
  std::fputs((note + "\n").c_str(), stdout);
  std::fflush(stdout);
  write_file_atomic((fs::path(out_dir) / "results.md").string(), md + "\n" + note + "\n");
  write_file_atomic((fs::path(out_dir) / "results.csv").string(), csv);
  write_file_atomic(
      (fs::path(out_dir) / "compare.svg").string(),
      svg_chart(panels, fmt::format("continual fine-tuning, mean ± sd over {} seed(s)", s.compare.seeds.size())));
  spdlog::info("wrote {}/results.md, results.csv, compare.svg", out_dir);
  return 0;
}

}  // namespace gradlora::app
