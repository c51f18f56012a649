// apollo: the full gradient G, scaled per channel (or as a whole) by what AdamW run on a
// random projection of G makes of it (Zhu et al. 2024, arXiv 2412.05270; APOLLO-Mini:
// rank 1, scale_type tensor).
#include "methods.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <tuple>

#include <algorithm>
#include <cmath>

namespace gradlora::methods {

namespace {

/// APOLLO (Zhu et al. 2024, arXiv 2412.05270, Algorithm 1). G (n×m) is projected by a Gaussian
/// Q with N(0, 1/r) entries, drawn from (seed, name, refresh index) every `update_proj_gap`
/// steps and never stored: left (Q n×r, R = Qᵀ·G, r×m, one channel per column of G) or right
/// (Q m×r, R = G·Q, n×r, one channel per row). The paper's P is Qᵀ. The inner rule steps a
/// tensor N of R's shape held at zero, so its step is ΔN = −lr·R̃ (R̃ the rule's normalised
/// R). The scale of channel j is s_j = ‖R̃_j‖ / ‖R_j‖ (scale_type tensor: one s = ‖R̃‖ / ‖R‖),
/// G̃ = α·G·diag(s), the norm-growth limiter caps ‖G̃_t‖ at γ·‖G̃_{t−1}‖ (the kept norm is the
/// capped one), and P ← P − lr·G̃. Weight decay acts on P: adamw decoupled (P ← (1 − lr·wd)·P
/// before the update, adamw_hf after it); sgd/adam coupled, as the L2 gradient: G and R both
/// get wd·P (so R stays the projection of the gradient the update uses). Persistent: the
/// limiter's last norm (and a master copy with writeback exact); G and Q live from
/// project() to write_back() only.
class ApolloProjector final : public Projector {
 public:
  explicit ApolloProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    if (on_resample_of(t) == OnResample::transfer) {
      throw ConfigError(
          fmt::format("config key 'on_resample': parameter '{}': method 'apollo' takes keep | reset, got transfer (its "
                      "projections are independent Gaussian draws: there is no basis to carry the moments into)",
                      ctx_.name));
    }
    r_ = t.rank;
    gap_ = option_int(t, "update_proj_gap");
    alpha_ = option_double(t, "scale");
    gamma_ = option_double(t, "norm_growth_limit");
    channel_ = option_text(t, "scale_type") == "channel";
    left_ = projects_left(t, n_, m_);
    const auto opts = factor_options(ctx_.param);
    torch::NoGradGuard guard;
    N_ = torch::zeros(left_ ? std::vector<int64_t>{r_, m_} : std::vector<int64_t>{n_, r_}, opts);
    last_norm_ = torch::zeros({1}, opts);  // 0: no previous step, nothing to limit against
    weight_ = WeightTarget(param2d(), use_exact(ctx_));
  }

  std::vector<torch::Tensor> inner_params() const override { return {N_}; }
  bool inner_rule_decays() const override { return false; }  // N is held at 0: the decay acts on P
  // The update is G itself, scaled: fused mode, which never keeps G, cannot form it.
  bool fusable() const override { return false; }

  void project(const torch::Tensor& G) override {
    torch::NoGradGuard guard;
    G_ = as2d(G);
    Q_ = projection(steps_ / gap_);
    torch::Tensor R = galore_project(Q_, G_, left_);
    r_norm_ = R.norm();  // before gradient clipping scales R (commit() reads the factor back)
    N_.mutable_grad() = std::move(R);
  }

  // The last redraw after the first and the one before it are functions of (seed, name,
  // refresh index) and of steps(): rebuilt when asked, nothing kept, nothing done in the step.
  std::pair<torch::Tensor, int64_t> last_overlap() const override {
    const int64_t refresh = steps_ > 0 ? (steps_ - 1) / gap_ : 0;
    if (refresh < 1) return {torch::Tensor(), -1};
    auto orth = [](const torch::Tensor& X) { return std::get<0>(torch::linalg_qr(X.to(torch::kDouble))); };
    const torch::Tensor overlap =
        torch::mm(orth(projection(refresh)).t(), orth(projection(refresh - 1))).square().sum();
    return {overlap / static_cast<double>(r_), refresh * gap_ + 1};
  }

  void discard() override {
    forget_step();
    release_grad(N_);
  }

