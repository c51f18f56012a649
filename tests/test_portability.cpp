// Seeded draws are a function of the seed alone: the same bits whatever vector unit the CPU
// has, so data-parallel ranks on different machines draw the same projections.
#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

using namespace gradlora;

namespace {

// Runs the draws tool in a child process, with ATEN_CPU_CAPABILITY set to `capability`
// (or unset: the machine's best), and returns the bytes it wrote.
std::string draws_with_capability(const char* capability) {
  const std::string out = (std::filesystem::temp_directory_path() /
                           fmt::format("gradlora-draws-{}-{}.bin", ::getpid(), capability ? capability : "best"))
                              .string();
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (capability) {
      ::setenv("ATEN_CPU_CAPABILITY", capability, 1);
    } else {
      ::unsetenv("ATEN_CPU_CAPABILITY");
    }
    ::execl(GRADLORA_DRAWS_EXE, GRADLORA_DRAWS_EXE, out.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << GRADLORA_DRAWS_EXE << " failed: " << status;
  std::ifstream in(out, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove(out);
  return bytes;
}

}  // namespace

TEST(Portability, DrawsDoNotDependOnTheCpuKernel) {
  const std::string scalar = draws_with_capability("default");
  const std::string best = draws_with_capability(nullptr);
  // Layout of the tool's file: gradlora's draws, then LibTorch's own fp32 normal_ (control).
  const size_t ours = (1024 * 8) * 4 + (8 * 999) * 8 + (8 * 1024) * 4;
  const size_t control = 1024 * 8 * 4;
  ASSERT_EQ(scalar.size(), ours + control);
  ASSERT_EQ(best.size(), ours + control);
  EXPECT_EQ(scalar.compare(0, ours, best, 0, ours), 0)
      << "gradlora's seeded draws differ between ATEN_CPU_CAPABILITY=default and the machine's best kernel";
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) {
    // The control shows that the capability setting reaches LibTorch's kernels at all: its fp32
    // normal_ takes a vectorised path with AVX2 and a scalar one without, and they differ.
    EXPECT_NE(scalar.compare(ours, control, best, ours, control), 0)
        << "LibTorch's fp32 normal_ gave the same bits with and without AVX2: the test cannot tell "
           "whether ATEN_CPU_CAPABILITY took effect";
  }
#endif
}

TEST(Portability, NormalDrawsHaveTheRequestedMoments) {
  // The CPU sampler is gradlora's own: check mean, variance and kurtosis of 2^18 draws
  // (tolerances of about 5 standard errors).
  const double sd = 0.7;
  const int64_t N = 1 << 18;
  const torch::Tensor x = seeded_normal({N}, sd, 12345, torch::TensorOptions().dtype(torch::kDouble));
  const double mean = x.mean().item<double>();
  const double var = x.var().item<double>();
  const double kurt = (x - mean).pow(4).mean().item<double>() / (var * var);
  EXPECT_LT(std::abs(mean), 5 * sd / std::sqrt(double(N)));
  EXPECT_LT(std::abs(var / (sd * sd) - 1.0), 5 * std::sqrt(2.0 / double(N)));
  EXPECT_LT(std::abs(kurt - 3.0), 5 * std::sqrt(24.0 / double(N)));
  // Tail mass beyond 2σ: 2·(1 − Φ(2)) = 0.0455.
  const double tail = (x.abs() > 2 * sd).to(torch::kDouble).mean().item<double>();
  EXPECT_NEAR(tail, 0.0455003, 5 * std::sqrt(0.0455 * 0.9545 / double(N)));
  // Uniform draws of the kaiming init: within ±1/√fan_in, mean 0, variance bound²/3.
  const torch::Tensor u = seeded_kaiming_uniform({16, 4096}, 99, torch::TensorOptions().dtype(torch::kDouble));
  const double bound = 1.0 / 64.0;
  EXPECT_LE(u.abs().max().item<double>(), bound);
  EXPECT_NEAR(u.var().item<double>(), bound * bound / 3, 5 * bound * bound * std::sqrt(4.0 / 45.0 / u.numel()));
}

namespace {

// The CPU sampler as docs/methods.md defines it, one draw at a time: xoshiro256** seeded by
// splitmix64 increments, uniforms from the top 53 bits, Marsaglia's polar method (pairs with
// q = u² + v² outside (0, 1) rejected), ln q from frexp and 12 terms of the atanh series.
std::vector<double> reference_normal(int64_t count, double sd, uint64_t seed) {
  uint64_t s[4];
  for (auto& w : s) {
    seed += 0x9E3779B97F4A7C15ULL;
    uint64_t z = seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    w = z ^ (z >> 31);
  }
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  auto uniform = [&] {
    const uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return static_cast<double>(result >> 11) * 0x1.0p-53;
  };
  auto ln = [](double x) {
    int e = 0;
    double m = std::frexp(x, &e);
    if (m < std::sqrt(0.5)) {
      m *= 2.0;
      e -= 1;
    }
    const double t = (m - 1.0) / (m + 1.0);
    double series = 0.0, power = t;
    for (int k = 0; k < 12; ++k) {
      series += power / (2.0 * k + 1.0);
      power *= t * t;
    }
    return e * 6.93147180369123816490e-01 + (2.0 * series + e * 1.90821492927058770002e-10);
  };
  std::vector<double> out;
  while (static_cast<int64_t>(out.size()) < count) {
    double u, v, q;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      q = u * u + v * v;
    } while (!(q > 0.0 && q < 1.0));
    const double f = std::sqrt(-2.0 * ln(q) / q) * sd;
    out.push_back(u * f);
    if (static_cast<int64_t>(out.size()) < count) out.push_back(v * f);
  }
  return out;
}

}  // namespace

TEST(Portability, NormalDrawsAreTheDefinitionBitForBit) {
  // Counts below, at and across the sampler's batches of pairs and of candidates.
  for (const int64_t count : {1, 2, 3, 15, 16, 17, 127, 128, 129, 1000, 4099}) {
    for (const uint64_t seed : {uint64_t{1}, uint64_t{0xdeadbeefcafe}}) {
      const torch::Tensor x = seeded_normal({count}, 0.37, seed, torch::TensorOptions().dtype(torch::kDouble));
      const std::vector<double> ref = reference_normal(count, 0.37, seed);
      int64_t differ = 0, first = -1;
      for (int64_t i = 0; i < count; ++i) {
        if (std::memcmp(&ref[static_cast<size_t>(i)], x.data_ptr<double>() + i, sizeof(double)) != 0) {
          if (first < 0) first = i;
          ++differ;
        }
      }
      EXPECT_EQ(differ, 0) << differ << " of " << count << " draws differ (seed " << seed << "), first at " << first
                           << ": " << x.data_ptr<double>()[first < 0 ? 0 : first] << " against "
                           << ref[static_cast<size_t>(first < 0 ? 0 : first)];
    }
  }
}
