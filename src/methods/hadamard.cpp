// hadamard: P = P0 + s·(A1·B1) ⊙ (A2·B2), rank up to r² (FedPara / LoHa,
// Hyeon-Woo et al. 2022, arXiv 2108.06098).
#include "methods.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>

namespace gradlora::methods {

namespace {

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
    weight_ = WeightTarget(param2d(), use_exact(ctx_));
    if (t.init != Init::zero) {
      // Every factor starts non-zero, so the product does: the decay's anchors (see commit()).
      for (const auto* f : {&A1_, &B1_, &A2_, &B2_}) start_.push_back(f->clone());
    }
  }

  std::vector<torch::Tensor> inner_params() const override { return {A1_, B1_, A2_, B2_}; }

  void project(const torch::Tensor& G) override {
    auto g = hadamard_factor_grads(as2d(G), A1_, B1_, A2_, B2_, s_);
    A1_.mutable_grad() = g[0];
    B1_.mutable_grad() = g[1];
    A2_.mutable_grad() = g[2];
    B2_.mutable_grad() = g[3];
  }

  void discard() override {
    for (auto* t : {&A1_, &B1_, &A2_, &B2_}) release_grad(*t);
  }

  void commit(InnerRule& inner) override {
    A1p_ = A1_.clone();
    B1p_ = B1_.clone();
    A2p_ = A2_.clone();
    B2p_ = B2_.clone();
    // Non-zero init: decay pulls each factor toward its start, so the weight toward P0
    // (toward 0 it would pull P toward P0 − s·(A1·B1)⊙(A2·B2) at the start).
    if (!start_.empty()) {
      decay_toward(inner, decay_pairs(), /*after_step=*/false);
    }
  }

  // Zero init (A1 = 0): the inner rule decays the four factors toward 0, where ΔP = 0.
  bool inner_rule_decays() const override { return start_.empty(); }

  void write_back(InnerRule& inner) override {
    torch::NoGradGuard guard;
    if (!start_.empty()) decay_toward(inner, decay_pairs(), /*after_step=*/true);
    torch::Tensor P2 = param2d();
    hadamard_write_back(weight_.target(P2), {A1p_, B1p_, A2p_, B2p_}, {A1_, B1_, A2_, B2_}, s_);
    weight_.publish(P2);
    A1p_ = B1p_ = A2p_ = B2p_ = torch::Tensor();
    discard();
    ++steps_;
  }

  std::pair<torch::Tensor, torch::Tensor> factors() const override {
    throw std::invalid_argument(
        fmt::format("parameter '{}' uses method 'hadamard', which keeps four factors (A1, B1, A2, B2): read them with "
                    "state_tensors()",
                    ctx_.name));
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"A1", A1_}, {"B1", B1_}, {"A2", A2_}, {"B2", B2_}};
    if (!start_.empty()) {
      const char* names[] = {"A1_0", "B1_0", "A2_0", "B2_0"};
      for (size_t i = 0; i < start_.size(); ++i) v.emplace_back(names[i], start_[i]);
    }
    weight_.append(v);
    return v;
  }

  int64_t trainable() const override { return A1_.numel() + B1_.numel() + A2_.numel() + B2_.numel(); }

  std::string note() const override {
    const int64_t r = ctx_.target.rank;
    return fmt::format("s={:g}, init {}, rank(dP) <= {}, row panels for the {}x{} products{}", s_,
                       to_string(ctx_.target.init), std::min({r * r, n_, m_}), n_, m_,
                       weight_.has_master() ? ", fp32 master copy" : "");
  }

 private:
  // Each factor and its start, the anchor of its decay.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> decay_pairs() const {
    return {{A1_, start_[0]}, {B1_, start_[1]}, {A2_, start_[2]}, {B2_, start_[3]}};
  }

  double s_ = 1.0;
  WeightTarget weight_;
  torch::Tensor A1_, B1_, A2_, B2_, A1p_, B1p_, A2p_, B2p_;
  std::vector<torch::Tensor> start_;  // the factors at step 0 (non-zero init only)
};

}  // namespace

MethodInfo hadamard() {
  MethodInfo m;
  m.name = "hadamard";
  m.weight_decay_on = "the four factors (init zero); their departure from their start (other inits)";
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const int64_t t = 2 * ctx.target.rank * (v.n + v.m);  // A1, B1, A2, B2
    int64_t bytes = t * v.factor_bytes;
    if (ctx.target.init != Init::zero) bytes += t * v.factor_bytes;  // their start
    if (use_exact(ctx)) bytes += v.n * v.m * v.factor_bytes;         // master copy
    return std::make_pair(bytes, t);
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<HadamardProjector>(std::move(ctx)); };
  return m;
}

}  // namespace gradlora::methods
