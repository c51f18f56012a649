// The projectors: lora, random, additive, full (design.md §2).
#include <gradlora/maths.h>
#include <gradlora/projector.h>

#include "projectors_internal.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>

namespace gradlora {

// ---------------------------------------------------------------- base

Projector::Projector(ProjectorContext ctx) : ctx_(std::move(ctx)) {
  const auto& P = ctx_.param;
  n_ = P.dim() == 0 ? 1 : P.size(0);
  m_ = P.dim() == 0 ? 1 : (n_ == 0 ? 0 : P.numel() / n_);
}

torch::Tensor Projector::param2d() const { return ctx_.param.view({n_, m_}); }

std::pair<torch::Tensor, torch::Tensor> Projector::factors() const {
  throw std::invalid_argument(fmt::format("parameter '{}' uses method '{}', which keeps no factors", ctx_.name,
                                          to_string(ctx_.target.method)));
}

std::pair<torch::Tensor, torch::Tensor> Projector::initial_factors() const {
  throw std::invalid_argument(fmt::format("parameter '{}' uses method '{}', which keeps no initial factors",
                                          ctx_.name, to_string(ctx_.target.method)));
}

int64_t Projector::persistent_bytes() const {
  int64_t b = 0;
  for (const auto& kv : tensors()) b += kv.second.numel() * static_cast<int64_t>(kv.second.element_size());
  return b;
}

void Projector::save(TensorMap& out) const {
  out["steps"] = torch::tensor(steps_, torch::kLong);
  for (const auto& kv : tensors()) out[kv.first] = kv.second;
}

void Projector::check(const TensorMap& in, std::vector<std::string>& problems) const {
  if (!in.count("steps")) problems.push_back("counter 'steps' is missing");
  for (const auto& kv : tensors()) {
    auto it = in.find(kv.first);
    if (it == in.end()) {
      problems.push_back(fmt::format("tensor '{}' is missing", kv.first));
    } else if (it->second.sizes() != kv.second.sizes()) {
      problems.push_back(fmt::format("tensor '{}' has shape [{}], expected [{}]", kv.first,
                                     fmt::join(it->second.sizes(), ", "), fmt::join(kv.second.sizes(), ", ")));
    }
  }
}

void Projector::load(const TensorMap& in) {
  steps_ = in.at("steps").item<int64_t>();
  torch::NoGradGuard guard;
  for (auto& kv : tensors()) kv.second.copy_(in.at(kv.first));
}

namespace {

using detail::factor_options;
using detail::release_grad;
using detail::use_exact;

// -------------------------------------------------------------- full

class FullProjector final : public Projector {
 public:
  using Projector::Projector;
  std::vector<torch::Tensor> inner_params() const override { return {ctx_.param}; }
  void project(const torch::Tensor&) override {}  // the inner rule reads P.grad itself
  void write_back(InnerRule&) override { ++steps_; }
  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override { return {}; }
  int64_t trainable() const override { return ctx_.param.numel(); }
};

// -------------------------------------------------------------- lora

/// P = P0 + s·A·B (design.md §2.1), with merge-and-restart every `merge_every` steps.
class LoraProjector final : public Projector {
 public:
  explicit LoraProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    s_ = t.scale();
    exact_ = use_exact(ctx_);
    torch::NoGradGuard guard;
    A_ = torch::empty({n_, t.rank}, factor_options(ctx_.param));
    B_ = torch::empty({t.rank, m_}, factor_options(ctx_.param));
    init_factors(0);
  }

  std::vector<torch::Tensor> inner_params() const override { return {A_, B_}; }

  void project(const torch::Tensor& G) override {
    auto [gA, gB] = lora_factor_grads(G.reshape({n_, m_}), A_, B_, s_);
    A_.mutable_grad() = gA;
    B_.mutable_grad() = gB;
  }

  void discard() override {
    release_grad(A_);
    release_grad(B_);
  }

  void commit(InnerRule&) override {
    if (!exact_) {
      A_prev_ = A_.clone();
      B_prev_ = B_.clone();
    }
  }

  void write_back(InnerRule& inner) override {
    torch::Tensor P2 = param2d();
    if (exact_) {
      // P = P0 + s·(A·B − A0·B0), rounded once into P's dtype; no n×m temporary.
      const torch::Tensor P0 = P0_.view({n_, m_});
      if (A0_.defined()) {
        lora_write_back(P2, A0_, B0_, A_, B_, s_, P0);  // exactly P0 while A = A0, B = B0
      } else {
        add_product(P2, A_, B_, s_, P0);
      }
    } else {
      lora_write_back(P2, A_prev_, B_prev_, A_, B_, s_);
      A_prev_ = B_prev_ = torch::Tensor();
    }
    discard();
    ++steps_;
    const int64_t K = ctx_.target.merge_every;
    if (K > 0 && steps_ % K == 0) {
      // Merge-and-restart: P already holds s·(A·B − A0·B0); start new factors.
      init_factors(steps_ / K);
      inner.reset_state();
    }
  }

