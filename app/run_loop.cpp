// The training loop: progress display, interruption, schedule, evaluation.
#include "run_loop.h"

#include "trainer.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
#include <cstdio>

#include <unistd.h>

namespace gradlora::app {

namespace {

std::atomic<bool> g_stop{false};

extern "C" void on_sigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
}

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
    const auto t = static_cast<int64_t>(std::llround(s));
    return fmt::format("{}:{:02d}", t / 60, t % 60);
  }
  std::string label_;
  int64_t total_, log_every_;
  bool tty_;
  bool drawn_ = false;
  Clock::time_point last_draw_{};
};

}  // namespace

void install_interrupt_handler() { std::signal(SIGINT, on_sigint); }
bool stop_requested() { return g_stop.load(); }

// ------------------------------------------------------------ the loop

double lr_factor(int64_t step, int64_t steps, int64_t warmup, const std::string& schedule, double min_ratio) {
  if (step < warmup) return static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == "constant" || steps <= warmup) return 1.0;
  const double t = static_cast<double>(step - warmup) / static_cast<double>(steps - warmup);
  return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * t));
}

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

double evaluate(LanguageModel& model, const torch::Tensor& windows, int64_t batch) {
  torch::NoGradGuard guard;
  model.set_training(false);
  const torch::Device device = model.device();
  double sum = 0;
  for (int64_t i = 0; i < windows.size(0); i += batch) {
    torch::Tensor w = windows.slice(0, i, std::min(windows.size(0), i + batch)).to(device);
    sum += model.loss(w).item<double>() * static_cast<double>(w.size(0));
  }
  model.set_training(true);
  return sum / static_cast<double>(windows.size(0));
}

LoopResult run_loop(LanguageModel& model, torch::optim::Optimizer& opt, BatchSampler& sampler, const LoopSpec& L,
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
  model.set_training(true);
  for (int64_t step = L.start; step < L.steps; ++step) {
    if (L.sync ? stop_agreed : g_stop.load()) break;
    const double f = L.lr_at ? L.lr_at(step) : lr_factor(step, L.steps, L.warmup, L.schedule, L.min_lr_ratio);
    for (size_t g = 0; g < base_lr.size(); ++g) opt.param_groups()[g].options().set_lr(base_lr[g] * f);
    lr = base_lr.empty() ? 0.0 : base_lr[0] * f;
    const auto t0 = Clock::now();
    torch::Tensor x = sampler.batch(step);
    if (L.world > 1) x = x.slice(0, L.rank * L.batch / L.world, (L.rank + 1) * L.batch / L.world);
    x = x.to(L.device);
    model.zero_grad();
    torch::Tensor loss = model.loss(x);
    loss.backward();
    if (L.grad_clip > 0) torch::nn::utils::clip_grad_norm_(model.named_parameters().values(), L.grad_clip);
    const auto t1 = Clock::now();
    opt.step();
    const double os = seconds_since(t1);
    if (L.after_step) L.after_step();
    double lv = loss.item<double>();
    if (L.sync) {
      stop_agreed = g_stop.load();
      L.sync(lv, stop_agreed);
    }
    const double ss = seconds_since(t0);
    if (!std::isfinite(lv)) {
      throw DivergedError(
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
      if (L.finish && L.finish()) {
        r.finished_early = true;
        break;
      }
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
  if (r.steps_done < L.steps && !r.finished_early) {
    r.interrupted = true;
    on_checkpoint(r.steps_done, loss_sum, loss_n);
  }
  return r;
}

}  // namespace gradlora::app
