#pragma once
// Shared helpers of the tests: the test model (an MLP of any depth, optionally with a
// side branch; a lone weight), a fixed data set, quiet configs, and the devices the
// equivalence tests run on.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace gradlora::testing {

// ---- devices

/// The devices a device-parameterised test runs on: CPU, and CUDA always listed
/// (its instances skip themselves, GRADLORA_SKIP_IF_UNAVAILABLE, where there is no GPU).
inline std::vector<torch::Device> test_devices() { return {torch::Device(torch::kCPU), torch::Device(torch::kCUDA)}; }

/// "cpu" / "cuda", for test names.
inline std::string device_name(const torch::Device& d) { return d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : d.str(); }

inline bool device_available(const torch::Device& d) { return !d.is_cuda() || torch::cuda::is_available(); }

/// Name generator of INSTANTIATE_TEST_SUITE_P over ValuesIn(test_devices()).
struct DeviceName {
  std::string operator()(const ::testing::TestParamInfo<torch::Device>& info) const { return device_name(info.param); }
};

/// Name generator of INSTANTIATE_TEST_SUITE_P over Combine(..., ValuesIn(test_devices())), the
/// device last: the index of the case without the device, then the device ("3_cuda").
struct CaseAndDeviceName {
  template <typename... T>
  std::string operator()(const ::testing::TestParamInfo<std::tuple<T...>>& info) const {
    static_assert(std::is_same_v<std::tuple_element_t<sizeof...(T) - 1, std::tuple<T...>>, torch::Device>,
                  "the device must be the last dimension");
    return std::to_string(info.index / test_devices().size()) + "_" +
           device_name(std::get<sizeof...(T) - 1>(info.param));
  }
};

}  // namespace gradlora::testing

/// Skips the current test (GTEST_SKIP) when `device` is CUDA and no GPU is available.
#define GRADLORA_SKIP_IF_UNAVAILABLE(device)              \
  do {                                                    \
    if (!::gradlora::testing::device_available(device)) { \
      GTEST_SKIP() << "CUDA not available";               \
    }                                                     \
  } while (0)

namespace gradlora::testing {

/// The tests' MLP: Linear layers fc1 … fcN through widths[0] → widths[1] → … → widths[N], tanh
/// between them, and optionally a side branch `extra` from the last layer's input to the output,
/// which a forward pass adds or leaves out (a parameter that some passes do not use).
/// Parameters in the order fc1.weight, fc1.bias, …, fcN.bias, extra.weight, extra.bias.
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(const std::vector<int64_t>& widths, bool side_branch = false) {
    TORCH_CHECK(widths.size() >= 2, "an MLP needs an input and an output width");
    for (size_t i = 0; i + 1 < widths.size(); ++i) {
      layers.push_back(register_module("fc" + std::to_string(i + 1), torch::nn::Linear(widths[i], widths[i + 1])));
    }
    if (side_branch) {
      extra = register_module("extra", torch::nn::Linear(widths[widths.size() - 2], widths.back()));
    }
  }
  torch::Tensor forward(const torch::Tensor& x, bool use_extra = false) {
    torch::Tensor h = x;
    for (size_t i = 0; i + 1 < layers.size(); ++i) h = torch::tanh(layers[i]->forward(h));
    torch::Tensor out = layers.back()->forward(h);
    return use_extra ? out + extra->forward(h) : out;
  }
  /// Layer fc`i` (counted from 1, as in its name).
  torch::nn::Linear fc(size_t i) const { return layers.at(i - 1); }

  std::vector<torch::nn::Linear> layers;
  torch::nn::Linear extra{nullptr};
};
TORCH_MODULE(Mlp);

/// A deterministic MLP (seeded) with the given widths in the given dtype, initialised on the
/// CPU and then moved to `device` (so every device starts from the same weights). The layers
/// draw their initial values in order, fc1 first, `extra` last.
inline Mlp make_mlp(const std::vector<int64_t>& widths, uint64_t seed, torch::ScalarType dtype = torch::kFloat,
                    torch::Device device = torch::kCPU, bool side_branch = false) {
  torch::manual_seed(seed);
  Mlp m(widths, side_branch);
  m->to(dtype);
  if (!device.is_cpu()) m->to(device);
  return m;
}
/// The two-layer in → hidden → out case.
inline Mlp make_mlp(torch::ScalarType dtype = torch::kFloat, int64_t in = 12, int64_t hidden = 16, int64_t out = 6,
                    uint64_t seed = 1, torch::Device device = torch::kCPU) {
  return make_mlp({in, hidden, out}, seed, dtype, device);
}
inline Mlp make_mlp(torch::ScalarType dtype, torch::Device device) { return make_mlp(dtype, 12, 16, 6, 1, device); }

/// A one-parameter "model": `W` itself (not a copy) under `name`.
inline torch::OrderedDict<std::string, torch::Tensor> single_weight(const torch::Tensor& W,
                                                                    const std::string& name = "w") {
  torch::OrderedDict<std::string, torch::Tensor> d;
  d.insert(name, W);
  return d;
}

/// Standard-normal values of the given shape from their own generator (independent of the
/// global one), drawn in double on the CPU and then converted to `dtype`.
inline torch::Tensor seeded_randn(const std::vector<int64_t>& shape, uint64_t seed,
                                  torch::ScalarType dtype = torch::kDouble) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen, torch::TensorOptions().dtype(torch::kDouble)).to(dtype);
}

/// Batch `i` of a fixed regression data set, drawn on the CPU and then moved to `device`.
inline std::pair<torch::Tensor, torch::Tensor> batch(int64_t i, torch::ScalarType dtype = torch::kFloat,
                                                     int64_t in = 12, int64_t out = 6, int64_t size = 32,
                                                     torch::Device device = torch::kCPU) {
  auto gen = at::detail::createCPUGenerator(1000 + i);
  torch::Tensor x = at::randn({size, in}, gen, torch::TensorOptions().dtype(torch::kDouble));
  torch::Tensor y = at::randn({size, out}, gen, torch::TensorOptions().dtype(torch::kDouble));
  return {x.to(dtype).to(device), y.to(dtype).to(device)};
}
inline std::pair<torch::Tensor, torch::Tensor> batch(int64_t i, torch::ScalarType dtype, torch::Device device) {
  return batch(i, dtype, 12, 6, 32, device);
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
  const torch::Tensor sv = torch::linalg_svdvals(d.to(torch::kDouble).cpu());
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
