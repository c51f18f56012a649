#include <gradlora/inner_rule.h>

#include "torch_compat.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace gradlora {

namespace {

using torch::optim::AdamOptions;
using torch::optim::AdamParamState;
using torch::optim::AdamWOptions;
using torch::optim::AdamWParamState;
using torch::optim::OptimizerParamGroup;
using torch::optim::SGDOptions;
using torch::optim::SGDParamState;

const char* const kAdamFields[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};

/// The AdamW of transformers' optimization.py, which galore_torch's GaLoreAdamW also is
/// (decoupled decay after Loshchilov & Hutter, arXiv 1711.05101, in that code's order).
/// Per parameter x with gradient g, at its step t:
///   m ← β1·m + (1 − β1)·g,  v ← β2·v + (1 − β2)·g²
///   x ← x − lr·√(1 − β2ᵗ)/(1 − β1ᵗ) · m/(√v + ε)   (ε added to √v before the bias correction)
///   x ← x − lr·wd·x                                (the decay after the update, of the new x)
/// LibTorch's AdamW divides by √v/√(1 − β2ᵗ) + ε instead and decays x before the update.
/// The state is LibTorch's AdamWParamState (step, exp_avg, exp_avg_sq), so InnerRule
/// reads, saves and loads it as it does AdamW's.
class HfAdamW final : public torch::optim::Optimizer {
 public:
  HfAdamW(std::vector<OptimizerParamGroup> groups, const AdamWOptions& defaults)
      : Optimizer(std::move(groups), std::make_unique<AdamWOptions>(defaults)) {}

  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure) {
      torch::AutoGradMode enable(true);
      loss = closure();
    }
    for (auto& group : param_groups_) {
      const auto& o = static_cast<const AdamWOptions&>(group.options());
      const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
      for (auto& x : group.params()) {
        if (!x.grad().defined()) continue;
        const torch::Tensor& g = x.grad();
        auto& slot = state_[compat::optimizer_state_key(x)];
        if (!slot) {
          auto fresh = std::make_unique<AdamWParamState>();
          fresh->step(0);
          fresh->exp_avg(torch::zeros_like(x, torch::MemoryFormat::Preserve));
          fresh->exp_avg_sq(torch::zeros_like(x, torch::MemoryFormat::Preserve));
          slot = std::move(fresh);
        }
        auto& s = static_cast<AdamWParamState&>(*slot);
        s.step(s.step() + 1);
        s.exp_avg().mul_(b1).add_(g, 1.0 - b1);
        s.exp_avg_sq().mul_(b2).addcmul_(g, g, 1.0 - b2);
        const double t = static_cast<double>(s.step());
        const double step_size = o.lr() * std::sqrt(1.0 - std::pow(b2, t)) / (1.0 - std::pow(b1, t));
        x.add_(s.exp_avg() / s.exp_avg_sq().sqrt().add_(o.eps()), -step_size);
        if (o.weight_decay() > 0.0) x.add_(x, -o.lr() * o.weight_decay());
      }
    }
    return loss;
  }
};

/// A LibTorch optimizer of type `Opt` over `params`: one parameter group when every
/// factor is 1, else one group per parameter whose learning rate is lr·factor.
template <typename Opt, typename Options>
std::unique_ptr<torch::optim::Optimizer> make_rule(const std::vector<torch::Tensor>& params,
                                                   const std::vector<double>& factors, bool grouped,
                                                   const Options& options) {
  std::vector<OptimizerParamGroup> groups;
  if (!grouped) {
    groups.emplace_back(params);
  } else {
    for (size_t i = 0; i < params.size(); ++i) {
      auto o = std::make_unique<Options>(options);
      o->lr(options.lr() * factors[i]);
      groups.emplace_back(std::vector<torch::Tensor>{params[i]}, std::move(o));
    }
  }
  return std::make_unique<Opt>(std::move(groups), options);
}

}  // namespace