  std::pair<torch::Tensor, torch::Tensor> factors() const override { return {A_, B_}; }

  std::pair<torch::Tensor, torch::Tensor> initial_factors() const override {
    if (A0_.defined()) return {A0_, B0_};
    const int64_t K = ctx_.target.merge_every;
    return draw_initial(K > 0 ? steps_ / K : 0);
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

  int64_t trainable() const override { return A_.numel() + B_.numel(); }

  std::string note() const override {
    std::string n = fmt::format("s={:g}, init {}, writeback {}", s_, to_string(ctx_.target.init),
                                exact_ ? "exact" : "incremental");
    if (ctx_.target.merge_every > 0) n += fmt::format(", merge every {}", ctx_.target.merge_every);
    return n;
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
    const Target& t = ctx_.target;
    auto [A0, B0] = draw_initial(restart);
    A_.copy_(A0);
    B_.copy_(B0);
    if (exact_) {
      P0_ = ctx_.param.detach().clone();
      if (t.init == Init::symmetric) {
        A0_ = A_.clone();
        B0_ = B_.clone();
      }
    }
  }

  double s_ = 1.0;
  bool exact_ = false;
  torch::Tensor A_, B_, A_prev_, B_prev_, P0_, A0_, B0_;
};

// ------------------------------------------------------------ random

/// Resampled Gaussian projection (design.md §2.2): A = U, B = V drawn every
/// `resample_every` steps from (seed, name, resample index), then a lora step.
class RandomProjector final : public Projector {
 public:
  explicit RandomProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    const Target& t = ctx_.target;
    s_ = t.scale();
    k_ = t.resample_every;
    sd_ = t.init_std.value_or(unbiased_random_std(s_, t.rank));
    exact_ = use_exact(ctx_);
    const auto opts = factor_options(ctx_.param);
    A_ = torch::empty({0}, opts);
    B_ = torch::empty({0}, opts);
    if (exact_) master_ = ctx_.param.detach().to(opts.dtype().toScalarType()).reshape({n_, m_}).clone();
  }

  std::vector<torch::Tensor> inner_params() const override { return {A_, B_}; }

  void project(const torch::Tensor& G) override {
    torch::Tensor A = A_, B = B_;
    if (resample_due()) {
      std::tie(U_, V_) = draw(resample_index());
      A = U_;
      B = V_;
    }
    auto [gA, gB] = lora_factor_grads(G.reshape({n_, m_}), A, B, s_);
    A_.mutable_grad() = gA;
    B_.mutable_grad() = gB;
  }

  void discard() override {
    U_ = V_ = torch::Tensor();
    release_grad(A_);
    release_grad(B_);
  }

  void commit(InnerRule& inner) override {
    torch::NoGradGuard guard;
    if (U_.defined()) {
      const int64_t idx = resample_index();
      if (idx > 0) move_moments(inner, idx);
      A_.set_(U_);
      B_.set_(V_);
      U_ = V_ = torch::Tensor();
    }
    A_prev_ = A_.clone();
    B_prev_ = B_.clone();
  }

  void write_back(InnerRule&) override {
    if (exact_) {
      lora_write_back(master_, A_prev_, B_prev_, A_, B_, s_);
      param2d().copy_(master_);
    } else {
      torch::Tensor P2 = param2d();
      lora_write_back(P2, A_prev_, B_prev_, A_, B_, s_);
    }
    A_prev_ = B_prev_ = torch::Tensor();
    release_grad(A_);
    release_grad(B_);
    ++steps_;
    if (k_ == 1) {
      // Nothing to keep: the next step draws again. The moments stay keyed by A_, B_.
      A_.set_(torch::empty({0}, A_.options()));
      B_.set_(torch::empty({0}, B_.options()));
    }
  }

  std::pair<torch::Tensor, torch::Tensor> factors() const override {
    if (k_ == 1) {
      throw std::invalid_argument(fmt::format(
          "parameter '{}' uses method 'random' with resample_every 1: its projections are drawn afresh each step "
          "and not stored",
          ctx_.name));
    }
    return {A_, B_};
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v;
    if (k_ != 1) {
      // Stored between resamples; before the first step they have no shape yet.
      v.emplace_back("A", A_);
      v.emplace_back("B", B_);
    }
    if (exact_) v.emplace_back("master", master_);
    return v;
  }

