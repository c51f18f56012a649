#pragma once
/// \file trainer.h
/// The `gradlora` trainer: one run (pre-train once, cached; fine-tune with a
/// LowRankOptimizer; evaluate; checkpoint; metrics.csv and loss.svg), the
/// selection report of `inspect`, and the multi-method `compare`.

#include "settings.h"

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::app {

/// One line of metrics.csv (written at every evaluation).
struct MetricRow {
  int64_t step = 0;
  double lr = 0;
  double train_loss = std::numeric_limits<double>::quiet_NaN();      ///< mean since the previous row
  double eval_loss = std::numeric_limits<double>::quiet_NaN();       ///< held-out fine-tuning corpus
  double base_eval_loss = std::numeric_limits<double>::quiet_NaN();  ///< data.reference, or held-out data.pretrain
  double val_loss = std::numeric_limits<double>::quiet_NaN();        ///< validation split of the fine-tuning corpus
  int64_t tokens = 0;
  double elapsed_s = 0;
  /// Subspace diagnostics (config key `diagnostics: true`), one column each:
  /// `energy_kept:<parameter>` (mean over the steps since the previous row) and
  /// `overlap:<parameter>` (at the last projector refresh so far), in column order.
  std::vector<std::pair<std::string, double>> extra;
};

/// What a finished (or interrupted) run reports; also summary.json.
struct RunSummary {
  std::string method;
  uint64_t seed = 0;
  std::string hash;  ///< of the settings that determine the result
  int64_t steps_done = 0;
  bool interrupted = false;
  /// The training loss became NaN or infinite (too high a learning rate): the run
  /// stopped there; `error` says where. Its summary is kept, so a sweep does not retry it.
  bool diverged = false;
  std::string error;
  double eval_before = std::numeric_limits<double>::quiet_NaN();  ///< held-out B loss at step 0
  double eval_after = std::numeric_limits<double>::quiet_NaN();
  double base_before = std::numeric_limits<double>::quiet_NaN();  ///< held-out A loss at step 0
  double base_after = std::numeric_limits<double>::quiet_NaN();
  double val_after = std::numeric_limits<double>::quiet_NaN();  ///< validation B loss at the end
  int64_t total_params = 0, trainable = 0, state_bytes = 0, adamw_state_bytes = 0;
  double step_ms = 0, opt_ms = 0;  ///< mean wall time of a training step / of opt.step() alone
  std::vector<MetricRow> rows;
  double forgetting() const { return base_after - base_before; }
};

/// Where a run writes and whether it continues from a checkpoint.
struct RunOptions {
  std::string out_dir;
  bool resume = false;
  std::string method = "train";  ///< label in logs and summary.json
};

/// SIGINT (Ctrl-C) asks the running loop to stop after the current step and
/// write a checkpoint; a second Ctrl-C kills the process.
void install_interrupt_handler();
/// True once Ctrl-C (or training.halt_after) asked the loop to stop.
bool stop_requested();

/// at::set_num_threads(n), and openblas_set_num_threads(n) when LibTorch uses OpenBLAS.
void set_threads(int64_t n);

/// Trains one model with the optimizer config of `tree` (the YAML of one run).
/// Throws SettingsError / gradlora::ConfigError on bad input.
RunSummary train_run(const Settings& s, const YAML::Node& tree, const RunOptions& o);

/// The selection table of `inspect`: per parameter method, rank, trainable
/// values and optimizer state against full AdamW, with totals.
std::string inspect_text(const Settings& s, const YAML::Node& tree);

/// The corpora: every file with its size and held-out bytes.
std::string data_text(const Settings& s);

/// Runs every method of `compare:` for every seed under `out_dir`, reusing
/// finished runs with the same settings (and resuming interrupted ones),
/// prints one table and writes results.md, results.csv and compare.svg.
/// Methods with `lrs` are first trained at each rate on compare.sweep_seeds
/// (<out>/sweep/<method>/lr<rate>/seed<k>); the rate with the lowest final
/// validation loss on the fine-tuning corpus is the one reported on
/// compare.seeds (sweep.md, sweep.csv). With compare.levels: the forgetting at
/// those held-out losses (frontier.md, frontier.csv, frontier.svg). The
/// pre-training curve goes to pretrain.csv and pretrain.svg.
/// `fresh` trains every run again; `parallel` > 1 trains that many runs at a
/// time, each in a child process (`gradlora train`, its log in <run>/train.log).
/// Returns the exit code (0, or 130 when interrupted).
int run_compare(const Settings& s, const std::string& out_dir, bool fresh = false, int parallel = 1);

/// Writes `text` to `path` atomically (temporary file in the same folder,
/// flushed, renamed).
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace gradlora::app
