// galore (SVD projection) and hadamard (FedPara / LoHa) projectors (design.md §2.4, docs/methods_beyond.md).
#include "projectors_internal.h"

#include <gradlora/maths.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace gradlora::detail {

namespace {

// P2d += alpha·D, where D may have a wider dtype than P2d.
void add_into(torch::Tensor& P2d, const torch::Tensor& D, double alpha) {
  if (P2d.scalar_type() == D.scalar_type()) {
    P2d.add_(D, alpha);
  } else {
    P2d.add_(D.mul(alpha).to(P2d.scalar_type()));
  }
}

bool finite(const torch::Tensor& t) { return torch::isfinite(t).all().item<bool>(); }

// ------------------------------------------------------------ galore

/// GaLore (Zhao et al. 2024, arXiv 2403.03507). The projector Q holds the top-r
/// singular vectors of G on the smaller side (left: Q = U_r, n×r, R = Qᵀ·G, r×m;
/// right: Q = V_r, m×r, R = G·Q, n×r), recomputed every `update_proj_gap` steps.
/// The inner parameter N has R's shape and is held at zero before each step, so
/// the inner rule's step is its update ΔN, and P ← P + scale·Q·ΔN (or ΔN·Qᵀ).
/// Weight decay acts on P (the inner rule sees N = 0 and decays nothing):
/// adamw decoupled, P ← (1 − lr·wd)·P; sgd/adam coupled, R += wd·Qᵀ·P, the
/// projection of the L2 term's gradient.
class GaloreProjector final : public Projector {
 public:
  explicit GaloreProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    r_ = t.rank;
    gap_ = t.update_proj_gap;
    scale_ = t.galore_scale;
    left_ = t.proj_side == ProjSide::left || (t.proj_side == ProjSide::automatic && n_ < m_);
    master_mode_ = use_exact(ctx_);
    const auto opts = factor_options(ctx_.param);
    torch::NoGradGuard guard;
    Q_ = torch::zeros({left_ ? n_ : m_, r_}, opts);
    N_ = torch::zeros(left_ ? std::vector<int64_t>{r_, m_} : std::vector<int64_t>{n_, r_}, opts);
    if (master_mode_) master_ = ctx_.param.detach().to(opts.dtype().toScalarType()).reshape({n_, m_}).clone();
  }

  std::vector<torch::Tensor> inner_params() const override { return {N_}; }

  void project(const torch::Tensor& G) override {
    const torch::Tensor g = G.reshape({n_, m_});
    torch::Tensor Q = Q_;
    if (steps_ % gap_ == 0) {
      // Fused mode projects each micro-batch as it arrives: all of them must share one Q, so
      // the SVD is taken of the first micro-batch's gradient (the sum is never formed).
      if (!pending_.defined()) pending_ = compute_projector(g.to(N_.scalar_type()));
      if (pending_.defined()) {
        Q = pending_;
      } else if (steps_ == 0) {
        // No projector yet and none computable from a non-finite G: make sure the step is skipped.
        N_.mutable_grad() = torch::full_like(N_, std::numeric_limits<double>::quiet_NaN());
        return;
      }
    }
    N_.mutable_grad() = project_with(Q, g);
  }

  void discard() override {
    pending_ = torch::Tensor();
    release_grad(N_);
  }

  void commit(InnerRule& inner) override {
    torch::NoGradGuard guard;
    if (pending_.defined()) {
      if (steps_ > 0) move_moments(inner, pending_);
      Q_.copy_(pending_);
      pending_ = torch::Tensor();
    }
    const double wd = inner.weight_decay();
    if (wd != 0.0 && inner.type() != InnerType::adamw) {
      // Coupled (L2) weight decay: the gradient of wd/2·‖P‖² is wd·P; project it like G.
      const torch::Tensor P = master_mode_ ? master_ : param2d();
      N_.mutable_grad().add_(project_with(Q_, P), wd);
    }
  }

