// lora: P = P0 + s·A·B with A n×r, B r×m; merge-and-restart every `merge_every` steps.
#include "methods.h"

#include <fmt/format.h>
#include <torch/torch.h>

namespace gradlora::methods {

namespace {

class LoraProjector final : public FactorProjector {
 public:
  explicit LoraProjector(ProjectorContext ctx) : FactorProjector(std::move(ctx)) {
    const Target& t = ctx_.target;
    merge_every_ = option_int(t, "merge_every");
    lr_ratio_ = option_double(t, "lr_ratio");
    torch::NoGradGuard guard;
    A_ = torch::empty({n_, t.rank}, factor_options(ctx_.param));
    B_ = torch::empty({t.rank, m_}, factor_options(ctx_.param));
    init_factors(0);
  }

  void project(const torch::Tensor& G) override {
    auto [gA, gB] = lora_factor_grads(as2d(G), A_, B_, s_);
    set_grads(std::move(gA), std::move(gB));
  }

  torch::Tensor energy_kept(const torch::Tensor& g_sq) const override {
    return factor_energy_kept(A_.grad(), B_.grad(), A_, B_, s_, g_sq);
  }

  void commit(InnerRule& inner) override {
    if (!exact_) remember_factors();
    // Symmetric init: decay pulls the factors toward their start A0, B0, so the
    // weight toward P0 (decaying A and B toward 0 would pull P toward P0 − s·A0·B0).
    if (A0_.defined()) decay_toward(inner, {{A_, A0_}, {B_, B0_}}, /*after_step=*/false);
  }

  // LoRA+ (Hayou et al. 2024, arXiv 2402.12354): A (n×r, PEFT's lora_B) steps with
  // lr_ratio times the target's learning rate, B (r×m, PEFT's lora_A) with it.
  std::vector<double> inner_lr_factors() const override { return {lr_ratio_, 1.0}; }

  // Zero init: the inner rule decays A and B toward 0, as PEFT's AdamW over lora_A, lora_B does.
  bool inner_rule_decays() const override { return ctx_.target.init != Init::symmetric; }

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
      // Merge-and-restart: P already holds s·(A·B − A0·B0); start new factors.
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
    const double sd = t.init_std.value_or(unbiased_random_std(s_, t.rank));
    return {seeded_normal({n_, t.rank}, sd, sa, opts), seeded_normal({t.rank, m_}, sd, sb, opts)};
  }

  void init_factors(int64_t restart) {
    torch::NoGradGuard guard;
    auto [A0, B0] = draw_initial(restart);
    A_.copy_(A0);
    B_.copy_(B0);
    if (exact_) P0_ = ctx_.param.detach().clone();
    if (ctx_.target.init == Init::symmetric) {
      A0_ = A_.clone();  // the exact write-back's reference and the decay's anchor
      B0_ = B_.clone();
    }
  }

  int64_t merge_every_ = 0;
  double lr_ratio_ = 1.0;
  torch::Tensor P0_, A0_, B0_;
};

}  // namespace

MethodInfo lora() {
  MethodInfo m;
  m.name = "lora";
  m.weight_decay_on = "the factors A, B (init zero, as PEFT); their departure from A0, B0 (init symmetric)";
  m.options = {{"merge_every", int64_t{0}, "steps between merge-and-restart (0 = never)", {}, 0.0},
               {"lr_ratio", 1.0, "LoRA+: A's (n x r, PEFT's lora_B) learning rate over the target's", {}, 0.0, true}};
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const int64_t t = ctx.target.rank * (v.n + v.m);  // A, B
    int64_t bytes = t * v.factor_bytes;
    if (use_exact(ctx)) bytes += v.n * v.m * v.param_bytes;               // P0
    if (ctx.target.init == Init::symmetric) bytes += t * v.factor_bytes;  // A0, B0
    return std::make_pair(bytes, t);
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<LoraProjector>(std::move(ctx)); };
  return m;
}

}  // namespace gradlora::methods
