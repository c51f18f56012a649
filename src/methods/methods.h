#pragma once
// Private to the method files: what several methods share.
#include <gradlora/maths.h>
#include <gradlora/method.h>
#include <gradlora/projector.h>

#include <torch/types.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::methods {

/// Factors' dtype (fp32, or fp64 for double weights) on the parameter's device.
inline torch::TensorOptions factor_options(const torch::Tensor& P) {
  return torch::TensorOptions().dtype(factor_dtype(P.scalar_type())).device(P.device());
}

/// The n×m view a projector of `ctx` will take (Projector::view_shape) and the element sizes of its factors and of the
/// parameter: for footprints.
struct ViewSize {
  int64_t n = 0, m = 0;
  int64_t factor_bytes = 4;  ///< bytes per factor value (fp32, fp64 for double weights)
  int64_t param_bytes = 4;   ///< bytes per value of the parameter
};
ViewSize view_size(const ProjectorContext& ctx);

/// `writeback: auto` means exact for bf16/fp16 weights, incremental otherwise.
bool use_exact(const ProjectorContext& ctx);

/// Drops a tensor's .grad (the inner rule then skips it).
inline void release_grad(torch::Tensor& t) {
  if (t.grad().defined()) t.mutable_grad() = torch::Tensor();
}

/// What on_resample does to the inner rule's moments when a method changes its
/// projection: `keep` leaves them, `reset` forgets them, `transfer` calls the
/// method's own re-expression of them in the new projection.
void move_moments(OnResample policy, InnerRule& inner, const std::function<void()>& transfer);

/// Weight decay toward anchors, with the inner rule's semantics, for a projector
/// whose inner rule gets none (Projector::inner_rule_decays() false): coupled
/// (sgd, adam) adds wd·(x − x0) to x's gradient; decoupled moves x by
/// −lr·wd·(x − x0) (lr: x's own), before the inner step for adamw and after it for
/// adamw_hf, as their own decays do. Call it twice: in commit(), after the factors
/// before the step were remembered, with `after_step` false, and at the start of
/// write_back() with `after_step` true; each call acts only where the rule's decay
/// does, and the write-back carries the decay's change. Nothing when the decay is 0.
void decay_toward(const InnerRule& inner, const std::vector<std::pair<torch::Tensor, torch::Tensor>>& x_and_anchor,
                  bool after_step);

/// The weight as the methods update it. Incremental: increments go straight into
/// P. With a master copy (`writeback: exact` for methods whose change is not a
/// function of their current factors: random, galore, hadamard) they go into an
/// n×m copy of P in the factors' dtype, and P is its rounding: no update is lost
/// to P's bf16/fp16 rounding.
class WeightTarget {
 public:
  WeightTarget() = default;
  WeightTarget(const torch::Tensor& P2d, bool master);
  /// Where increments go: the master copy, or P itself.
  torch::Tensor& target(torch::Tensor& P2d) { return master_.defined() ? master_ : P2d; }
  /// After the increments: P = round(master) (nothing without a master copy).
  void publish(torch::Tensor& P2d) const;
  bool has_master() const { return master_.defined(); }
  const torch::Tensor& master() const { return master_; }
  /// Restores the master copy from a checkpoint.
  void restore(const torch::Tensor& saved) { master_.copy_(saved); }
  /// For a checkpoint's "master" tensor.
  void append(std::vector<std::pair<std::string, torch::Tensor>>& out) const;

 private:
  torch::Tensor master_;
};

/// Base of the methods that train two factors A (n×r) and B (r×m) with scale s
/// (lora, random, additive): the factors, their gradients, and the factors
/// before the inner step, from which an incremental write-back takes the change.
/// The `proj_side` option of the projecting methods (galore, apollo) and its rule:
/// the projector multiplies G from the left (n < m, or `left`) or from the right.
OptionSpec proj_side_option();
bool projects_left(const Target& t, int64_t n, int64_t m);

/// Subspace diagnostics of P = P0 + s·A·B: the share of ‖G‖² (`g_sq`) in the tangent
/// space {X·B + A·Y} the factors' step moves P in, ‖Π(G)‖² / ‖G‖² with
/// ‖Π(G)‖² = ‖Q_Aᵀ·G‖² + ‖G·Q_B‖² − ‖Q_Aᵀ·G·Q_B‖² (Q_A, Q_B orthonormal bases of A's
/// columns and B's rows), from the factor gradients gA = s·G·Bᵀ, gB = s·Aᵀ·G alone:
/// Q_Aᵀ·G = T_Aᵀ·gB/s, G·Q_B = gA·T_B/s with Q_A = A·T_A, Q_B = Bᵀ·T_B from the thin
/// SVDs of the small factors (a zero factor spans nothing). 0-d, double.
torch::Tensor factor_energy_kept(const torch::Tensor& gA, const torch::Tensor& gB, const torch::Tensor& A,
                                 const torch::Tensor& B, double s, const torch::Tensor& g_sq);

class FactorProjector : public Projector {
 public:
  explicit FactorProjector(ProjectorContext ctx);
  std::vector<torch::Tensor> inner_params() const override { return {A_, B_}; }
  void discard() override;
  std::pair<torch::Tensor, torch::Tensor> factors() const override { return {A_, B_}; }
  int64_t trainable() const override { return A_.numel() + B_.numel(); }

 protected:
  void set_grads(torch::Tensor gA, torch::Tensor gB);
  /// Copies A, B before the inner step: the write-back adds s·f(A, B) − s·f(A_prev, B_prev).
  void remember_factors();
  void forget_factors();

  double s_ = 1.0;
  bool exact_ = false;
  torch::Tensor A_, B_, A_prev_, B_prev_;
};

}  // namespace gradlora::methods
