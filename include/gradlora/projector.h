#pragma once
/// \file projector.h
/// One projector per selected parameter, one subclass per method: it maps the
/// full gradient G to gradients of the tensors the inner rule updates, and
/// writes the resulting change back into the parameter. The inner rule knows
/// nothing of projections (ensmallen's split of SGD and its update policy).

#include <gradlora/config.h>
#include <gradlora/inner_rule.h>

#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gradlora {

/// Everything a projector needs to know about its parameter.
struct ProjectorContext {
  std::string name;     ///< dotted parameter name
  torch::Tensor param;  ///< the model's parameter (updated in place)
  Target target;        ///< the target that selected it (or the default)
  uint64_t seed = 0;    ///< config seed
  /// Index of the target in Config::targets (-1: the default), for error messages.
  int64_t target_index = -1;
};

/// Maps G to inner-rule gradients and writes back (one subclass per method, each
/// in its own file under src/methods/). A step is
///   project(G) → [finite check] → commit(inner) → inner.step() → write_back(inner)
/// and discard() replaces commit() when the step is skipped.
class Projector {
 public:
  explicit Projector(ProjectorContext ctx);
  virtual ~Projector() = default;

  /// The tensors the inner rule updates (factors, or the parameter for `full`).
  virtual std::vector<torch::Tensor> inner_params() const = 0;
  /// Sets the .grad of inner_params() from G (any shape; viewed as n×m).
  /// Must not change persistent state: a skipped step calls discard().
  virtual void project(const torch::Tensor& G) = 0;
  /// Accepts the projected step: applies a pending resample (moving moments
  /// per on_resample) before the inner step.
  virtual void commit(InnerRule& inner) { (void)inner; }
  /// Drops whatever project() prepared.
  virtual void discard() {}
  /// Data parallel, when this process has no gradient for the parameter in this
  /// step: what project() of a zero gradient does — the .grad of every inner
  /// parameter set to zeros of the shape project() gives, and whatever project()
  /// prepares besides (a resample that is due) — so that every rank reduces the
  /// same tensors and commits alike. By default project(zeros of the parameter).
  virtual void project_zero();
  /// After the inner step: applies the change of the factors to the parameter.
  virtual void write_back(InnerRule& inner) = 0;

  /// Current factors (A, B). Throws std::invalid_argument when the method keeps none.
  virtual std::pair<torch::Tensor, torch::Tensor> factors() const;
  /// Factors (A0, B0) of the last (re)start: since then the parameter changed by
  /// s·(A·B − A0·B0) (`lora`; A0 = 0 for `zero` init). Used by adapter export.
  /// Throws std::invalid_argument when the method keeps none.
  virtual std::pair<torch::Tensor, torch::Tensor> initial_factors() const;
  /// Persistent tensors besides the inner rule's state, by name (A, B, P0, …).
  virtual std::vector<std::pair<std::string, torch::Tensor>> tensors() const = 0;
  /// Bytes of persistent tensors (by default counted from tensors()).
  virtual int64_t persistent_bytes() const;
  /// Number of trainable values (what the inner rule updates).
  virtual int64_t trainable() const = 0;
  /// One-line note for the selection report (e.g. "rank(ΔP) ≤ 2r").
  virtual std::string note() const { return {}; }
  /// The rank shown in the report and checked in checkpoints (0: the method has none).
  virtual int64_t rank() const { return ctx_.target.rank; }
  /// Whether the inner rule applies the weight decay to inner_params() (true), or
  /// the projector applies it itself (to the weight, or toward the factors' start)
  /// and the inner rule gets none. The method's MethodInfo::weight_decay_on says which.
  virtual bool inner_rule_decays() const { return true; }
  /// The learning rate of each of inner_params() as a multiple of the target's
  /// (its parameter group's, so schedulers scale them all); empty: all 1.
  virtual std::vector<double> inner_lr_factors() const { return {}; }
  /// Whether fused mode projects this parameter inside backward() (false when the
  /// inner rule needs the full gradient anyway, as for `full`).
  virtual bool fusable() const { return true; }
  /// Subspace diagnostics, called right after project(G) with `g_sq` = ‖G‖² (0-d):
  /// the share of ‖G‖² in the subspace this step can move the weight in, as a 0-d
  /// tensor in [0, 1], from what project() just computed. Undefined: the method
  /// defines none.
  virtual torch::Tensor energy_kept(const torch::Tensor& g_sq) const {
    (void)g_sq;
    return {};
  }
  /// For a method that recomputes a projector (galore): at its last refresh after
  /// the first, ‖Q_newᵀ·Q_old‖²_F / r (1: the same subspace, 0: orthogonal), 0-d,
  /// and the step it happened at; (undefined, -1) before any.
  virtual std::pair<torch::Tensor, int64_t> last_overlap() const { return {torch::Tensor(), -1}; }
  /// The target settings that give the saved tensors their meaning: a checkpoint
  /// saved with other settings is refused. By default the method, scale, init,
  /// init_std, writeback, on_resample and every option of the method (not the
  /// learning rate or the weight decay, which may change between runs).
  virtual std::string settings() const;
  /// What a checkpoint stores and checks: settings(), plus ", fan_in_fan_out
  /// true" for a weight the method sees transposed (the factors then mean
  /// the transposed matrix, even where the shapes agree).
  std::string checkpoint_settings() const;