  void commit(InnerRule& inner) override {
    torch::NoGradGuard guard;
    // Each refresh draws a projection independent of the last: `keep` (the paper's) leaves the
    // moments, `reset` forgets them; `transfer` is refused at construction.
    if (steps_ > 0 && steps_ % gap_ == 0) {
      methods::move_moments(on_resample_of(ctx_.target), inner, [] {});
    }
    // max_grad_norm scales R (not G) between project() and here: κ is that factor, 1 without
    // clipping, so that the update's G and the R the scale is measured on stay one gradient.
    const torch::Tensor& R = N_.grad();
    kappa_ = torch::where(r_norm_ > 0, R.norm() / r_norm_, torch::ones_like(r_norm_));
    const double wd = inner.weight_decay();
    coupled_ = wd != 0.0 && !inner.decoupled_decay();
    if (coupled_) {
      // Coupled (L2) decay: the gradient becomes κ·G + wd·P; R gets its projection.
      torch::Tensor P2 = param2d();
      N_.mutable_grad().add_(galore_project(Q_, weight_.target(P2), left_), wd);
    }
    r_channel_ = norms(N_.grad());
  }

  void write_back(InnerRule& inner) override {
    torch::NoGradGuard guard;
    const double lr = inner.lr_of(N_);
    if (lr != 0.0) apply(inner, lr);  // lr 0: ΔN = 0, nothing moves and the limiter keeps its norm
    N_.zero_();
    release_grad(N_);
    forget_step();
    ++steps_;
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"limiter", last_norm_}};
    weight_.append(v);
    return v;
  }

  int64_t trainable() const override { return N_.numel(); }

  std::string note() const override {
    std::string s = fmt::format(
        "scale_type {}, scale={:g}, {} projection {}x{} N(0, 1/r) regenerated from the seed every {} steps (not "
        "stored), norm-growth limit {}, on_resample {}",
        channel_ ? "channel" : "tensor", alpha_, left_ ? "left" : "right", r_, left_ ? n_ : m_, gap_,
        gamma_ > 0 ? fmt::format("{:g}", gamma_) : std::string("off"), to_string(on_resample_of(ctx_.target)));
    if (weight_.has_master()) s += ", fp32 master copy";
    return s;
  }

 private:
  torch::Tensor projection(int64_t refresh) const {
    return seeded_normal({left_ ? n_ : m_, r_}, 1.0 / std::sqrt(static_cast<double>(r_)),
                         derive_seed(ctx_.seed, ctx_.name, static_cast<uint64_t>(refresh)), N_.options());
  }

  // Per-channel norms of a tensor of R's shape (one per column when left, per row when right),
  // or its one norm (scale_type tensor).
  torch::Tensor norms(const torch::Tensor& X) const {
    if (!channel_) return X.norm();
    return at::linalg_vector_norm(X, 2, {left_ ? int64_t{0} : int64_t{1}}, false, c10::nullopt);
  }

  // Calls fn(row0, rows) over row panels of the n×m view of about 256 KiB of factor values.
  void for_each_panel(const std::function<void(int64_t, int64_t)>& fn) const {
    const int64_t per_panel = (int64_t{256} << 10) / static_cast<int64_t>(N_.element_size());
    const int64_t rows = std::max<int64_t>(1, per_panel / std::max<int64_t>(m_, 1));
    for (int64_t i = 0; i < n_; i += rows) fn(i, std::min(rows, n_ - i));
  }

  void apply(InnerRule& inner, double lr) {
    torch::Tensor P2 = param2d();
    torch::Tensor& target = weight_.target(P2);
    const double wd = inner.weight_decay();
    const bool decoupled = wd != 0.0 && inner.decoupled_decay();
    const double before = decoupled && !inner.decays_after_update() ? 1.0 - lr * wd : 1.0;
    const double after = decoupled && inner.decays_after_update() ? 1.0 - lr * wd : 1.0;
    const auto dtype = N_.scalar_type();
    // s_j = ‖R̃_j‖ / ‖R_j‖ with ‖ΔN_j‖ = lr·‖R̃_j‖ (N was zero before the inner step, so N is ΔN).
    const torch::Tensor s = torch::where(r_channel_ > 0, norms(N_) / (r_channel_ * lr), torch::zeros_like(r_channel_));
    // ‖G̃‖ = α·‖G_eff·diag(s)‖ from the squared channel norms of G_eff = κ·G (+ wd·P when coupled),
    // by row panels: no n×m temporary.
    const int64_t dim = left_ ? 0 : 1;
    torch::Tensor csq = torch::zeros({left_ ? m_ : n_}, N_.options());
    for_each_panel([&](int64_t i, int64_t h) {
      torch::Tensor g = G_.narrow(0, i, h).to(dtype);
      if (coupled_) g = g * kappa_ + target.narrow(0, i, h).to(dtype) * wd;
      const torch::Tensor sq = at::linalg_vector_norm(g, 2, {dim}, false, c10::nullopt).square();
      if (left_) {
        csq.add_(sq);
      } else {
        csq.narrow(0, i, h).copy_(sq);
      }
    });
    if (!coupled_) csq.mul_(kappa_.square());
    const torch::Tensor norm = alpha_ * (channel_ ? (s.square() * csq).sum().sqrt() : s * csq.sum().sqrt());
    torch::Tensor limit = torch::ones_like(last_norm_);
    if (gamma_ > 0) {
      const torch::Tensor cap = last_norm_ * gamma_;
      limit = torch::where((last_norm_ > 0) & (norm > cap), cap / norm, limit);
      last_norm_.copy_(norm * limit);
    }
    // ΔP = d·G_eff with d = −lr·α·limit·s per channel: P ← P·(1 + wd·d) + κ·d·G when coupled.
    const torch::Tensor d = s * limit * (-lr * alpha_);
    const torch::Tensor dG = d * kappa_;
    auto rows_of = [&](const torch::Tensor& v, int64_t i, int64_t h) {
      return channel_ && !left_ ? v.narrow(0, i, h).unsqueeze(1) : v;
    };
    for_each_panel([&](int64_t i, int64_t h) {
      torch::Tensor Pp = target.narrow(0, i, h);
      if (before != 1.0) Pp.mul_(before);
      if (coupled_) Pp.mul_(rows_of(d, i, h) * wd + 1.0);
      Pp.addcmul_(G_.narrow(0, i, h).to(dtype), rows_of(dG, i, h));
      if (after != 1.0) Pp.mul_(after);  // adamw_hf: the decay after the update
    });
    weight_.publish(P2);
  }

  void forget_step() { G_ = Q_ = r_norm_ = kappa_ = r_channel_ = torch::Tensor(); }

  int64_t r_ = 1, gap_ = 1;
  double alpha_ = 1.0, gamma_ = 0.0;
  bool channel_ = true, left_ = true, coupled_ = false;
  WeightTarget weight_;
  torch::Tensor N_, last_norm_;
  // One step's temporaries, from project() to write_back() or discard().
  torch::Tensor G_, Q_, r_norm_, kappa_, r_channel_;
};

}  // namespace

