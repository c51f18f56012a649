// The Projector base: what every method's projector shares (checkpoint I/O of
// its tensors, the settings a checkpoint is checked against).
#include <gradlora/method.h>
#include <gradlora/projector.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <tuple>

namespace gradlora {

Projector::Projector(ProjectorContext ctx) : ctx_(std::move(ctx)) {
  // make_projector refuses fan_in_fan_out on anything but a 2-D weight.
  transposed_ = ctx_.target.fan_in_fan_out && ctx_.param.dim() == 2;
  std::tie(n_, m_) = view_shape(ctx_);
}

std::pair<int64_t, int64_t> Projector::view_shape(const ProjectorContext& ctx) {
  const auto& P = ctx.param;
  const int64_t n = P.dim() == 0 ? 1 : P.size(0);
  const int64_t m = P.dim() == 0 ? 1 : (n == 0 ? 0 : P.numel() / n);
  if (ctx.target.fan_in_fan_out && P.dim() == 2) return {m, n};
  return {n, m};
}

torch::Tensor Projector::param2d() const { return transposed_ ? ctx_.param.t() : ctx_.param.view({n_, m_}); }

torch::Tensor Projector::as2d(const torch::Tensor& x) const { return transposed_ ? x.t() : x.reshape({n_, m_}); }

void Projector::project_zero() {
  torch::NoGradGuard guard;
  project(torch::zeros(ctx_.param.sizes(), ctx_.param.options().requires_grad(false)));
}

std::pair<torch::Tensor, torch::Tensor> Projector::factors() const {
  throw std::invalid_argument(
      fmt::format("parameter '{}' uses method '{}', which keeps no factors", ctx_.name, to_string(ctx_.target.method)));
}

std::pair<torch::Tensor, torch::Tensor> Projector::initial_factors() const {
  throw std::invalid_argument(fmt::format("parameter '{}' uses method '{}', which keeps no initial factors", ctx_.name,
                                          to_string(ctx_.target.method)));
}

int64_t Projector::persistent_bytes() const {
  int64_t b = 0;
  for (const auto& kv : tensors()) b += kv.second.numel() * static_cast<int64_t>(kv.second.element_size());
  return b;
}

std::string Projector::settings() const {
  const Target& t = ctx_.target;
  const MethodInfo& info = method_info(t.method);
  std::string s = fmt::format("scale {:.17g}, init {}, init_std {}, writeback {}, on_resample {}", t.scale(),
                              to_string(t.init), t.init_std ? fmt::format("{:.17g}", *t.init_std) : "auto",
                              to_string(t.writeback), to_string(on_resample_of(t)));
  for (const auto& o : info.options) s += fmt::format(", {} {}", o.key, option_text_of(option(t, o.key)));
  return s;
}

std::string Projector::checkpoint_settings() const {
  // Only added when set, so that checkpoints of untransposed weights keep their settings text.
  return transposed_ ? settings() + ", fan_in_fan_out true" : settings();
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

}  // namespace gradlora
