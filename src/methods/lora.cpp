// lora: P = P0 + s·A·B with A n×r, B r×m; merge-and-restart every `merge_every` steps;
// `init: gradient` (LoRA-GA) takes A, B from the SVD of the first gradient.
#include "methods.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace gradlora::methods {

namespace {

class LoraProjector final : public FactorProjector {
 public:
  explicit LoraProjector(ProjectorContext ctx) : FactorProjector(std::move(ctx)) {
    const Target& t = ctx_.target;
    merge_every_ = option_int(t, "merge_every");
    lr_ratio_ = option_double(t, "lr_ratio");
    gradient_ = t.init == Init::gradient;
    if (gradient_ && 2 * t.rank > std::min(n_, m_)) {
      const std::string key =
          ctx_.target_index >= 0 ? fmt::format("targets[{}].rank", ctx_.target_index) : std::string("rank");
      throw ConfigError(fmt::format(
          "config key '{}' (target '{}', init gradient): parameter '{}' is {}x{}; init gradient takes 2 x rank "
          "singular vectors of its gradient, so rank must be <= min(n, m)/2 = {}, got {}",
          key, t.match, ctx_.name, n_, m_, std::min(n_, m_) / 2, t.rank));
    }
    torch::NoGradGuard guard;
    A_ = torch::empty({n_, t.rank}, factor_options(ctx_.param));
    B_ = torch::empty({t.rank, m_}, factor_options(ctx_.param));
    init_factors(0);
  }

  void project(const torch::Tensor& G) override {
    const torch::Tensor g = as2d(G);
    if (init_due()) {
      // Fused mode projects each micro-batch as it arrives: all of them must see the same
      // factors, so they come from the first micro-batch's gradient (the sum is never formed).
      if (!pending_A_.defined()) std::tie(pending_A_, pending_B_) = gradient_factors(g);
      if (!pending_A_.defined()) {
        // No factors from a non-finite G: make sure the step is skipped; the next step retries.
        const double nan = std::numeric_limits<double>::quiet_NaN();
        set_grads(torch::full_like(A_, nan), torch::full_like(B_, nan));
        return;
      }
      auto [gA, gB] = lora_factor_grads(g, pending_A_, pending_B_, s_);
      set_grads(std::move(gA), std::move(gB));
      return;
    }
    auto [gA, gB] = lora_factor_grads(g, A_, B_, s_);
    set_grads(std::move(gA), std::move(gB));
  }

  // Of the factors this step projected on (init gradient: the ones just made).
  torch::Tensor energy_kept(const torch::Tensor& g_sq) const override {
    const bool fresh = pending_A_.defined();
    return factor_energy_kept(A_.grad(), B_.grad(), fresh ? pending_A_ : A_, fresh ? pending_B_ : B_, s_, g_sq);
  }

  void discard() override {
    pending_A_ = pending_B_ = torch::Tensor();
    FactorProjector::discard();
  }

  void commit(InnerRule& inner) override {
    if (pending_A_.defined()) {
      // init gradient: the factors the step was projected with become A, B and their start
      // A0, B0; P0 is the weight now, so P = P0 + s·(A·B − A0·B0) is still the weight.
      torch::NoGradGuard guard;
      A_.copy_(pending_A_);
      B_.copy_(pending_B_);
      A0_.copy_(pending_A_);
      B0_.copy_(pending_B_);
      if (exact_) P0_.copy_(ctx_.param);
      pending_A_ = pending_B_ = torch::Tensor();
    }
    if (!exact_) remember_factors();
    // Symmetric and gradient init: decay pulls the factors toward their start A0, B0, so the
    // weight toward P0 (decaying A and B toward 0 would pull P toward P0 − s·A0·B0).
    if (A0_.defined()) decay_toward(inner, {{A_, A0_}, {B_, B0_}}, /*after_step=*/false);
  }

  // LoRA+ (Hayou et al. 2024, arXiv 2402.12354): A (n×r, PEFT's lora_B) steps with
  // lr_ratio times the target's learning rate, B (r×m, PEFT's lora_A) with it.
  std::vector<double> inner_lr_factors() const override { return {lr_ratio_, 1.0}; }

