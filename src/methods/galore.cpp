// galore: the gradient projected on its top-r singular vectors, refreshed every
// `update_proj_gap` steps (Zhao et al. 2024, arXiv 2403.03507).
#include "methods.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace gradlora::methods {

namespace {

bool finite(const torch::Tensor& t) { return torch::isfinite(t).all().item<bool>(); }

/// GaLore (Zhao et al. 2024, arXiv 2403.03507). The projector Q holds the top-r
/// singular vectors of G on the smaller side (left: Q = U_r, n×r, R = Qᵀ·G, r×m;
/// right: Q = V_r, m×r, R = G·Q, n×r), recomputed every `update_proj_gap` steps.
/// The inner parameter N has R's shape and is held at zero before each step, so
/// the inner rule's step is its update ΔN, and P ← P + scale·Q·ΔN (or ΔN·Qᵀ).
/// Weight decay acts on P (the inner rule sees N = 0 and decays nothing):
/// adamw decoupled, P ← (1 − lr·wd)·P before the update (adamw_hf after it, as
/// galore_torch); sgd/adam coupled, R += wd·Qᵀ·P, the projection of the L2 term's gradient.
class GaloreProjector final : public Projector {
 public:
  explicit GaloreProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    r_ = t.rank;
    gap_ = option_int(t, "update_proj_gap");
    scale_ = option_double(t, "scale");
    left_ = projects_left(t, n_, m_);
    randomized_ = option_text(t, "projector") == "randomized";
    oversample_ = option_int(t, "oversample");
    power_iters_ = option_int(t, "power_iters");
    const auto opts = factor_options(ctx_.param);
    torch::NoGradGuard guard;
    Q_ = torch::zeros({left_ ? n_ : m_, r_}, opts);
    N_ = torch::zeros(left_ ? std::vector<int64_t>{r_, m_} : std::vector<int64_t>{n_, r_}, opts);
    weight_ = WeightTarget(param2d(), use_exact(ctx_));
  }

  std::vector<torch::Tensor> inner_params() const override { return {N_}; }
  bool inner_rule_decays() const override { return false; }  // N is held at 0: the decay acts on P