InnerRule::InnerRule(std::vector<torch::Tensor> params, const InnerConfig& cfg, double lr, double weight_decay,
                     bool decay_params, std::vector<double> lr_factors)
    : type_(cfg.type),
      momentum_(cfg.momentum != 0),
      amsgrad_(cfg.amsgrad),
      weight_decay_(weight_decay),
      decay_params_(decay_params),
      lr_(lr),
      params_(std::move(params)),
      lr_factors_(std::move(lr_factors)) {
  if (lr_factors_.empty()) lr_factors_.assign(params_.size(), 1.0);
  if (lr_factors_.size() != params_.size()) {
    throw std::invalid_argument(
        fmt::format("InnerRule: {} learning-rate factors for {} parameters", lr_factors_.size(), params_.size()));
  }
  // One LibTorch parameter group unless some parameter has its own learning rate.
  const bool grouped = std::any_of(lr_factors_.begin(), lr_factors_.end(), [](double f) { return f != 1.0; });
  group_of_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) group_of_[i] = grouped ? i : 0;
  if (!decay_params) weight_decay = 0.0;
  switch (type_) {
    case InnerType::sgd:
      opt_ = make_rule<torch::optim::SGD>(params_, lr_factors_, grouped,
                                          SGDOptions(lr)
                                              .momentum(cfg.momentum)
                                              .dampening(cfg.dampening)
                                              .weight_decay(weight_decay)
                                              .nesterov(cfg.nesterov));
      break;
    case InnerType::adam:
      opt_ = make_rule<torch::optim::Adam>(params_, lr_factors_, grouped,
                                           AdamOptions(lr)
                                               .betas({cfg.betas[0], cfg.betas[1]})
                                               .eps(cfg.eps)
                                               .weight_decay(weight_decay)
                                               .amsgrad(cfg.amsgrad));
      break;
    case InnerType::adamw:
      opt_ = make_rule<torch::optim::AdamW>(params_, lr_factors_, grouped,
                                            AdamWOptions(lr)
                                                .betas({cfg.betas[0], cfg.betas[1]})
                                                .eps(cfg.eps)
                                                .weight_decay(weight_decay)
                                                .amsgrad(cfg.amsgrad));
      break;
    case InnerType::adamw_hf:
      opt_ = make_rule<HfAdamW>(
          params_, lr_factors_, grouped,
          AdamWOptions(lr).betas({cfg.betas[0], cfg.betas[1]}).eps(cfg.eps).weight_decay(weight_decay));
      break;
  }
}

void InnerRule::set_lr(double lr) {
  lr_ = lr;
  for (size_t i = 0; i < params_.size(); ++i) opt_->param_groups()[group_of_[i]].options().set_lr(lr * lr_factors_[i]);
}
double InnerRule::lr(size_t i) const { return lr_ * lr_factors_.at(i); }
double InnerRule::lr_of(const torch::Tensor& param) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].is_same(param)) return lr(i);
  }
  return lr_;
}
void InnerRule::step() { opt_->step(); }
void InnerRule::reset_state() { opt_->state().clear(); }

std::map<std::string, torch::Tensor> InnerRule::state(size_t i) const {
  std::map<std::string, torch::Tensor> out;
  auto it = opt_->state().find(compat::optimizer_state_key(params_.at(i)));
  if (it == opt_->state().end()) return out;
  auto put = [&](const char* k, const torch::Tensor& t) {
    if (t.defined()) out[k] = t;
  };
  if (auto* s = dynamic_cast<AdamWParamState*>(it->second.get())) {
    put("exp_avg", s->exp_avg());
    put("exp_avg_sq", s->exp_avg_sq());
    put("max_exp_avg_sq", s->max_exp_avg_sq());
  } else if (auto* s = dynamic_cast<AdamParamState*>(it->second.get())) {
    put("exp_avg", s->exp_avg());
    put("exp_avg_sq", s->exp_avg_sq());
    put("max_exp_avg_sq", s->max_exp_avg_sq());
  } else if (auto* s = dynamic_cast<SGDParamState*>(it->second.get())) {
    put("momentum_buffer", s->momentum_buffer());
  }
  return out;
}

int64_t InnerRule::step_count(size_t i) const {
  auto it = opt_->state().find(compat::optimizer_state_key(params_.at(i)));
  if (it == opt_->state().end()) return 0;
  if (auto* s = dynamic_cast<AdamWParamState*>(it->second.get())) return s->step();
  if (auto* s = dynamic_cast<AdamParamState*>(it->second.get())) return s->step();
  return 0;
}

