// additive: P = P0 + s·(A·J + J'·B), row and column block sums; rank(ΔP) <= 2r.
#include "methods.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>

namespace gradlora::methods {

namespace {

class AdditiveProjector final : public FactorProjector {
 public:
  explicit AdditiveProjector(ProjectorContext ctx) : FactorProjector(std::move(ctx)) {
    const auto opts = factor_options(ctx_.param);
    A_ = torch::zeros({n_, ctx_.target.rank}, opts);
    B_ = torch::zeros({ctx_.target.rank, m_}, opts);
    if (exact_) P0_ = ctx_.param.detach().clone();
  }

  void project(const torch::Tensor& G) override {
    const int64_t r = ctx_.target.rank;
    torch::Tensor gA, gB;
    for_each_row_panel(as2d(G), A_.scalar_type(), r, [&](int64_t row0, const torch::Tensor& panel) {
      auto [pA, pB] = additive_factor_grads(panel, r);  // panels start at multiples of r
      if (!gA.defined()) {
        if (panel.size(0) == n_) {
          gA = pA;
          gB = pB;
          return;
        }
        gA = torch::empty({n_, r}, A_.options());
        gB = torch::zeros({r, m_}, A_.options());
      }
      gA.narrow(0, row0, panel.size(0)).copy_(pA);
      gB.add_(pB);
    });
    if (s_ != 1.0) {
      gA.mul_(s_);
      gB.mul_(s_);
    }
    set_grads(std::move(gA), std::move(gB));
  }

  void commit(InnerRule&) override {
    if (!exact_) remember_factors();
  }

  void write_back(InnerRule&) override {
    torch::Tensor P2 = param2d();
    if (exact_) {
      // P = P0 + s·(A·J + J'·B), computed in the factors' dtype and rounded once into P's.
      const torch::Tensor P0 = as2d(P0_);
      if (P2.scalar_type() == A_.scalar_type()) {
        P2.copy_(P0);
        additive_write_back(P2, A_, B_, s_);
      } else {
        for_each_row_panel(
            P0, A_.scalar_type(), ctx_.target.rank,
            [&](int64_t row0, const torch::Tensor& panel) {
              torch::Tensor acc = panel;  // a copy of P0's rows, starting at a multiple of r
              additive_write_back(acc, A_.narrow(0, row0, panel.size(0)), B_, s_);
              P2.narrow(0, row0, panel.size(0)).copy_(acc);
            },
            /*always_copy=*/true);
      }
    } else {
      // The changes A − A_prev, B − B_prev go into the copies' own storage (forgotten next):
      // two factor-sized allocations fewer per step.
      additive_write_back(P2, at::sub_out(A_prev_, A_, A_prev_), at::sub_out(B_prev_, B_, B_prev_), s_);
      forget_factors();
    }
    discard();
    ++steps_;
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"A", A_}, {"B", B_}};
    if (exact_) v.emplace_back("P0", P0_);
    return v;
  }

  std::string note() const override {
    return fmt::format("s={:g}, rank(dP) <= {}, writeback {}", s_, std::min({2 * ctx_.target.rank, n_, m_}),
                       exact_ ? "exact" : "incremental");
  }

  std::string settings() const override { return fmt::format("scale {:.17g}", s_); }

 private:
  torch::Tensor P0_;
};

}  // namespace

MethodInfo additive() {
  MethodInfo m;
  m.name = "additive";
  m.weight_decay_on = "the factors A, B (both start at 0)";
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const int64_t t = ctx.target.rank * (v.n + v.m);
    return std::make_pair(t * v.factor_bytes + (use_exact(ctx) ? v.n * v.m * v.param_bytes : 0), t);  // A, B, P0
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<AdditiveProjector>(std::move(ctx)); };
  return m;
}

}  // namespace gradlora::methods
