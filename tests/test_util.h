#pragma once
// Shared helpers of the core tests: a small MLP, a fixed data set, and
// quiet configs.
#include <gradlora/gradlora.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace gradlora::testing {

struct Mlp2Impl : torch::nn::Module {
  Mlp2Impl(int64_t in, int64_t hidden, int64_t out)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, out))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Mlp2);

/// A deterministic MLP (seeded) in the given dtype.
inline Mlp2 make_mlp(torch::ScalarType dtype = torch::kFloat, int64_t in = 12, int64_t hidden = 16,
                     int64_t out = 6, uint64_t seed = 1) {
  torch::manual_seed(seed);
  Mlp2 m(in, hidden, out);
  m->to(dtype);
  return m;
}

/// Batch `i` of a fixed regression data set.
inline std::pair<torch::Tensor, torch::Tensor> batch(int64_t i, torch::ScalarType dtype = torch::kFloat,
                                                     int64_t in = 12, int64_t out = 6, int64_t size = 32) {
  auto gen = at::detail::createCPUGenerator(1000 + i);
  torch::Tensor x = at::randn({size, in}, gen, torch::TensorOptions().dtype(torch::kDouble));
  torch::Tensor y = at::randn({size, out}, gen, torch::TensorOptions().dtype(torch::kDouble));
  return {x.to(dtype), y.to(dtype)};
}

/// Parses YAML and switches off the construction log.
inline Config quiet(const std::string& yaml) {
  Config c = Config::from_yaml_string(yaml);
  c.log_report = false;
  return c;
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

/// Numerical rank: singular values above `rel`·σ_max (rounding noise of a
/// weight difference would otherwise count as rank).
inline int64_t numerical_rank(const torch::Tensor& d, double rel) {
  const torch::Tensor sv = torch::linalg_svdvals(d.to(torch::kDouble));
  const double top = sv.max().item<double>();
  return (sv > rel * top).sum().item<int64_t>();
}

/// Expects `fn` to throw ConfigError whose message contains every fragment.
template <typename Fn>
void expect_config_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected gradlora::ConfigError";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
  }
}

}  // namespace gradlora::testing
