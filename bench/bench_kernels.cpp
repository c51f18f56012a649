// The two kernels of a low-rank step timed alone, each against the sgemm rate of the same run.
//
//   gradlora_bench_kernels --threads=1 --repeats=21 --shapes=4096x4096,2048x2048 --ranks=8,32
//
// For each shape and rank, each repeat times, one after the other (interleaved):
//   projection  lora_factor_grads: gA = s·G·Bᵀ and gB = s·Aᵀ·G from G (n×m), 4·n·m·r flops
//   write-back  lora_write_back into P: P += s·(ΔA·B1 + A0·ΔB), rank 2r, 4·n·m·r flops
//   sgemm       a 2048³ torch::mm (OpenBLAS), followed by a pause: its threads spin on after it
// and prints the medians, in ms and GFLOPS. These are the public functions the methods call;
// they run gradlora's CPU kernels where the CPU has them (--isa=avx2 picks the AVX2 form on an
// AVX-512 CPU, --isa=none the library path).
#include <gradlora/gradlora.h>

#include "bench_args.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

template <typename Fn>
double time_ms(Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(item);
  return out;
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "gradlora_bench_kernels: %s\n", what.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1, repeats = 21, settle_ms = 200;
  std::string shapes = "2048x2048,4096x4096", ranks = "8,32", isa;
  gradlora::bench::Args("gradlora_bench_kernels")
      .add("--threads", threads)
      .add("--repeats", repeats)
      .add("--shapes", shapes)
      .add("--ranks", ranks)
      .add("--settle-ms", settle_ms)
      .add("--isa", isa)
      .parse(argc, argv);
  if (threads < 1 || repeats < 1) fail("--threads and --repeats must be at least 1");
  at::set_num_threads(threads);
  try {
    if (!isa.empty() && !gradlora::set_cpu_kernels_isa(isa)) fail("--isa '" + isa + "': not available on this CPU");
  } catch (const std::exception& e) {
    fail(std::string("--isa: ") + e.what());
  }
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (const std::string& shape : split(shapes)) {
    const auto x = shape.find('x');
    int64_t n = 0, m = 0;
    try {
      if (x == std::string::npos) throw std::invalid_argument("no x");
      n = std::stoll(shape.substr(0, x));
      m = std::stoll(shape.substr(x + 1));
    } catch (const std::exception&) {
      fail("--shapes: '" + shape + "' is not NxM");
    }
    if (n < 1 || m < 1) fail("--shapes: '" + shape + "' is not NxM with N, M at least 1");
    dims.emplace_back(n, m);
  }
  std::vector<int64_t> rank_list;
  for (const std::string& rs : split(ranks)) {
    int64_t r = 0;
    try {
      r = std::stoll(rs);
    } catch (const std::exception&) {
      fail("--ranks: '" + rs + "' is not a number");
    }
    if (r < 1) fail("--ranks: '" + rs + "' is below 1");
    rank_list.push_back(r);
  }
  std::printf("threads %d, CPU kernels %s, median of %d interleaved repeats\n", threads,
              gradlora::cpu_kernels_isa().c_str(), repeats);
  std::printf("%-12s %4s %12s %10s %12s %10s %10s\n", "shape", "r", "project ms", "GFLOPS", "write-back ms", "GFLOPS",
              "sgemm GF");
  torch::manual_seed(0);
  const torch::Tensor X = torch::randn({2048, 2048}), Y = torch::randn({2048, 2048});
  torch::Tensor Z = torch::empty({2048, 2048});
  for (const auto& [n, m] : dims) {
    for (const int64_t r : rank_list) {
      const std::string shape = std::to_string(n) + "x" + std::to_string(m);
      const torch::Tensor G = torch::randn({n, m}), A0 = torch::randn({n, r}) * 0.01, B0 = torch::randn({r, m}) * 0.01;
      const torch::Tensor A1 = A0 + 1e-3, B1 = B0 - 1e-3;
      torch::Tensor P = torch::randn({n, m});
      std::vector<double> proj, wb, rate;
      for (int i = 0; i < repeats + 1; ++i) {  // the first repeat warms up and is dropped
        const double tp = time_ms([&] { gradlora::lora_factor_grads(G, A0, B0, 0.5); });
        const double tw = time_ms([&] { gradlora::lora_write_back(P, A0, B0, A1, B1, 1e-3); });
        const double ts = time_ms([&] { torch::mm_out(Z, X, Y); });
        std::this_thread::sleep_for(std::chrono::milliseconds(settle_ms));
        if (i == 0) continue;
        proj.push_back(tp);
        wb.push_back(tw);
        rate.push_back(2.0 * 2048 * 2048 * 2048 / ts / 1e6);
      }
      const double flops = 4.0 * static_cast<double>(n) * m * r, tp = median(proj), tw = median(wb);
      std::printf("%-12s %4lld %12.3f %10.1f %12.3f %10.1f %10.1f\n", shape.c_str(), static_cast<long long>(r), tp,
                  flops / tp / 1e6, tw, flops / tw / 1e6, median(rate));
    }
  }
}