  /// Checkpointing: save() writes tensors() and counters; check() lists what
  /// in `in` does not fit (missing keys, shapes); load() restores after a
  /// clean check and cannot fail.
  virtual void save(TensorMap& out) const;
  virtual void check(const TensorMap& in, std::vector<std::string>& problems) const;
  virtual void load(const TensorMap& in);

  /// Steps this parameter has taken (skipped steps do not count).
  int64_t steps() const { return steps_; }
  const ProjectorContext& context() const { return ctx_; }
  /// The n×m view a projector of `ctx` takes, known before it is built (the
  /// parameter's first dimension by the rest; swapped under fan_in_fan_out).
  static std::pair<int64_t, int64_t> view_shape(const ProjectorContext& ctx);
  /// n and m of the n×m matrix the method sees (out×in under fan_in_fan_out).
  int64_t rows() const { return n_; }
  int64_t cols() const { return m_; }
  /// Whether the method sees the stored weight transposed (Target::fan_in_fan_out).
  bool transposed() const { return transposed_; }

  /// Data parallel: replaces a tensor by its mean over the ranks, in place. Every
  /// rank calls it for the same parameters in the same order with tensors of the
  /// same shape (a collective). A method whose project() needs more than the
  /// averaged projected gradient (galore's randomized refresh: the sketch of the
  /// averaged G) calls average(); DataParallel installs it, nullptr removes it.
  using Collective = std::function<void(torch::Tensor&)>;
  void set_collective(Collective c) { collective_ = std::move(c); }

 protected:
  /// The mean of `t` over the ranks, in place (nothing in one process).
  void average(torch::Tensor& t) const {
    if (collective_) collective_(t);
  }
  /// Whether average() talks to other ranks: every rank must then reach the same
  /// calls, whatever its own gradient holds.
  bool distributed() const { return static_cast<bool>(collective_); }

  /// The parameter as the n×m matrix the method sees: a view of it (with
  /// fan_in_fan_out the transposed view of the stored (in, out) tensor, so a
  /// write-back goes into the stored tensor in place).
  torch::Tensor param2d() const;
  /// A tensor of the parameter's stored shape (its gradient, a saved P0) as
  /// that n×m matrix, a view where its strides allow.
  torch::Tensor as2d(const torch::Tensor& x) const;
  ProjectorContext ctx_;
  int64_t n_ = 0, m_ = 0;
  int64_t steps_ = 0;
  bool transposed_ = false;

 private:
  Collective collective_;
};

/// Builds the projector of ctx.target.method from the registry (<gradlora/method.h>);
/// nullptr for `frozen`. Throws ConfigError on a parameter the method cannot take
/// (1-D for a low-rank method, rank out of range, non-floating dtype).
std::unique_ptr<Projector> make_projector(ProjectorContext ctx);

}  // namespace gradlora