  void write_back(InnerRule& inner) override {
    torch::NoGradGuard guard;
    torch::Tensor target = master_mode_ ? master_ : param2d();
    const double wd = inner.weight_decay();
    if (wd != 0.0 && inner.type() == InnerType::adamw) target.mul_(1.0 - inner.lr() * wd);
    // N was zero before the inner step, so N is now ΔN.
    if (left_) {
      add_product(target, Q_, N_, scale_);
    } else {
      add_product(target, N_, Q_.t(), scale_);
    }
    if (master_mode_) param2d().copy_(master_);
    N_.zero_();
    release_grad(N_);
    ++steps_;
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"Q", Q_}};
    if (master_mode_) v.emplace_back("master", master_);
    return v;
  }

  int64_t trainable() const override { return N_.numel(); }

  std::string note() const override {
    std::string s = fmt::format("scale={:g}, {} projector Q {}x{}, SVD every {} steps, on_resample {}", scale_,
                                left_ ? "left" : "right", Q_.size(0), r_, gap_, to_string(ctx_.target.resample_policy()));
    if (r_ == std::min(n_, m_)) s += ", rank = min(n, m): exact full-rank projection, no state saving";
    if (master_mode_) s += ", fp32 master copy";
    return s;
  }

 private:
  // Qᵀ·X (left) or X·Q (right) in Q's dtype; X of another dtype is converted by row panels.
  torch::Tensor project_with(const torch::Tensor& Q, const torch::Tensor& X) const {
    if (X.scalar_type() == Q.scalar_type()) return left_ ? torch::mm(Q.t(), X) : torch::mm(X, Q);
    torch::Tensor out = left_ ? torch::zeros({r_, m_}, Q.options()) : torch::empty({n_, r_}, Q.options());
    for_each_row_panel(X, Q.scalar_type(), 1, [&](int64_t row0, const torch::Tensor& panel) {
      if (left_) {
        out.addmm_(Q.narrow(0, row0, panel.size(0)).t(), panel);
      } else {
        torch::Tensor rows = out.narrow(0, row0, panel.size(0));
        at::mm_out(rows, panel, Q);
      }
    });
    return out;
  }

  // Top-r singular vectors of g on the projector's side, or undefined when they cannot be
  // computed (non-finite g, or the SVD fails in both fp32 and fp64): the caller keeps the old Q.
  torch::Tensor compute_projector(const torch::Tensor& g) const {
    const std::string keep = steps_ > 0 ? "keeping the previous projector" : "no projector yet, the step is skipped";
    if (!finite(g)) {
      spdlog::warn("gradlora: galore: parameter '{}' ({} steps taken): gradient holds NaN or Inf, no SVD; {}",
                   ctx_.name, steps_, keep);
      return {};
    }
    std::string why;
    for (const auto dtype : {g.scalar_type(), torch::kDouble}) {
      if (!why.empty() && dtype == g.scalar_type()) break;  // already fp64: nothing to retry
      try {
        torch::Tensor U, S, Vh;
        std::tie(U, S, Vh) = torch::linalg_svd(g.to(dtype), /*full_matrices=*/false);
        torch::Tensor Q = left_ ? U.narrow(1, 0, r_) : Vh.narrow(0, 0, r_).t();
        if (finite(Q)) {
          if (!why.empty()) {
            spdlog::warn("gradlora: galore: parameter '{}' ({} steps taken): SVD in {} failed ({}); used fp64",
                         ctx_.name, steps_, c10::toString(g.scalar_type()), why);
          }
          return Q.to(g.scalar_type()).contiguous();
        }
        why = "non-finite singular vectors";
      } catch (const c10::Error& e) {
        why = e.what_without_backtrace();
      }
    }
    spdlog::warn("gradlora: galore: parameter '{}' ({} steps taken): SVD failed ({}); {}", ctx_.name, steps_, why,
                 steps_ > 0 ? "keeping the previous projector" : "falling back to a seeded random orthonormal basis");
    if (steps_ > 0) return {};
    // First step and no SVD: any orthonormal basis keeps the method well defined until the next refresh.
    torch::Tensor X = seeded_normal({Q_.size(0), r_}, 1.0, derive_seed(ctx_.seed, ctx_.name, 0), Q_.options());
    return std::get<0>(torch::linalg_qr(X)).contiguous();
  }

  // The inner rule's moments when Q changes (on_resample). `transfer` re-expresses them in
  // the new basis with C = Q_newᵀ·Q_old: first moments M → C·M (left) or M·Cᵀ (right), exact
  // for the part of M that lies in span(Q_new); second moments v → (C∘C)·v, the variance of
  // the rotated coordinates when the old ones are uncorrelated.
  void move_moments(InnerRule& inner, const torch::Tensor& Q_new) {
    switch (ctx_.target.resample_policy()) {
      case OnResample::keep:
        return;
      case OnResample::reset:
        inner.reset_state();
        return;
      case OnResample::transfer: {
        const torch::Tensor C = torch::mm(Q_new.t(), Q_);
        const torch::Tensor C2 = C.square();
        auto rotate = [&](torch::Tensor& x, const torch::Tensor& c) {
          x.copy_(left_ ? torch::mm(c, x) : torch::mm(x, c.t()));
        };
        for (auto& kv : inner.state(0)) {
          if (kv.first == "exp_avg" || kv.first == "momentum_buffer") {
            rotate(kv.second, C);
          } else {
            rotate(kv.second, C2);
          }
        }
        return;
      }
    }
  }

  int64_t r_ = 1, gap_ = 1;
  double scale_ = 1.0;
  bool left_ = true;
  bool master_mode_ = false;
  torch::Tensor Q_, N_, pending_, master_;
};

// ---------------------------------------------------------- hadamard