  void check(const TensorMap& in, std::vector<std::string>& problems) const override {
    if (!in.count("steps")) problems.push_back("counter 'steps' is missing");
    const int64_t r = ctx_.target.rank;
    auto expect = [&](const char* key, std::vector<int64_t> shape) {
      auto it = in.find(key);
      if (it == in.end()) {
        problems.push_back(fmt::format("tensor '{}' is missing", key));
      } else if (it->second.numel() != 0 && it->second.sizes() != at::IntArrayRef(shape)) {
        problems.push_back(fmt::format("tensor '{}' has shape [{}], expected [{}]", key,
                                       fmt::join(it->second.sizes(), ", "), fmt::join(shape, ", ")));
      }
    };
    if (k_ != 1) {
      expect("A", {n_, r});
      expect("B", {r, m_});
    }
    if (exact_) expect("master", {n_, m_});
  }

  void load(const TensorMap& in) override {
    torch::NoGradGuard guard;
    steps_ = in.at("steps").item<int64_t>();
    if (k_ != 1) {
      A_.set_(in.at("A").to(A_.options()).clone());
      B_.set_(in.at("B").to(B_.options()).clone());
    }
    if (exact_) master_.copy_(in.at("master"));
  }

  int64_t trainable() const override { return ctx_.target.rank * (n_ + m_); }

  // The factors have no shape before the first draw: count what they will hold.
  int64_t persistent_bytes() const override {
    const int64_t esize = static_cast<int64_t>(A_.element_size());
    return ((k_ != 1 ? trainable() : 0) + (exact_ ? n_ * m_ : 0)) * esize;
  }

  std::string note() const override {
    return fmt::format("s={:g}, sigma={:.3g}, resample every {}, on_resample {}{}", s_, sd_, k_,
                       to_string(ctx_.target.resample_policy()),
                       k_ == 1 ? ", projections regenerated (not stored)" : ", projections stored");
  }

 private:
  bool resample_due() const { return k_ == 0 ? steps_ == 0 : steps_ % k_ == 0; }
  int64_t resample_index() const { return k_ == 0 ? 0 : steps_ / k_; }

  std::pair<torch::Tensor, torch::Tensor> draw(int64_t idx) const {
    const auto opts = factor_options(ctx_.param);
    const int64_t r = ctx_.target.rank;
    const uint64_t base = 2 * static_cast<uint64_t>(idx);
    return {seeded_normal({n_, r}, sd_, derive_seed(ctx_.seed, ctx_.name, base), opts),
            seeded_normal({r, m_}, sd_, derive_seed(ctx_.seed, ctx_.name, base + 1), opts)};
  }

  // Moments at a resample (README, "Moments at a resample").
  void move_moments(InnerRule& inner, int64_t idx) {
    switch (ctx_.target.resample_policy()) {
      case OnResample::keep:
        return;
      case OnResample::reset:
        inner.reset_state();
        return;
      case OnResample::transfer: {
        // The A-moment estimates s·G·B_oldᵀ. The least-squares gradient consistent with it
        // is s·Ĝ = m_A·(B_old·B_oldᵀ)⁻¹·B_old, and its moment under the new projection is
        // s·Ĝ·B_newᵀ = m_A·X with X = (B_old·B_oldᵀ)⁻¹·B_old·B_newᵀ (r×r); likewise
        // m_B ← A_newᵀ·A_old·(A_oldᵀ·A_old)⁻¹·m_B. Second moments are kept.
        torch::Tensor A_old = A_, B_old = B_;
        if (k_ == 1) std::tie(A_old, B_old) = draw(idx - 1);
        torch::Tensor mA = inner.first_moment(0), mB = inner.first_moment(1);
        if (mA.defined()) {
          const torch::Tensor X = torch::linalg_solve(torch::mm(B_old, B_old.t()), torch::mm(B_old, V_.t()));
          mA.copy_(torch::mm(mA, X));
        }
        if (mB.defined()) {
          const torch::Tensor Y = torch::linalg_solve(torch::mm(A_old.t(), A_old), mB);
          mB.copy_(torch::mm(torch::mm(U_.t(), A_old), Y));
        }
        return;
      }
    }
  }