  void project(const torch::Tensor& G) override {
    const torch::Tensor g = as2d(G);
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

  // Q has orthonormal columns: the step moves P in span(Q) (left) or its row space
  // (right), and N's gradient is G's projection on it.
  torch::Tensor energy_kept(const torch::Tensor& g_sq) const override {
    return N_.grad().to(torch::kDouble).square().sum() / g_sq.to(torch::kDouble);
  }

  std::pair<torch::Tensor, int64_t> last_overlap() const override { return {overlap_, overlap_step_}; }

  void discard() override {
    pending_ = torch::Tensor();
    release_grad(N_);
  }

  void commit(InnerRule& inner) override {
    torch::NoGradGuard guard;
    if (pending_.defined()) {
      if (steps_ > 0) {
        // Diagnostics: how much of the old subspace the new projector keeps.
        overlap_ = torch::mm(pending_.t(), Q_).square().sum().to(torch::kDouble) / static_cast<double>(r_);
        overlap_step_ = steps_ + 1;
        move_moments(inner, pending_);
      }
      Q_.copy_(pending_);
      pending_ = torch::Tensor();
    }
    const double wd = inner.weight_decay();
    if (wd != 0.0 && !inner.decoupled_decay()) {
      // Coupled (L2) weight decay: the gradient of wd/2·‖P‖² is wd·P; project it like G.
      torch::Tensor P2 = param2d();
      const torch::Tensor P = weight_.target(P2);
      N_.mutable_grad().add_(project_with(Q_, P), wd);
    }
  }

  void write_back(InnerRule& inner) override {
    torch::NoGradGuard guard;
    torch::Tensor P2 = param2d();
    torch::Tensor& target = weight_.target(P2);
    const double wd = inner.weight_decay();
    const bool decoupled = wd != 0.0 && inner.decoupled_decay();
    // adamw: P ← (1 − lr·wd)·P + scale·ΔP, in the write-back's one pass over P.
    const double before = decoupled && !inner.decays_after_update() ? 1.0 - inner.lr() * wd : 1.0;
    // N was zero before the inner step, so N is now ΔN.
    if (left_) {
      add_product(target, Q_, N_, scale_, {}, before);
    } else {
      add_product(target, N_, Q_.t(), scale_, {}, before);
    }
    if (decoupled && inner.decays_after_update()) target.mul_(1.0 - inner.lr() * wd);  // adamw_hf: after
    weight_.publish(P2);
    N_.zero_();
    release_grad(N_);
    ++steps_;
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"Q", Q_}};
    weight_.append(v);
    return v;
  }

  int64_t trainable() const override { return N_.numel(); }

  // The randomized finder's options give Q its meaning only when it is used: with the SVD the
  // settings text is what it was before they existed, so older checkpoints still load.
  std::string settings() const override {
    std::string s = Projector::settings();
    if (!randomized_) s = s.substr(0, s.find(", projector "));
    return s;
  }

  std::string note() const override {
    std::string s = fmt::format("scale={:g}, {} projector Q {}x{}, {} every {} steps, on_resample {}", scale_,
                                left_ ? "left" : "right", Q_.size(0), r_, randomized_ ? "refresh" : "SVD", gap_,
                                to_string(on_resample_of(ctx_.target)));
    if (randomized_)
      s += fmt::format(", randomized range finder (oversample {}, {} power iterations)", oversample_, power_iters_);
    if (r_ == std::min(n_, m_)) s += ", rank = min(n, m): exact full-rank projection, no state saving";
    if (weight_.has_master()) s += ", fp32 master copy";
    return s;
  }

 private:
  torch::Tensor project_with(const torch::Tensor& Q, const torch::Tensor& X) const {
    return galore_project(Q, X, left_);
  }

  // The randomized range finder (Halko, Martinsson & Tropp 2011, SIAM Review 53(2),
  // algorithms 4.4 and 5.1) on H = g (left) or gᵀ (right): Y = H·Ω for a Gaussian Ω of
  // r + oversample columns drawn from (seed, name, refresh), `power_iters` rounds of
  // Y ← H·(Hᵀ·Y) with re-orthonormalisation, then the SVD of the small Yᵀ·H. Every
  // product with g goes through galore_project (one pass over g each).
  torch::Tensor randomized_projector(const torch::Tensor& g) const {
    const int64_t h = left_ ? n_ : m_, w = left_ ? m_ : n_;
    const int64_t k = std::min({r_ + oversample_, h, w});
    // Under data parallel each product with this rank's g is averaged over the ranks:
    // the products are linear in g, so the mean is the product with the averaged
    // gradient, and every rank computes the same Q from it.
    auto mul = [&](const torch::Tensor& X) {  // H·X, h×k
      torch::Tensor out = left_ ? galore_project(X, g, false) : galore_project(X, g, true).t().contiguous();
      average(out);
      return out;
    };
    auto tmul = [&](const torch::Tensor& Y) {  // Hᵀ·Y, w×k
      torch::Tensor out = left_ ? galore_project(Y, g, true).t().contiguous() : galore_project(Y, g, false);
      average(out);
      return out;
    };
    auto orth = [](const torch::Tensor& X) { return std::get<0>(torch::linalg_qr(X)).contiguous(); };
    const uint64_t refresh = static_cast<uint64_t>(steps_ / gap_);
    const torch::Tensor omega =
        seeded_normal({w, k}, 1.0, derive_seed(ctx_.seed, ctx_.name, (uint64_t{1} << 32) + refresh), g.options());
    torch::Tensor Y = orth(mul(omega));
    for (int64_t i = 0; i < power_iters_; ++i) Y = orth(mul(orth(tmul(Y))));
    torch::Tensor Ub, S, Vh;
    std::tie(Ub, S, Vh) = torch::linalg_svd(tmul(Y).t(), /*full_matrices=*/false);  // Yᵀ·H, k×w
    return torch::mm(Y, Ub.narrow(1, 0, r_));
  }

  // Top-r singular vectors of g on the projector's side, or undefined when they cannot be
  // computed (non-finite g, or the SVD fails in both fp32 and fp64): the caller keeps the old Q.
  // Under data parallel every rank must take part in the averages whatever its own g holds:
  // a non-finite g then shows in the averaged products, alike on every rank.
  torch::Tensor compute_projector(const torch::Tensor& g) const {
    const std::string keep = steps_ > 0 ? "keeping the previous projector" : "no projector yet, the step is skipped";
    if (!distributed() && !finite(g)) {
      spdlog::warn("gradlora: galore: parameter '{}' ({} steps taken): gradient holds NaN or Inf, no SVD; {}",
                   ctx_.name, steps_, keep);
      return {};
    }
    std::string why;
    for (const auto dtype : {g.scalar_type(), torch::kDouble}) {
      if (!why.empty() && dtype == g.scalar_type()) break;  // already fp64: nothing to retry
      try {
        torch::Tensor Q;
        if (randomized_) {
          Q = randomized_projector(g.to(dtype));
        } else {
          torch::Tensor U, S, Vh;
          std::tie(U, S, Vh) = torch::linalg_svd(g.to(dtype), /*full_matrices=*/false);
          Q = left_ ? U.narrow(1, 0, r_) : Vh.narrow(0, 0, r_).t();
        }
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
    methods::move_moments(on_resample_of(ctx_.target), inner, [&] {
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
    });
  }

  int64_t r_ = 1, gap_ = 1, oversample_ = 0, power_iters_ = 0;
  double scale_ = 1.0;
  bool left_ = true, randomized_ = false;
  WeightTarget weight_;
  torch::Tensor Q_, N_, pending_;
  torch::Tensor overlap_;
  int64_t overlap_step_ = -1;
};

}  // namespace

