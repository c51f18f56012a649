#pragma once
/// \file inner_rule.h
/// The inner update rule: LibTorch's own SGD / Adam / AdamW, or the
/// transformers-style AdamW (`adamw_hf`), over a handful of tensors (the factors
/// of one parameter, or a `full` parameter itself), with a stable,
/// version-independent handle on its per-tensor state.

#include <gradlora/config.h>

#include <torch/optim/optimizer.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gradlora {

/// Flat name → tensor map used for checkpoints (counters as 0-d int64 tensors).
using TensorMap = std::map<std::string, torch::Tensor>;

/// One inner optimizer over `params`.
class InnerRule {
 public:
  /// `lr` and `weight_decay` are the effective values (target overrides applied).
  /// With `decay_params` false the LibTorch optimizer gets no weight decay: the
  /// projector applies `weight_decay` itself (to the weight, or toward an anchor).
  /// `lr_factors` (empty, or one per parameter) multiplies the learning rate of
  /// each parameter: params[i] steps with lr·lr_factors[i], here and after set_lr.
  InnerRule(std::vector<torch::Tensor> params, const InnerConfig& cfg, double lr, double weight_decay,
            bool decay_params = true, std::vector<double> lr_factors = {});

  /// Sets the learning rate (each parameter's is lr times its factor).
  void set_lr(double lr);
  /// The learning rate set last (before the factors).
  double lr() const { return lr_; }
  /// The learning rate params[i] steps with: lr() times its factor.
  double lr(size_t i) const;
  /// The learning rate of `param`, one of params() (lr() for any other tensor).
  double lr_of(const torch::Tensor& param) const;
  /// The configured weight decay (the effective value given at construction).
  double weight_decay() const { return weight_decay_; }
  /// Whether the LibTorch optimizer applies weight_decay() to params() itself.
  bool decays_params() const { return decay_params_; }
  /// Whether the weight decay is decoupled (x ← x − lr·wd·x: adamw, adamw_hf) rather
  /// than coupled (the L2 gradient wd·x added to x's gradient: sgd, adam).
  bool decoupled_decay() const { return type_ == InnerType::adamw || type_ == InnerType::adamw_hf; }
  /// Whether a decoupled decay acts after the update (adamw_hf, as transformers and
  /// galore_torch) rather than before it (adamw, as LibTorch).
  bool decays_after_update() const { return type_ == InnerType::adamw_hf; }
  /// One step of the LibTorch optimizer: tensors without a .grad are skipped.
  void step();
  /// Forgets all moments and step counts.
  void reset_state();
  /// The named state tensors of params[i] (exp_avg, exp_avg_sq,
  /// max_exp_avg_sq, momentum_buffer); empty before the first step.
  std::map<std::string, torch::Tensor> state(size_t i) const;
  /// Adam's per-tensor step count (0 for SGD or before the first step).
  int64_t step_count(size_t i) const;
  /// The first moment (exp_avg or momentum_buffer) of params[i], undefined
  /// when there is none yet. Modifying it in place modifies the state.
  torch::Tensor first_moment(size_t i) const;
  /// State tensors per element of the parameters (e.g. 2 for Adam).
  int64_t state_tensors_per_element() const;
  /// The same, for a rule of configuration `cfg` (before one exists).
  static int64_t state_tensors_per_element(const InnerConfig& cfg);
  InnerType type() const { return type_; }
  const std::vector<torch::Tensor>& params() const { return params_; }

  /// Checkpointing: writes the state under `prefix` keys; check() lists what
  /// in `in` does not fit these tensors; load() (after a clean check) restores.
  void save(TensorMap& out, const std::string& prefix) const;
  void check(const TensorMap& in, const std::string& prefix, std::vector<std::string>& problems) const;
  void load(const TensorMap& in, const std::string& prefix);

 private:
  InnerType type_;
  bool momentum_;
  bool amsgrad_;
  double weight_decay_;
  bool decay_params_;
  double lr_ = 0.0;
  std::vector<torch::Tensor> params_;
  std::vector<double> lr_factors_;  ///< one per parameter
  std::vector<size_t> group_of_;    ///< the LibTorch parameter group of each parameter
  std::unique_ptr<torch::optim::Optimizer> opt_;
};

}  // namespace gradlora