/// FedPara (Hyeon-Woo et al. 2022, arXiv 2108.06098), known as LoHa:
/// P = P0 + s·(A1·B1) ⊙ (A2·B2), rank(ΔP) ≤ r². With W1 = A1·B1, W2 = A2·B2 the
/// product rule gives gA1 = s·(G⊙W2)·B1ᵀ, gB1 = s·A1ᵀ·(G⊙W2), and symmetrically
/// for A2, B2 with W1. The write-back adds only differences, so any init leaves
/// the model unchanged at step 0.
class HadamardProjector final : public Projector {
 public:
  explicit HadamardProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    s_ = t.scale();
    master_mode_ = use_exact(ctx_);
    const auto opts = factor_options(ctx_.param);
    const int64_t r = t.rank;
    auto draw = [&](std::vector<int64_t> shape, uint64_t k) {
      const uint64_t seed = derive_seed(ctx_.seed, ctx_.name, k);
      return t.init_std ? seeded_normal(shape, *t.init_std, seed, opts) : seeded_kaiming_uniform(shape, seed, opts);
    };
    torch::NoGradGuard guard;
    A1_ = t.init == Init::zero ? torch::zeros({n_, r}, opts) : draw({n_, r}, 0);
    B1_ = draw({r, m_}, 1);
    A2_ = draw({n_, r}, 2);
    B2_ = draw({r, m_}, 3);
    if (master_mode_) master_ = ctx_.param.detach().to(opts.dtype().toScalarType()).reshape({n_, m_}).clone();
  }

  std::vector<torch::Tensor> inner_params() const override { return {A1_, B1_, A2_, B2_}; }

  void project(const torch::Tensor& G) override {
    torch::Tensor g = G.reshape({n_, m_});
    if (g.scalar_type() != A1_.scalar_type()) g = g.to(A1_.scalar_type());
    torch::Tensor H1 = g * torch::mm(A2_, B2_);  // G ⊙ W2
    torch::Tensor H2 = g * torch::mm(A1_, B1_);  // G ⊙ W1
    A1_.mutable_grad() = torch::mm(H1, B1_.t()).mul_(s_);
    B1_.mutable_grad() = torch::mm(A1_.t(), H1).mul_(s_);
    A2_.mutable_grad() = torch::mm(H2, B2_.t()).mul_(s_);
    B2_.mutable_grad() = torch::mm(A2_.t(), H2).mul_(s_);
  }

  void discard() override {
    for (auto* t : {&A1_, &B1_, &A2_, &B2_}) release_grad(*t);
  }

  void commit(InnerRule&) override {
    A1p_ = A1_.clone();
    B1p_ = B1_.clone();
    A2p_ = A2_.clone();
    B2p_ = B2_.clone();
  }

  void write_back(InnerRule&) override {
    torch::NoGradGuard guard;
    // W1'⊙W2' − W1⊙W2 = ΔW1⊙W2' + W1⊙ΔW2, with ΔW = A'·B' − A·B = [A' − A, A]·[B'; B' − B]
    // (one rank-2r product): no cancellation between two large products.
    auto delta = [](const torch::Tensor& A0, const torch::Tensor& B0, const torch::Tensor& A1,
                    const torch::Tensor& B1) {
      return torch::mm(torch::cat({A1 - A0, A0}, 1), torch::cat({B1, B1 - B0}, 0));
    };
    torch::Tensor D = delta(A1p_, B1p_, A1_, B1_).mul_(torch::mm(A2_, B2_));
    D.addcmul_(torch::mm(A1p_, B1p_), delta(A2p_, B2p_, A2_, B2_));
    torch::Tensor target = master_mode_ ? master_ : param2d();
    add_into(target, D, s_);
    if (master_mode_) param2d().copy_(master_);
    A1p_ = B1p_ = A2p_ = B2p_ = torch::Tensor();
    discard();
    ++steps_;
  }

  std::pair<torch::Tensor, torch::Tensor> factors() const override {
    throw std::invalid_argument(fmt::format(
        "parameter '{}' uses method 'hadamard', which keeps four factors (A1, B1, A2, B2): read them with "
        "state_tensors()",
        ctx_.name));
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"A1", A1_}, {"B1", B1_}, {"A2", A2_}, {"B2", B2_}};
    if (master_mode_) v.emplace_back("master", master_);
    return v;
  }

  int64_t trainable() const override { return A1_.numel() + B1_.numel() + A2_.numel() + B2_.numel(); }

  std::string note() const override {
    const int64_t r = ctx_.target.rank;
    return fmt::format("s={:g}, init {}, rank(dP) <= {}, needs {}x{} temporaries during the step{}", s_,
                       to_string(ctx_.target.init), std::min({r * r, n_, m_}), n_, m_,
                       master_mode_ ? ", fp32 master copy" : "");
  }

 private:
  double s_ = 1.0;
  bool master_mode_ = false;
  torch::Tensor A1_, B1_, A2_, B2_, A1p_, B1p_, A2p_, B2p_, master_;
};

}  // namespace

std::unique_ptr<Projector> make_galore_projector(ProjectorContext ctx) {
  return std::make_unique<GaloreProjector>(std::move(ctx));
}

std::unique_ptr<Projector> make_hadamard_projector(ProjectorContext ctx) {
  return std::make_unique<HadamardProjector>(std::move(ctx));
}

}  // namespace gradlora::detail
