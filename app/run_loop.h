#pragma once
// The training loop shared by pre-training and fine-tuning, and the pieces it is
// made of: the learning-rate schedule, the device, evaluation.
#include "data.h"
#include "language_model.h"
#include "model.h"
#include "settings.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace gradlora::app {

inline const double kNaN = std::numeric_limits<double>::quiet_NaN();

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

/// A number for logs and CSV files ("" for NaN).
inline std::string fmt_num(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : ""; }

/// Warm-up, then cosine to min_ratio (or constant): the factor on the base lr at `step`.
double lr_factor(int64_t step, int64_t steps, int64_t warmup, const std::string& schedule, double min_ratio);
/// `training.device` as a torch::Device; a clear error when CUDA is asked for and absent.
torch::Device training_device(const TrainingSettings& t);
/// The built-in model, initialised from `seed`, on training.device.
CharTransformer build_model(const Settings& s, uint64_t seed);
/// Mean loss over `windows`, in batches of `batch`.
double evaluate(LanguageModel& model, const torch::Tensor& windows, int64_t batch);

/// The training loss became NaN or infinite.
class DivergedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

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
  /// Called after every optimizer step (the trainer's diagnostics); may be empty.
  std::function<void()> after_step;
  /// The lr factor at a step, instead of warm-up + `schedule`; may be empty.
  std::function<double(int64_t)> lr_at;
  /// Asked after every evaluation: true ends the loop there, as finished (not
  /// interrupted). May be empty.
  std::function<bool()> finish;
};

struct LoopResult {
  int64_t steps_done = 0;
  bool interrupted = false;
  bool finished_early = false;  ///< LoopSpec::finish ended it
  double step_ms = 0, opt_ms = 0;
};

/// The training loop shared by pre-training and fine-tuning. `on_eval(step,
/// train_loss, lr)` runs at step 0 (when starting fresh), every eval_every
/// steps and at the end; `on_checkpoint(step)` every checkpoint_every steps and
/// when stopped early, with the running train-loss sum and count. Throws
/// DivergedError when the training loss is not finite.
LoopResult run_loop(LanguageModel& model, torch::optim::Optimizer& opt, BatchSampler& sampler, const LoopSpec& L,
                    const std::function<void(int64_t, double, double)>& on_eval,
                    const std::function<void(int64_t, double, int64_t)>& on_checkpoint);

}  // namespace gradlora::app
