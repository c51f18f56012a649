// Data-parallel benchmark: 2 (or --nproc) ranks on this machine, Gloo over loopback, training a
// stack of L bias-free d×d linear layers (GELU between them, MSE loss) with optimizer-side
// `lora` (inner AdamW). Two ways to keep the ranks in step, with the same maths:
//   lowrank   gradlora::DataParallel: all-reduce the projected gradients gA, gB (r·(n+m) per layer)
//   fullgrad  DDP-like: all-reduce the full gradients dL/dW (n·m per layer) before step(),
//             same bucket size, then the same LowRankOptimizer without a reducer
// Each rank trains on its own batch of --batch rows. Rank 0 prints one JSON line per mode and a
// table with the ratios.
//
//   gradlora_dist_bench [--nproc=2] [--threads=1] [--layers=8] [--dim=1024] [--batch=64] [--rank=8]
//                       [--steps=10] [--warmup=2] [--modes=lowrank,fullgrad]

#include "bench_args.h"

#include <gradlora/distributed.h>
#include <gradlora/gradlora.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Options {
  int nproc = 2, threads = 1;
  int64_t layers = 8, dim = 1024, batch = 64, rank = 8;
  int steps = 10, warmup = 2;
  std::string modes = "lowrank,fullgrad";
};

Options parse(int argc, char** argv) {
  Options o;
  gradlora::bench::Args args("gradlora_dist_bench");
  gradlora::bench::add_stack_options(args, o).add("--nproc", o.nproc).add("--modes", o.modes);
  args.parse(argc, argv);
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

/// One rank of one mode; rank 0 writes a JSON line to `out`.
int run_rank(const Options& o, const std::string& mode, int rank, const std::string& out) {
  at::set_num_threads(o.threads);
  const bool lowrank = mode == "lowrank";
  if (!lowrank && mode != "fullgrad") {
    std::cerr << "gradlora_dist_bench: unknown mode '" << mode << "' (lowrank | fullgrad)\n";
    return 2;
  }
  auto pg = gradlora::process_group_from_env(std::chrono::seconds(120));
  const int64_t L = o.layers, d = o.dim;
  torch::manual_seed(0);
  torch::OrderedDict<std::string, torch::Tensor> weights;
  std::vector<torch::Tensor> W;
  const double bound = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t l = 0; l < L; ++l) {
    W.push_back(torch::empty({d, d}).uniform_(-bound, bound).requires_grad_(true));
    weights.insert("layers." + std::to_string(l) + ".weight", W.back());
  }
  torch::manual_seed(1 + rank);  // each rank its own data
  const torch::Tensor X = torch::randn({o.batch, d});
  const torch::Tensor Y = torch::randn({o.batch, d}).mul_(0.1);

  gradlora::Config cfg;
  cfg.log_report = false;
  cfg.optimizer.type = gradlora::InnerType::adamw;
  cfg.optimizer.lr = 1e-4;
  gradlora::Target t;
  t.match = "layers.*.weight";
  t.method = gradlora::Method::lora;
  t.rank = o.rank;
  cfg.targets.push_back(t);
  gradlora::LowRankOptimizer opt(weights, cfg);
  gradlora::DataParallelOptions dpo;
  dpo.timeout = std::chrono::seconds(120);
  gradlora::DataParallel dp(opt, pg, dpo);  // checks and broadcasts in both modes
  if (!lowrank) opt.set_gradient_reducer(nullptr);

  std::vector<double> step_ms, comm_ms;
  int64_t bytes = 0;
  for (int i = 0; i < o.warmup + o.steps; ++i) {
    // Start every step together, so that one rank's lateness is not counted as communication.
    pg->barrier()->wait();
    const auto t0 = std::chrono::steady_clock::now();
    torch::Tensor x = X;
    for (int64_t l = 0; l < L; ++l) {
      torch::Tensor y = torch::mm(x, W[l].t());
      x = l + 1 < L ? torch::gelu(y) : y;
    }
    torch::mse_loss(x, Y).backward();
    double comm = 0.0;
    if (!lowrank) {
      std::vector<torch::Tensor> grads;
      for (auto& w : W) grads.push_back(w.grad());
      const auto c0 = std::chrono::steady_clock::now();
      gradlora::allreduce_mean(*pg, grads, dpo.bucket_bytes, dpo.timeout);
      comm = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
      bytes = 0;
      for (auto& g : grads) bytes += g.numel() * static_cast<int64_t>(g.element_size());
    }
    opt.step();
    for (auto& w : W) w.mutable_grad() = torch::Tensor();
    const auto t1 = std::chrono::steady_clock::now();
    if (lowrank) {
      comm = dp.stats().last_step_seconds * 1e3;
      bytes = dp.stats().last_step_bytes;
    }
    if (i >= o.warmup) {
      step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      comm_ms.push_back(comm);
    }
  }
  if (rank == 0) {
    std::ofstream f(out);
    f << "{\"mode\": \"" << mode << "\", \"nproc\": " << pg->getSize() << ", \"threads\": " << o.threads
      << ", \"layers\": " << L << ", \"dim\": " << d << ", \"batch\": " << o.batch << ", \"rank\": " << o.rank
      << ", \"steps\": " << o.steps << ", \"bytes_per_step\": " << bytes << ", \"step_ms_median\": " << median(step_ms)
      << ", \"allreduce_ms_median\": " << median(comm_ms) << "}\n";
  }
  return 0;
}

double field(const std::string& json, const std::string& key) {
  const auto p = json.find("\"" + key + "\": ");
  if (p == std::string::npos) return NAN;
  return std::atof(json.c_str() + p + key.size() + 4);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  std::vector<std::string> modes;
  {
    std::stringstream ss(o.modes);
    std::string m;
    while (std::getline(ss, m, ',')) {
      if (!m.empty()) modes.push_back(m);
    }
  }
  std::vector<std::string> lines;
  for (const auto& mode : modes) {
    const std::string out = "/tmp/gradlora_dist_bench_" + std::to_string(getpid()) + "_" + mode + ".json";
    const int rc = gradlora::launch_local(o.nproc, [&](int rank, int) { return run_rank(o, mode, rank, out); });
    if (rc != 0) {
      std::cerr << "gradlora_dist_bench: mode '" << mode << "' failed with status " << rc << "\n";
      return rc;
    }
    std::ifstream f(out);
    std::string line;
    std::getline(f, line);
    std::remove(out.c_str());
    std::printf("%s\n", line.c_str());
    lines.push_back(line);
  }
  if (lines.size() == 2) {
    const double b0 = field(lines[0], "bytes_per_step"), b1 = field(lines[1], "bytes_per_step");
    const double s0 = field(lines[0], "step_ms_median"), s1 = field(lines[1], "step_ms_median");
    const double c0 = field(lines[0], "allreduce_ms_median"), c1 = field(lines[1], "allreduce_ms_median");
    std::printf("%-10s %16s %14s %16s\n", "mode", "bytes/step", "step [ms]", "all-reduce [ms]");
    std::printf("%-10s %16.0f %14.2f %16.2f\n", modes[0].c_str(), b0, s0, c0);
    std::printf("%-10s %16.0f %14.2f %16.2f\n", modes[1].c_str(), b1, s1, c1);
    std::printf("ratio %s/%s: bytes %.1fx, step time %.2fx, all-reduce time %.1fx\n", modes[1].c_str(),
                modes[0].c_str(), b1 / b0, s1 / s0, c1 / c0);
  }
  return 0;
}