  // Zero init: the inner rule decays A and B toward 0, as PEFT's AdamW over lora_A, lora_B does.
  // Symmetric and gradient init: the projector decays them toward A0, B0.
  bool inner_rule_decays() const override { return ctx_.target.init == Init::zero; }

  void write_back(InnerRule& inner) override {
    if (A0_.defined()) decay_toward(inner, {{A_, A0_}, {B_, B0_}}, /*after_step=*/true);
    torch::Tensor P2 = param2d();
    if (exact_) {
      // P = P0 + s·(A·B − A0·B0), rounded once into P's dtype; no n×m temporary.
      const torch::Tensor P0 = as2d(P0_);
      if (A0_.defined()) {
        lora_write_back(P2, A0_, B0_, A_, B_, s_, P0);  // exactly P0 while A = A0, B = B0
      } else {
        add_product(P2, A_, B_, s_, P0);
      }
    } else {
      lora_write_back(P2, A_prev_, B_prev_, A_, B_, s_);
      forget_factors();
    }
    discard();
    ++steps_;
    if (merge_every_ > 0 && steps_ % merge_every_ == 0) {
      // Merge-and-restart: P already holds s·(A·B − A0·B0); start new factors (init gradient:
      // zeros until the next step's gradient gives them).
      init_factors(steps_ / merge_every_);
      inner.reset_state();
    }
  }

