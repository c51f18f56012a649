#pragma once
/// \file optimizer.h
/// gradlora::LowRankOptimizer — LoRA-style low-rank training done from the
/// optimizer side: a drop-in replacement for torch::optim::AdamW that never
/// modifies the model. Method and maths: docs/methods.md.

#include <gradlora/config.h>
#include <gradlora/inner_rule.h>
#include <gradlora/projector.h>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>

#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gradlora {

/// Options of one parameter group: the learning rate the stock LibTorch
/// schedulers (StepLR, …) read and write.
struct LowRankOptions : public torch::optim::OptimizerCloneableOptions<LowRankOptions> {
  LowRankOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's (0) idiom needs
  TORCH_ARG(double, lr) = 1e-3;

 public:
  double get_lr() const override;
  void set_lr(const double lr) override;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Bytes in binary units for people ("42.0 KiB", "1.50 GiB").
std::string human_bytes(int64_t bytes);

/// One row of the selection report.
struct ParamReport {
  std::string name;
  std::vector<int64_t> shape;
  Method method;                  ///< frozen unless selected
  int64_t rank = 0;               ///< 0 for methods without one (full, frozen)
  int64_t numel = 0;              ///< elements of the parameter
  int64_t trainable = 0;          ///< values the inner rule updates
  int64_t state_bytes = 0;        ///< optimizer state: persistent_bytes + moment_bytes
  int64_t persistent_bytes = 0;   ///< factors, P0, … kept by the projector
  int64_t moment_bytes = 0;       ///< the inner rule's moments
  int64_t adamw_state_bytes = 0;  ///< what torch::optim::AdamW would hold (2·numel)
  int64_t allreduce_bytes = 0;    ///< bytes a data-parallel step all-reduces
  std::string note;
};

/// Subspace diagnostics of one low-rank parameter (Config::diagnostics).
struct SubspaceStats {
  std::string name;
  Method method;
  /// At the last step: ‖G restricted to the subspace the step can move the weight
  /// in‖² / ‖G‖² (NaN: not measured, e.g. fused mode with accumulated micro-batches).
  double energy_kept = std::numeric_limits<double>::quiet_NaN();
  /// At the last projector refresh (galore, apollo): ‖Q_newᵀ·Q_old‖²_F / r; NaN before one.
  double overlap = std::numeric_limits<double>::quiet_NaN();
  int64_t overlap_step = -1;  ///< the step of that refresh (1-based), -1 before one
};

/// What the optimizer does to each parameter, with totals (like PEFT's
/// print_trainable_parameters).
struct SelectionReport {
  std::vector<ParamReport> params;
  int64_t total_params = 0;
  int64_t total_trainable = 0;
  int64_t total_state_bytes = 0;
  int64_t total_adamw_state_bytes = 0;
  int64_t total_allreduce_bytes = 0;
  /// A fixed-width table with one row per parameter and a totals line.
  std::string to_string() const;
};

/// Low-rank training of the parameters a Config selects.
///
///     auto cfg = gradlora::Config::from_yaml_file("configs/lora.yaml");
///     gradlora::LowRankOptimizer opt(model->named_parameters(), cfg);
///     ... loss.backward(); opt.step(); opt.zero_grad();
///
/// Each selected parameter P gets a Projector (lora, random, additive, full)
/// and an InnerRule (LibTorch's SGD/Adam/AdamW) over the projector's factors.
/// One parameter group per target (target order, then `default`), so
/// per-target learning rates and the stock LR schedulers work.
class LowRankOptimizer : public torch::optim::Optimizer {
 public:
  /// Validates the config and the selection; throws ConfigError naming the
  /// key, parameter and value on any problem, before anything is changed.
  LowRankOptimizer(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters, Config config);
  ~LowRankOptimizer() override;

  /// One step for every selected parameter that has a gradient.
  torch::Tensor step(LossClosure closure = nullptr) override;

  /// Checkpoint everything (factors, inner state, counters, P0, groups' lr)
  /// keyed by parameter name. torch::save(opt, path) calls this.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Restores what save() wrote. Validates names, shapes, methods, ranks and
  /// the inner rule first; on any mismatch throws std::runtime_error listing
  /// them and leaves the optimizer unchanged.
  void load(torch::serialize::InputArchive& archive) override;

  /// Current factors (A n×r, B r×m) of a selected parameter.
  std::pair<torch::Tensor, torch::Tensor> factors(const std::string& name) const;
  /// Persistent tensors of one parameter: the projector's (A, B, P0, …) and the
  /// inner rule's state, prefixed "inner.<i>.". For inspection and tests.
  std::map<std::string, torch::Tensor> state_tensors(const std::string& name) const;
  /// Method assigned to a parameter.
  Method method_of(const std::string& name) const;
  /// The selection report (computed at construction).
  const SelectionReport& report() const { return report_; }
  const Config& config() const { return config_; }
  /// Number of step() calls so far.
  int64_t step_count() const { return step_count_; }
  /// Steps skipped because of non-finite gradients, per call to step().
  int64_t skipped_count() const { return skipped_count_; }
  /// The projector of a parameter (advanced use).
  Projector& projector(const std::string& name);
  /// The names of the parameters, in model order.
  std::vector<std::string> names() const;
  /// With Config::diagnostics: one entry per low-rank parameter, in model order
  /// (NaN where its method defines no value). Reads the values back from the
  /// device. Empty without diagnostics.
  std::vector<SubspaceStats> subspace_stats() const;

  /// Called by step(), before any inner step, with a layout that does not depend on
  /// which gradients this process has: the projected gradients (the .grad of every
  /// inner parameter: factors, or the full gradient of a `full` parameter) of every
  /// selected, non-frozen parameter in model order — for a parameter without a
  /// gradient in this process, the projection of a zero gradient (zeros of the same
  /// shapes) — followed by one 1-D tensor of presence flags, one per such parameter:
  /// 1 where this process has a gradient, 0 where not (dtype and device of the last
  /// gradient). A data-parallel reducer all-reduces and averages all of them in
  /// place. Afterwards a parameter whose flag is 0 (no process had a gradient) is
  /// skipped, as without a reducer: no step, no state change.
  using GradientReducer = std::function<void(std::vector<torch::Tensor>& grads)>;
  void set_gradient_reducer(GradientReducer reducer) { reducer_ = std::move(reducer); }

  /// Implementation detail (one per parameter); public only for the fused-mode hook.
  struct Entry;

 private:
  Entry& entry(const std::string& name);
  const Entry& entry(const std::string& name) const;
  void build_report();
  // Throws ConfigError naming the target whose state would not fit in the host's memory.
  void check_state_fits(const std::vector<std::unique_ptr<Entry>>& entries,
                        const std::function<Target(const Entry&)>& target_of) const;
  // max_grad_norm: throws (changing nothing) when fused accumulation makes the norm unknowable.
  void refuse_unclippable_accumulation() const;
  // max_grad_norm: scales every projected gradient of `active` by the clip coefficient.
  static void clip_projected(const std::vector<Entry*>& active, std::vector<torch::Tensor>& norms, double max_norm);

  Config config_;
  std::vector<std::unique_ptr<Entry>> entries_;
  std::map<std::string, size_t> index_;
  SelectionReport report_;
  int64_t step_count_ = 0;
  int64_t skipped_count_ = 0;
  GradientReducer reducer_;
};

namespace detail {
/// Test seam: the host memory the optimizer's construction check assumes
/// (nullopt: what the machine has).
void set_available_host_memory(std::optional<double> bytes);
}  // namespace detail

}  // namespace gradlora