MethodInfo galore() {
  MethodInfo m;
  m.name = "galore";
  m.weight_decay_on = "the weight P (adamw decoupled, sgd/adam as wd·P projected), as galore_torch";
  m.options = {
      {"update_proj_gap", int64_t{200}, "steps between SVDs of the gradient", {}, 0.0, true},
      {"scale", 0.25, "GaLore's scale of the projected update", {}, 0.0, true},
      proj_side_option(),
      {"projector",
       std::string("svd"),
       "how a refresh finds Q: svd (the exact top-r singular vectors) | randomized (a range finder on G·Ω)",
       {"svd", "randomized"},
       std::nullopt},
      {"oversample", int64_t{8}, "randomized: columns of the sketch beyond the rank", {}, 0.0},
      {"power_iters", int64_t{2}, "randomized: power iterations (each two more passes over G)", {}, 0.0},
  };
  m.default_on_resample = OnResample::keep;  // GaLore's own behaviour
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const bool left = projects_left(ctx.target, v.n, v.m);
    const int64_t r = ctx.target.rank;
    int64_t bytes = r * (left ? v.n : v.m) * v.factor_bytes;  // Q
    if (use_exact(ctx)) bytes += v.n * v.m * v.factor_bytes;  // master copy
    return std::make_pair(bytes, r * (left ? v.m : v.n));     // N
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<GaloreProjector>(std::move(ctx)); };
  m.data_parallel_refusal = [](const Target& t) {
    if (option_text(t, "projector") == "randomized") return std::string();
    return std::string(
        "projector: svd is the SVD of each rank's own gradient, so the ranks would disagree; set projector: "
        "randomized (its sketch of the gradient is averaged over the ranks, so all of them find the projector of "
        "the averaged gradient)");
  };
  return m;
}

}  // namespace gradlora::methods
