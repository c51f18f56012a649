// Cost of the checkpoint checksums: writes a checkpoint of about 100 MB (a stack of
// `layers` d×d linear layers with biases, 25M float parameters by default, and its
// LowRankOptimizer: lora rank 8 on the weights, full on the biases, inner adamw, one
// step taken), then times, each `repeats` times (the median is printed):
//
//   load       load_checkpoint into a fresh model and optimizer (verifies every checksum)
//   checksums  tensor_checksum of every tensor the load verifies, alone (the share of
//              the load that verification costs; the file is in the page cache)
//   save       save_checkpoint (computes every checksum; includes the fsync)
//
//   gradlora_bench_checkpoint --threads=2 [--layers=4] [--dim=2500] [--repeats=5] [--dir=/tmp]

#include "bench_args.h"

#include <gradlora/checkpoint.h>
#include <gradlora/gradlora.h>

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

struct Options {
  int threads = 0, repeats = 5;
  int64_t layers = 4, dim = 2500;
  std::string dir;
};

torch::nn::Sequential make_model(const Options& o) {
  torch::nn::Sequential s;
  for (int64_t i = 0; i < o.layers; ++i) s->push_back(torch::nn::Linear(o.dim, o.dim));
  return s;
}

const char* kYaml =
    "optimizer:\n  type: adamw\n  lr: 0.001\ntargets:\n  - match: \"*.weight\"\n    method: lora\n    rank: 8\n"
    "  - match: \"*.bias\"\n    method: full\n";

gradlora::Config quiet_config() {
  gradlora::Config c = gradlora::Config::from_yaml_string(kYaml);
  c.log_report = false;
  return c;
}

template <typename Fn>
double median_ms(int repeats, Fn&& fn) {
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  gradlora::bench::Args args("gradlora_bench_checkpoint");
  args.add("--threads", o.threads)
      .add("--layers", o.layers)
      .add("--dim", o.dim)
      .add("--repeats", o.repeats)
      .add("--dir", o.dir);
  args.parse(argc, argv);
  if (o.threads > 0) torch::set_num_threads(o.threads);
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(o.dir.empty() ? fs::temp_directory_path().string() : o.dir) /
                       ("gradlora_bench_checkpoint_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "checkpoint.pt").string();

  torch::manual_seed(1);
  torch::nn::Sequential model = make_model(o);
  gradlora::LowRankOptimizer opt(model->named_parameters(), quiet_config());
  for (auto& p : model->parameters()) p.mutable_grad() = torch::randn_like(p);
  opt.step();

  const double save_ms = median_ms(o.repeats, [&] { gradlora::save_checkpoint(opt, *model, path); });
  const double mb = static_cast<double>(fs::file_size(path)) / 1e6;

  torch::nn::Sequential fresh = make_model(o);
  gradlora::LowRankOptimizer fresh_opt(fresh->named_parameters(), quiet_config());
  const double load_ms = median_ms(o.repeats, [&] { gradlora::load_checkpoint(fresh_opt, *fresh, path); });

  // The tensors the load verifies, as the load holds them (CPU, contiguous).
  std::vector<torch::Tensor> tensors;
  int64_t bytes = 0;
  for (const auto& p : fresh->parameters()) tensors.push_back(p.detach().clone());
  for (const auto& name : fresh_opt.names()) {
    for (const auto& kv : fresh_opt.state_tensors(name)) tensors.push_back(kv.second.detach().clone());
  }
  for (const auto& t : tensors) bytes += t.numel() * t.element_size();
  uint64_t sink = 0;
  const double sum_ms = median_ms(o.repeats, [&] {
    for (const auto& t : tensors) sink ^= gradlora::detail::tensor_checksum(t);
  });

  std::printf("checkpoint %.1f MB (%zu tensors, %.1f MB of tensor data), %d threads, median of %d\n", mb,
              tensors.size(), static_cast<double>(bytes) / 1e6, torch::get_num_threads(), o.repeats);
  std::printf("load       %8.1f ms (verifies every checksum)\n", load_ms);
  std::printf("checksums  %8.1f ms = %.1f%% of the load (%.2f GB/s)  [%016llx]\n", sum_ms, 100.0 * sum_ms / load_ms,
              static_cast<double>(bytes) / 1e6 / sum_ms, static_cast<unsigned long long>(sink));
  std::printf("save       %8.1f ms (computes every checksum; %.1f%% of it)\n", save_ms, 100.0 * sum_ms / save_ms);
  fs::remove_all(dir);
  return 0;
}