  double s_ = 1.0, sd_ = 1.0;
  int64_t k_ = 1;
  bool exact_ = false;
  torch::Tensor A_, B_, U_, V_, A_prev_, B_prev_, master_;
};

// ---------------------------------------------------------- additive

/// P = P0 + s·(A·J + J'·B) (design.md §2.3), r need not divide n or m.
class AdditiveProjector final : public Projector {
 public:
  explicit AdditiveProjector(ProjectorContext ctx) : Projector(std::move(ctx)) {
    s_ = ctx_.target.scale();
    exact_ = use_exact(ctx_);
    const auto opts = factor_options(ctx_.param);
    A_ = torch::zeros({n_, ctx_.target.rank}, opts);
    B_ = torch::zeros({ctx_.target.rank, m_}, opts);
    if (exact_) P0_ = ctx_.param.detach().clone();
  }

  std::vector<torch::Tensor> inner_params() const override { return {A_, B_}; }

  void project(const torch::Tensor& G) override {
    const int64_t r = ctx_.target.rank;
    torch::Tensor gA, gB;
    for_each_row_panel(G.reshape({n_, m_}), A_.scalar_type(), r, [&](int64_t row0, const torch::Tensor& panel) {
      auto [pA, pB] = additive_factor_grads(panel, r);  // panels start at multiples of r
      if (!gA.defined()) {
        if (panel.size(0) == n_) {
          std::tie(gA, gB) = std::make_pair(pA, pB);
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
    A_.mutable_grad() = gA;
    B_.mutable_grad() = gB;
  }

  void discard() override {
    release_grad(A_);
    release_grad(B_);
  }

  void commit(InnerRule&) override {
    if (!exact_) {
      A_prev_ = A_.clone();
      B_prev_ = B_.clone();
    }
  }

  void write_back(InnerRule&) override {
    torch::Tensor P2 = param2d();
    if (exact_) {
      // P = P0 + s·(A·J + J'·B), computed in the factors' dtype and rounded once into P's.
      const torch::Tensor P0 = P0_.view({n_, m_});
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
      additive_write_back(P2, A_.sub(A_prev_), B_.sub(B_prev_), s_);
      A_prev_ = B_prev_ = torch::Tensor();
    }
    discard();
    ++steps_;
  }

  std::pair<torch::Tensor, torch::Tensor> factors() const override { return {A_, B_}; }

  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override {
    std::vector<std::pair<std::string, torch::Tensor>> v{{"A", A_}, {"B", B_}};
    if (exact_) v.emplace_back("P0", P0_);
    return v;
  }

  int64_t trainable() const override { return A_.numel() + B_.numel(); }

  std::string note() const override {
    return fmt::format("s={:g}, rank(dP) <= {}, writeback {}", s_, std::min({2 * ctx_.target.rank, n_, m_}),
                       exact_ ? "exact" : "incremental");
  }

 private:
  double s_ = 1.0;
  bool exact_ = false;
  torch::Tensor A_, B_, A_prev_, B_prev_, P0_;
};

}  // namespace

std::unique_ptr<Projector> make_projector(ProjectorContext ctx) {
  const Target& t = ctx.target;
  const torch::Tensor& P = ctx.param;
  const char* method = to_string(t.method);
  if (!P.is_floating_point()) {
    throw ConfigError(fmt::format("parameter '{}': method '{}' needs a floating-point parameter, got dtype {}",
                                  ctx.name, method, c10::toString(P.scalar_type())));
  }
  const bool low_rank = t.method != Method::full && t.method != Method::frozen;
  if (low_rank) {
    if (P.dim() < 2) {
      throw ConfigError(fmt::format(
          "config key 'method': parameter '{}' has {} dimension(s) (shape [{}]); method '{}' needs >= 2 (use full "
          "or frozen)",
          ctx.name, P.dim(), fmt::join(P.sizes(), ", "), method));
    }
    if (!P.is_contiguous()) {
      throw ConfigError(fmt::format("parameter '{}': method '{}' needs a contiguous parameter", ctx.name, method));
    }
    const int64_t n = P.size(0), m = P.numel() / n;
    if (t.rank > std::min(n, m)) {
      throw ConfigError(fmt::format("config key 'rank': parameter '{}' is {}x{}, rank must be <= {}, got {}", ctx.name,
                                    n, m, std::min(n, m), t.rank));
    }
  }
  switch (t.method) {
    case Method::lora:
      return std::make_unique<LoraProjector>(std::move(ctx));
    case Method::random:
      return std::make_unique<RandomProjector>(std::move(ctx));
    case Method::additive:
      return std::make_unique<AdditiveProjector>(std::move(ctx));
    case Method::full:
      return std::make_unique<FullProjector>(std::move(ctx));
    case Method::galore:
      return detail::make_galore_projector(std::move(ctx));
    case Method::hadamard:
      return detail::make_hadamard_projector(std::move(ctx));
    default:
      throw ConfigError(fmt::format("parameter '{}': method '{}' is not available", ctx.name, method));
  }
}

}  // namespace gradlora