torch::Tensor InnerRule::first_moment(size_t i) const {
  auto st = state(i);
  auto it = st.find(type_ == InnerType::sgd ? "momentum_buffer" : "exp_avg");
  return it == st.end() ? torch::Tensor() : it->second;
}

int64_t InnerRule::state_tensors_per_element() const {
  if (type_ == InnerType::sgd) return momentum_ ? 1 : 0;
  return amsgrad_ ? 3 : 2;
}

int64_t InnerRule::state_tensors_per_element(const InnerConfig& cfg) {
  if (cfg.type == InnerType::sgd) return cfg.momentum != 0 ? 1 : 0;
  return cfg.amsgrad ? 3 : 2;
}

void InnerRule::save(TensorMap& out, const std::string& prefix) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string p = fmt::format("{}{}_", prefix, i);
    auto it = opt_->state().find(compat::optimizer_state_key(params_[i]));
    if (it == opt_->state().end()) continue;
    out[p + "step"] = torch::tensor(step_count(i), torch::kLong);
    for (const auto& kv : state(i)) out[p + kv.first] = kv.second;
  }
}

void InnerRule::check(const TensorMap& in, const std::string& prefix, std::vector<std::string>& problems) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string p = fmt::format("{}{}_", prefix, i);
    if (!in.count(p + "step")) continue;  // no state yet: fine
    std::vector<std::string> fields;
    if (type_ == InnerType::sgd) {
      if (momentum_) fields.push_back("momentum_buffer");
    } else {
      fields = {"exp_avg", "exp_avg_sq"};
      if (amsgrad_) fields.push_back("max_exp_avg_sq");
    }
    for (const auto& f : fields) {
      auto it = in.find(p + f);
      // numel 0: a `random` projection not drawn yet in this process (the projector checks its shape).
      if (it == in.end()) {
        problems.push_back(fmt::format("inner-rule state '{}' is missing (was it saved with another inner rule?)", f));
      } else if (params_[i].numel() > 0 && it->second.sizes() != params_[i].sizes()) {
        problems.push_back(fmt::format("inner-rule state '{}' has shape {}, expected {}", f,
                                       fmt::join(it->second.sizes(), "x"), fmt::join(params_[i].sizes(), "x")));
      }
    }
    for (const char* f : kAdamFields) {
      if (type_ == InnerType::sgd && in.count(p + f)) {
        problems.push_back(fmt::format("checkpoint holds Adam state '{}' but the inner rule is sgd", f));
        break;
      }
    }
    if (type_ != InnerType::sgd && in.count(p + "momentum_buffer")) {
      problems.push_back(fmt::format("checkpoint holds SGD state but the inner rule is {}", to_string(type_)));
    }
  }
}

void InnerRule::load(const TensorMap& in, const std::string& prefix) {
  opt_->state().clear();
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string p = fmt::format("{}{}_", prefix, i);
    auto st = in.find(p + "step");
    if (st == in.end()) continue;
    auto get = [&](const char* f) {
      auto it = in.find(p + f);
      return it == in.end() ? torch::Tensor() : it->second.to(params_[i].options()).clone();
    };
    const int64_t step = st->second.item<int64_t>();
    std::unique_ptr<torch::optim::OptimizerParamState> s;
    if (type_ == InnerType::sgd) {
      auto x = std::make_unique<SGDParamState>();
      x->momentum_buffer(get("momentum_buffer"));
      s = std::move(x);
    } else if (type_ == InnerType::adam) {
      auto x = std::make_unique<AdamParamState>();
      x->step(step);
      x->exp_avg(get("exp_avg"));
      x->exp_avg_sq(get("exp_avg_sq"));
      x->max_exp_avg_sq(get("max_exp_avg_sq"));
      s = std::move(x);
    } else {
      auto x = std::make_unique<AdamWParamState>();
      x->step(step);
      x->exp_avg(get("exp_avg"));
      x->exp_avg_sq(get("exp_avg_sq"));
      x->max_exp_avg_sq(get("max_exp_avg_sq"));
      s = std::move(x);
    }
    opt_->state()[compat::optimizer_state_key(params_[i])] = std::move(s);
  }
}

}  // namespace gradlora
