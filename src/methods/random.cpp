// random: A = U, B = V drawn from (seed, name, resample index) every `resample_every`
// steps, then a lora step; E[update] equals the full SGD update (docs/methods.md).
#include "methods.h"

#include "../cpu_kernels.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

namespace gradlora::methods {

namespace {

class RandomProjector final : public FactorProjector {
 public:
  explicit RandomProjector(ProjectorContext ctx) : FactorProjector(std::move(ctx)) {
    const Target& t = ctx_.target;
    k_ = option_int(t, "resample_every");
    sd_ = t.init_std.value_or(unbiased_random_std(s_, t.rank));
    const auto opts = factor_options(ctx_.param);
    A_ = torch::empty({0}, opts);
    B_ = torch::empty({0}, opts);
    weight_ = WeightTarget(param2d(), exact_);
  }

  void project(const torch::Tensor& G) override {
    torch::Tensor A = A_, B = B_;
    if (resample_due()) {
      std::tie(U_, V_) = draw(resample_index());
      A = U_;
      B = V_;
    }
    auto [gA, gB] = lora_factor_grads(as2d(G), A, B, s_);
    set_grads(std::move(gA), std::move(gB));
  }

  // Of the draws this step projects on (new ones at a resample).
  torch::Tensor energy_kept(const torch::Tensor& g_sq) const override {
    return factor_energy_kept(A_.grad(), B_.grad(), U_.defined() ? U_ : A_, U_.defined() ? V_ : B_, s_, g_sq);
  }

  void discard() override {
    U_ = V_ = torch::Tensor();
    FactorProjector::discard();
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
    remember_factors();
    const double wd = inner.weight_decay();
    if (wd != 0.0 && !inner.decoupled_decay()) {
      // Coupled (L2) decay of the weight: its gradient wd·P, projected like G, so that
      // with inner SGD E[update] = −lr·(G + wd·P), full SGD's.
      torch::Tensor P2 = param2d();
      auto [dA, dB] = lora_factor_grads(weight_.target(P2), A_, B_, s_);
      A_.mutable_grad().add_(dA, wd);
      B_.mutable_grad().add_(dB, wd);
    }
  }

  // Decaying the fresh draws would add zero-mean noise and never shrink P: the decay acts on P.
  bool inner_rule_decays() const override { return false; }

  void write_back(InnerRule& inner) override {
    torch::Tensor P2 = param2d();
    torch::Tensor& target = weight_.target(P2);
    const double wd = inner.weight_decay();
    const bool decoupled = wd != 0.0 && inner.decoupled_decay();
    // adamw: P ← (1 − lr·wd)·P + the change, in the write-back's one pass over P.
    const double before = decoupled && !inner.decays_after_update() ? 1.0 - inner.lr() * wd : 1.0;
    lora_write_back(target, A_prev_, B_prev_, A_, B_, s_, {}, before);
    if (decoupled && inner.decays_after_update()) target.mul_(1.0 - inner.lr() * wd);  // adamw_hf: after
    weight_.publish(P2);
    forget_factors();
    FactorProjector::discard();
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
    weight_.append(v);
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
    if (weight_.has_master()) expect("master", {n_, m_});
  }

  void load(const TensorMap& in) override {
    torch::NoGradGuard guard;
    steps_ = in.at("steps").item<int64_t>();
    if (k_ != 1) {
      A_.set_(in.at("A").to(A_.options()).clone());
      B_.set_(in.at("B").to(B_.options()).clone());
    }
    if (weight_.has_master()) weight_.restore(in.at("master"));
  }

  int64_t trainable() const override { return ctx_.target.rank * (n_ + m_); }

  // The factors have no shape before the first draw: count what they will hold.
  int64_t persistent_bytes() const override {
    const int64_t esize = static_cast<int64_t>(A_.element_size());
    return ((k_ != 1 ? trainable() : 0) + (weight_.has_master() ? n_ * m_ : 0)) * esize;
  }

  std::string note() const override {
    return fmt::format("s={:g}, sigma={:.3g}, resample every {}, on_resample {}{}", s_, sd_, k_,
                       to_string(on_resample_of(ctx_.target)),
                       k_ == 1 ? ", projections regenerated (not stored)" : ", projections stored");
  }

  std::string settings() const override {
    const Target& t = ctx_.target;
    return fmt::format("scale {:.17g}, init_std {}, resample_every {}, on_resample {}", s_,
                       t.init_std ? fmt::format("{:.17g}", *t.init_std) : "auto", k_, to_string(on_resample_of(t)));
  }

 private:
  bool resample_due() const { return k_ == 0 ? steps_ == 0 : steps_ % k_ == 0; }
  int64_t resample_index() const { return k_ == 0 ? 0 : steps_ / k_; }

  std::pair<torch::Tensor, torch::Tensor> draw(int64_t idx) const {
    const auto opts = factor_options(ctx_.param);
    const int64_t r = ctx_.target.rank;
    const uint64_t base = 2 * static_cast<uint64_t>(idx);
    torch::Tensor U, V;
    auto draw_one = [&](int64_t k) {
      if (k == 0) {
        U = seeded_normal({n_, r}, sd_, derive_seed(ctx_.seed, ctx_.name, base), opts);
      } else {
        V = seeded_normal({r, m_}, sd_, derive_seed(ctx_.seed, ctx_.name, base + 1), opts);
      }
    };
    if (opts.device().is_cpu()) {
      cpu::parallel_tasks(2, draw_one);  // two streams of their own: one thread each where there are two
    } else {
      draw_one(0);  // on the caller's thread, where its current stream is
      draw_one(1);
    }
    return {U, V};
  }

  // Moments at a resample (docs/methods.md, "Moments at a resample").
  void move_moments(InnerRule& inner, int64_t idx) {
    methods::move_moments(on_resample_of(ctx_.target), inner, [&] {
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
    });
  }

  double sd_ = 1.0;
  int64_t k_ = 1;
  WeightTarget weight_;
  torch::Tensor U_, V_;
};

}  // namespace

MethodInfo random() {
  MethodInfo m;
  m.name = "random";
  m.weight_decay_on = "the weight P (adamw decoupled, sgd/adam as the L2 gradient wd·P, projected)";
  m.options = {{"resample_every", int64_t{1}, "steps between draws (0 = draw once)", {}, 0.0}};
  m.default_on_resample = OnResample::reset;  // measured best with AdamW (docs/methods.md)
  m.footprint = [](const ProjectorContext& ctx) {
    const ViewSize v = view_size(ctx);
    const int64_t t = ctx.target.rank * (v.n + v.m);
    int64_t bytes = option_int(ctx.target, "resample_every") != 1 ? t * v.factor_bytes : 0;  // stored U, V
    if (use_exact(ctx)) bytes += v.n * v.m * v.factor_bytes;                                 // master copy
    return std::make_pair(bytes, t);
  };
  m.make = [](ProjectorContext ctx) { return std::make_unique<RandomProjector>(std::move(ctx)); };
  return m;
}

}  // namespace gradlora::methods
