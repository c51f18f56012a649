// What several methods share: the factor base, the master copy, the write-back choice.
#include "methods.h"

#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace gradlora::methods {

bool use_exact(const ProjectorContext& ctx) {
  switch (ctx.target.writeback) {
    case WriteBack::exact:
      return true;
    case WriteBack::incremental:
      return false;
    default:
      return ctx.param.scalar_type() == torch::kBFloat16 || ctx.param.scalar_type() == torch::kHalf;
  }
}

ViewSize view_size(const ProjectorContext& ctx) {
  const torch::Tensor& P = ctx.param;
  ViewSize v;
  std::tie(v.n, v.m) = Projector::view_shape(ctx);
  v.factor_bytes = static_cast<int64_t>(c10::elementSize(factor_dtype(P.scalar_type())));
  v.param_bytes = static_cast<int64_t>(P.element_size());
  return v;
}

void move_moments(OnResample policy, InnerRule& inner, const std::function<void()>& transfer) {
  switch (policy) {
    case OnResample::keep:
      return;
    case OnResample::reset:
      inner.reset_state();
      return;
    case OnResample::transfer:
      transfer();
      return;
  }
}

void decay_toward(const InnerRule& inner, const std::vector<std::pair<torch::Tensor, torch::Tensor>>& x_and_anchor,
                  bool after_step) {
  const double wd = inner.weight_decay();
  if (wd == 0.0 || after_step != inner.decays_after_update()) return;
  torch::NoGradGuard guard;
  for (const auto& [x, x0] : x_and_anchor) {
    const torch::Tensor departure = x - x0;
    if (inner.decoupled_decay()) {
      torch::Tensor(x).sub_(departure, inner.lr_of(x) * wd);
    } else if (x.grad().defined()) {
      torch::Tensor(x).mutable_grad().add_(departure, wd);
    }
  }
}

WeightTarget::WeightTarget(const torch::Tensor& P2d, bool master) {
  // A row-major n×m copy, also of a transposed view (fan_in_fan_out).
  if (master) {
    master_ = torch::empty(P2d.sizes(), P2d.options().dtype(factor_dtype(P2d.scalar_type()))).copy_(P2d.detach());
  }
}

void WeightTarget::publish(torch::Tensor& P2d) const {
  if (master_.defined()) P2d.copy_(master_);
}

void WeightTarget::append(std::vector<std::pair<std::string, torch::Tensor>>& out) const {
  if (master_.defined()) out.emplace_back("master", master_);
}

OptionSpec proj_side_option() {
  return {"proj_side",
          std::string("auto"),
          "side of G the projector multiplies (auto: the smaller)",
          {"auto", "left", "right"},
          std::nullopt};
}

bool projects_left(const Target& t, int64_t n, int64_t m) {
  const std::string side = option_text(t, "proj_side");
  return side == "left" || (side == "auto" && n < m);
}

torch::Tensor factor_energy_kept(const torch::Tensor& gA, const torch::Tensor& gB, const torch::Tensor& A,
                                 const torch::Tensor& B, double s, const torch::Tensor& g_sq) {
  torch::NoGradGuard guard;
  // T with X·T orthonormal columns spanning X's (n×r) columns: V·S⁻¹ for the singular
  // values above the rounding level, zero columns for the others.
  auto whitener = [](const torch::Tensor& X) {
    torch::Tensor U, S, Vh;
    std::tie(U, S, Vh) = torch::linalg_svd(X, /*full_matrices=*/false);
    // On the device: no host synchronisation inside the step.
    const torch::Tensor tol =
        S.max() * (static_cast<double>(std::max(X.size(0), X.size(1))) * std::numeric_limits<double>::epsilon());
    const torch::Tensor inv = torch::where(S > tol, S.reciprocal(), torch::zeros_like(S));
    return Vh.t() * inv.unsqueeze(0);
  };
  const torch::Tensor a = A.to(torch::kDouble), b = B.to(torch::kDouble);
  const torch::Tensor ga = gA.to(torch::kDouble) / s, gb = gB.to(torch::kDouble) / s;  // G·Bᵀ, Aᵀ·G
  const torch::Tensor Ta = whitener(a), Tb = whitener(b.t());
  const torch::Tensor QaG = torch::mm(Ta.t(), gb);                       // Q_Aᵀ·G
  const torch::Tensor GQb = torch::mm(ga, Tb);                           // G·Q_B
  const torch::Tensor QaGQb = torch::mm(torch::mm(Ta.t(), a.t()), GQb);  // Q_Aᵀ·G·Q_B
  const torch::Tensor kept = QaG.square().sum() + GQb.square().sum() - QaGQb.square().sum();
  return kept / g_sq.to(torch::kDouble);
}

FactorProjector::FactorProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
  s_ = ctx_.target.scale();
  exact_ = use_exact(ctx_);
}

void FactorProjector::discard() {
  release_grad(A_);
  release_grad(B_);
}

void FactorProjector::set_grads(torch::Tensor gA, torch::Tensor gB) {
  A_.mutable_grad() = std::move(gA);
  B_.mutable_grad() = std::move(gB);
}

void FactorProjector::remember_factors() {
  A_prev_ = A_.clone();
  B_prev_ = B_.clone();
}

void FactorProjector::forget_factors() { A_prev_ = B_prev_ = torch::Tensor(); }

}  // namespace gradlora::methods