  std::pair<torch::Tensor, torch::Tensor> initial_factors() const override {
    if (A0_.defined()) return {A0_, B0_};
    return draw_initial(merge_every_ > 0 ? steps_ / merge_every_ : 0);
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"A", A_}, {"B", B_}};
    if (exact_) v.emplace_back("P0", P0_);
    if (A0_.defined()) {
      v.emplace_back("A0", A0_);
      v.emplace_back("B0", B0_);
    }
    return v;
  }

  std::string note() const override {
    std::string n =
        fmt::format("s={:g}, init {}, writeback {}", s_, to_string(ctx_.target.init), exact_ ? "exact" : "incremental");
    if (gradient_ && init_due()) n += ", factors from the next step's gradient";
    if (merge_every_ > 0) n += fmt::format(", merge every {}", merge_every_);
    if (lr_ratio_ != 1.0) n += fmt::format(", lr of A x{:g}", lr_ratio_);
    return n;
  }

  std::string settings() const override {
    // init_std matters only for the symmetric init; the rest as the base class says.
    const Target& t = ctx_.target;
    const std::string init_std = t.init == Init::symmetric && t.init_std ? fmt::format("{:.17g}", *t.init_std)
                                 : t.init == Init::symmetric             ? "auto"
                                                                         : "-";
    std::string s = fmt::format("scale {:.17g}, init {}, init_std {}, merge_every {}", s_, to_string(t.init), init_std,
                                merge_every_);
    // Only when set, so that checkpoints saved before the option existed keep their settings text.
    if (lr_ratio_ != 1.0) s += fmt::format(", lr_ratio {:.17g}", lr_ratio_);
    return s;
  }

 private:
  // The factors a (re)start draws; deterministic in (seed, name, restart).
  std::pair<torch::Tensor, torch::Tensor> draw_initial(int64_t restart) const {
    torch::NoGradGuard guard;
    const Target& t = ctx_.target;
    const auto opts = factor_options(ctx_.param);
    const uint64_t sa = derive_seed(ctx_.seed, ctx_.name, 2 * static_cast<uint64_t>(restart));
    const uint64_t sb = derive_seed(ctx_.seed, ctx_.name, 2 * static_cast<uint64_t>(restart) + 1);
    if (t.init == Init::zero) return {torch::zeros({n_, t.rank}, opts), seeded_kaiming_uniform({t.rank, m_}, sb, opts)};
    if (t.init == Init::gradient) return {torch::zeros({n_, t.rank}, opts), torch::zeros({t.rank, m_}, opts)};
    const double sd = t.init_std.value_or(unbiased_random_std(s_, t.rank));
    return {seeded_normal({n_, t.rank}, sd, sa, opts), seeded_normal({t.rank, m_}, sd, sb, opts)};
  }

  void init_factors(int64_t restart) {
    torch::NoGradGuard guard;
    auto [A0, B0] = draw_initial(restart);
    A_.copy_(A0);
    B_.copy_(B0);
    if (exact_) P0_ = ctx_.param.detach().clone();
    if (ctx_.target.init != Init::zero) {
      A0_ = A_.clone();  // the exact write-back's reference and the decay's anchor
      B0_ = B_.clone();
    }
  }

  // init gradient: whether the next committed step takes its factors from its gradient (the
  // first step, and the first after each merge-and-restart). A function of the step count, so a
  // checkpoint carries it.
  bool init_due() const { return gradient_ && (steps_ == 0 || (merge_every_ > 0 && steps_ % merge_every_ == 0)); }

  // LoRA-GA's factors from G = U·Σ·Vᵀ: B = c_B·V[:, :r]ᵀ, A = c_A·U[:, r:2r]. One inner SGD step
  // of learning rate η then changes W by −η·s²·(G·BᵀB + A·Aᵀ·G) to first order, with A's rate
  // λ·η (lr_ratio): −η·s²·(λ·c_B²·G_[0,r) + c_A²·G_[r,2r)), so c_A = 1/s and c_B = 1/(s·√λ)
  // make it −η·G_2r, the best rank-2r approximation (docs/methods.md). The SVD is taken in
  // float64; undefined factors when G is not finite or the SVD fails (the step is skipped).
  std::pair<torch::Tensor, torch::Tensor> gradient_factors(const torch::Tensor& g) const {
    torch::NoGradGuard guard;
    const int64_t r = ctx_.target.rank;
    if (!torch::isfinite(g).all().item<bool>()) {
      spdlog::warn(
          "gradlora: lora: parameter '{}' ({} steps taken): gradient holds NaN or Inf; init gradient waits "
          "for a finite one, the step is skipped",
          ctx_.name, steps_);
      return {};
    }
    try {
      torch::Tensor U, S, Vh;
      std::tie(U, S, Vh) = torch::linalg_svd(g.to(torch::kDouble), /*full_matrices=*/false);
      torch::Tensor A = U.narrow(1, r, r).mul(1.0 / s_);
      torch::Tensor B = Vh.narrow(0, 0, r).mul(1.0 / (s_ * std::sqrt(lr_ratio_)));
      if (torch::isfinite(A).all().item<bool>() && torch::isfinite(B).all().item<bool>()) {
        return {A.to(A_.scalar_type()).contiguous(), B.to(B_.scalar_type()).contiguous()};
      }
      spdlog::warn(
          "gradlora: lora: parameter '{}': SVD of the gradient gave non-finite singular vectors; the step is "
          "skipped",
          ctx_.name);
    } catch (const c10::Error& e) {
      spdlog::warn("gradlora: lora: parameter '{}': SVD of the gradient failed ({}); the step is skipped", ctx_.name,
                   e.what_without_backtrace());
    }
    return {};
  }

  int64_t merge_every_ = 0;
  double lr_ratio_ = 1.0;
  bool gradient_ = false;
  torch::Tensor P0_, A0_, B0_;
  torch::Tensor pending_A_, pending_B_;  // init gradient: factors project() took from G, until commit
};

}  // namespace

MethodInfo lora() {
  MethodInfo m;
  m.name = "lora";
  m.weight_decay_on = "the factors A, B (init zero, as PEFT); their departure from A0, B0 (init symmetric, gradient)";
  m.options = {{"merge_every", int64_t{0}, "steps between merge-and-restart (0 = never)", {}, 0.0},
               {"lr_ratio", 1.0, "LoRA+: A's (n x r, PEFT's lora_B) learning rate over the target's", {}, 0.0, true}};
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const int64_t t = ctx.target.rank * (v.n + v.m);  // A, B
    int64_t bytes = t * v.factor_bytes;
    if (use_exact(ctx)) bytes += v.n * v.m * v.param_bytes;          // P0
    if (ctx.target.init != Init::zero) bytes += t * v.factor_bytes;  // A0, B0
    return std::make_pair(bytes, t);
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<LoraProjector>(std::move(ctx)); };
  m.data_parallel_refusal = [](const Target& t) {
    if (t.init != Init::gradient) return std::string();
    return std::string(
        "init gradient takes the factors from the SVD of the first step's gradient, which is each rank's own, so "
        "the ranks would start from different factors (use init zero or symmetric)");
  };
  return m;
}

}  // namespace gradlora::methods
