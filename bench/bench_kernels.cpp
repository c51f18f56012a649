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
#include "bench_util.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using gradlora::bench::fail;
using gradlora::bench::median;
using gradlora::bench::time_ms;

constexpr const char* kProgram = "gradlora_bench_kernels";

}  // namespace

int main(int argc, char** argv) {
  int threads = 1, repeats = 21, settle_ms = 200;
  std::string shapes = "2048x2048,4096x4096", ranks = "8,32", isa;
  gradlora::bench::Args(kProgram)
      .add("--threads", threads)
      .add("--repeats", repeats)
      .add("--shapes", shapes)
      .add("--ranks", ranks)
      .add("--settle-ms", settle_ms)
      .add("--isa", isa)
      .parse(argc, argv);
  if (threads < 1) fail(kProgram, "--threads: must be at least 1, got " + std::to_string(threads));
  if (repeats < 1) fail(kProgram, "--repeats: must be at least 1, got " + std::to_string(repeats));
  if (settle_ms < 0) fail(kProgram, "--settle-ms: must be 0 or more, got " + std::to_string(settle_ms));
  at::set_num_threads(threads);
  try {
    if (!isa.empty() && !gradlora::set_cpu_kernels_isa(isa))
      fail(kProgram, "--isa '" + isa + "': not available on this CPU");
  } catch (const std::exception& e) {
    fail(kProgram, std::string("--isa: ") + e.what());
  }
  const auto dims = gradlora::bench::parse_shapes(kProgram, shapes);
  const std::vector<int64_t> rank_list = gradlora::bench::parse_ranks(kProgram, ranks);
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
