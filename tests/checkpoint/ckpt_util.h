#pragma once
// Helpers of the checkpoint / adapter / robustness tests: a small MLP, a fixed
// data stream, training loops and snapshots of everything an optimizer holds.
#include <gradlora/gradlora.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fmt/format.h>
#include <unistd.h>

#include "test_util.h"  // test_devices, GRADLORA_SKIP_IF_UNAVAILABLE

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::ckpt_test {

/// The tests' shared MLP (test_util.h), here with two layers.
using Net = ::gradlora::testing::Mlp;

/// A fresh folder under the system's temporary directory, unique per process and call.
inline std::string temp_dir(const std::string& prefix) {
  static std::atomic<int> counter{0};
  const std::filesystem::path p =
      std::filesystem::temp_directory_path() /
      fmt::format("gradlora_{}_{}_{}", prefix, static_cast<long>(::getpid()), counter.fetch_add(1));
  std::filesystem::create_directories(p);
  return p.string();
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

constexpr int64_t kIn = 12, kHidden = 16, kOut = 6;

/// The shared MLP, kIn → hidden → kOut, seeded; a different seed gives different initial
/// weights. Initialised on the CPU, then moved to `device`.
inline Net make_net(uint64_t seed = 1, int64_t hidden = kHidden, torch::ScalarType dtype = torch::kFloat,
                    torch::Device device = torch::kCPU) {
  return ::gradlora::testing::make_mlp({kIn, hidden, kOut}, seed, dtype, device);
}

/// Batch `i` of a fixed regression stream (independent of the global generator), drawn on
/// the CPU, then moved to `device`.
inline std::pair<torch::Tensor, torch::Tensor> batch(int64_t i, torch::ScalarType dtype = torch::kFloat,
                                                     torch::Device device = torch::kCPU) {
  auto gen = at::detail::createCPUGenerator(5000 + i);
  torch::Tensor x = at::randn({16, kIn}, gen, torch::TensorOptions().dtype(torch::kDouble));
  torch::Tensor y = at::randn({16, kOut}, gen, torch::TensorOptions().dtype(torch::kDouble));
  return {x.to(dtype).to(device), y.to(dtype).to(device)};
}

using ::gradlora::testing::quiet;

/// Steps [from, to) on the fixed stream, on the model's device. At step `decay_at` every
/// group's learning rate is halved (a user-side schedule the checkpoint must carry).
inline void train(Net& net, LowRankOptimizer& opt, int64_t from, int64_t to, int64_t decay_at = 5) {
  for (int64_t i = from; i < to; ++i) {
    if (i == decay_at) {
      for (auto& g : opt.param_groups()) g.options().set_lr(g.options().get_lr() * 0.5);
    }
    auto [x, y] = batch(i, net->fc(1)->weight.scalar_type(), net->fc(1)->weight.device());
    opt.zero_grad();
    torch::mse_loss(net->forward(x), y).backward();
    opt.step();
  }
}

/// Everything observable: parameters, every optimizer state tensor, counters
/// and learning rates, by name (cloned).
inline std::vector<std::pair<std::string, torch::Tensor>> snapshot(const LowRankOptimizer& opt,
                                                                   const torch::nn::Module& net) {
  std::vector<std::pair<std::string, torch::Tensor>> s;
  for (const auto& p : net.named_parameters()) s.emplace_back("param." + p.key(), p.value().detach().clone());
  for (const auto& name : opt.names()) {
    for (const auto& kv : opt.state_tensors(name)) {
      s.emplace_back("state." + name + "." + kv.first, kv.second.detach().clone());
    }
  }
  s.emplace_back("step_count", torch::tensor(opt.step_count(), torch::kLong));
  std::vector<double> lrs;
  for (const auto& g : opt.param_groups()) lrs.push_back(g.options().get_lr());
  s.emplace_back("lrs", torch::tensor(lrs, torch::kDouble));
  return s;
}

/// Bit-identical: same names, shapes, dtypes and values.
inline void expect_identical(const std::vector<std::pair<std::string, torch::Tensor>>& a,
                             const std::vector<std::pair<std::string, torch::Tensor>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].first, b[i].first);
    const torch::Tensor &x = a[i].second, &y = b[i].second;
    ASSERT_EQ(x.sizes(), y.sizes()) << a[i].first;
    ASSERT_EQ(x.scalar_type(), y.scalar_type()) << a[i].first;
    EXPECT_TRUE(torch::equal(x, y)) << a[i].first << " differs, max |diff| = "
                                    << (x.to(torch::kDouble) - y.to(torch::kDouble)).abs().max().item<double>();
  }
}

}  // namespace gradlora::ckpt_test