MethodInfo apollo() {
  MethodInfo m;
  m.name = "apollo";
  m.weight_decay_on = "the weight P (adamw decoupled, sgd/adam as the L2 gradient wd·P, in G and in R)";
  m.options = {
      {"update_proj_gap", int64_t{200}, "steps between draws of the random projection", {}, 0.0, true},
      {"scale", 1.0, "APOLLO's α on the scaled gradient (APOLLO-Mini: √128 = 11.3137…)", {}, 0.0, true},
      {"scale_type",
       std::string("channel"),
       "channel: one scale per column (left) or row (right) of G | tensor: one scale (APOLLO-Mini)",
       {"channel", "tensor"},
       std::nullopt},
      proj_side_option(),
      {"norm_growth_limit", 1.01, "γ: ‖G̃_t‖ ≤ γ·‖G̃_{t−1}‖ (0: no limiter)", {}, 0.0},
  };
  m.default_on_resample = OnResample::keep;  // the paper keeps the moments across projections
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const bool left = projects_left(ctx.target, v.n, v.m);
    int64_t bytes = v.factor_bytes;                                      // the limiter's last norm
    if (use_exact(ctx)) bytes += v.n * v.m * v.factor_bytes;             // master copy
    return std::make_pair(bytes, ctx.target.rank * (left ? v.m : v.n));  // N
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<ApolloProjector>(std::move(ctx)); };
  m.data_parallel_refusal = [](const Target&) {
    return std::string(
        "its update is each rank's own full gradient scaled by s (only the projected R would be averaged), so "
        "the ranks' weights would drift apart; data-parallel training supports lora, random, additive, hadamard, "
        "full and frozen");
  };
  return m;
}

}  // namespace gradlora::methods
