// The optimizer step against the machine's roofline, every figure taken in the same run.
//
//   gradlora_bench_roofline --threads=2 --repeats=11 [--settle-ms=200] --json=out/roofline.json
//
// For each shape and rank, each repeat times, one after the other (interleaved, so that a
// change in the machine's state touches every column alike):
//   pass    one `W += c·G` over the n×m weight: reads G and W, writes W (3·n·m floats), the
//           traffic a low-rank step cannot avoid: T_mem
//   sweeps  a read-only sweep of G (G.sum()) and a read-modify-write sweep of W (W += c): the
//           same traffic in the two sweeps a step makes when its write-back needs the inner
//           rule's result, which needs all of G first (every method here)
//   each method's step (inner AdamW, the gradient already in .grad), with gradlora's CPU
//   kernels and, as `<method>/library`, with them turned off (the library calls they replace)
//   torch::optim::AdamW's step on the same full-rank parameter
//   sgemm   a 2048³ torch::mm: the machine's dense matrix rate as LibTorch reaches it, last
//           and followed by a pause (--settle-ms, 200): OpenBLAS's threads spin on after it
// and reports medians. A method's arithmetic (flops per step, below) at the sgemm rate is
// T_flop; the roofline is max(T_mem, T_flop):
//   lora, random   2·n·m·r per projection, two of them, + 2·n·m·2r for the rank-2r write-back
//   galore         2·n·m·r for Qᵀ·G + 2·n·m·r for the write-back (between refreshes)
//   additive       none worth counting: block sums and broadcasts
// galore's refresh is timed apart (--refresh=0 skips it): steps with update_proj_gap 1 minus
// steps between refreshes, per refresh and amortised over the default gap, for the SVD and
// for `projector: randomized`, with the share of the top-r energy the randomized Q captures.
#include <gradlora/gradlora.h>

#include "bench_args.h"
#include "bench_util.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  int threads = 0;
  int repeats = 11;
  std::string shapes = "2048x2048,2048x5632,4096x4096,4096x11008";
  std::string ranks = "8,32";
  std::string methods = "lora,random,additive,galore";
  std::string json;
  int library = 1;      // also time each method with the CPU kernels off
  int refresh = 1;      // time galore's refresh
  int settle_ms = 200;  // pause after each repeat's sgemm
  std::string isa;      // the kernels' instruction set (default: the CPU's best)
};

using gradlora::bench::median;
using gradlora::bench::split;
using gradlora::bench::time_ms;

double flops_of(const std::string& method, int64_t n, int64_t m, int64_t r) {
  const double nm = static_cast<double>(n) * static_cast<double>(m), rr = static_cast<double>(r);
  if (method == "lora" || method == "random") return 2 * (2 * nm * rr) + 2 * nm * 2 * rr;
  if (method == "galore") return 2 * nm * rr + 2 * nm * rr;
  return 0.0;
}

std::unique_ptr<gradlora::LowRankOptimizer> make_opt(torch::Tensor& p, const std::string& method, int64_t r,
                                                     int64_t gap = 0, const std::string& projector = "") {
  gradlora::Config cfg;
  cfg.log_report = false;
  cfg.optimizer.type = gradlora::InnerType::adamw;
  gradlora::Target t;
  t.match = "w";
  t.method = gradlora::Method(method);
  t.rank = r;
  if (gap > 0) t.options["update_proj_gap"] = gap;
  if (!projector.empty()) t.options["projector"] = projector;
  cfg.targets.push_back(t);
  torch::OrderedDict<std::string, torch::Tensor> params;
  params.insert("w", p);
  return std::make_unique<gradlora::LowRankOptimizer>(params, cfg);
}

struct Column {
  std::string name;    // lora, lora/library, adamw, ...
  std::string method;  // lora, ..., adamw
  bool kernels = true;
  std::vector<double> ms;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  gradlora::bench::Args args("gradlora_bench_roofline");
  args.add("--threads", o.threads)
      .add("--repeats", o.repeats)
      .add("--shapes", o.shapes)
      .add("--ranks", o.ranks)
      .add("--methods", o.methods)
      .add("--library", o.library)
      .add("--refresh", o.refresh)
      .add("--settle-ms", o.settle_ms)
      .add("--json", o.json)
      .add("--isa", o.isa);
  args.parse(argc, argv);
  const auto shapes = gradlora::bench::parse_shapes("gradlora_bench_roofline", o.shapes);
  const std::vector<int64_t> ranks = gradlora::bench::parse_ranks("gradlora_bench_roofline", o.ranks);
  if (o.settle_ms < 0) {
    gradlora::bench::fail("gradlora_bench_roofline",
                          "--settle-ms: must be 0 or more, got " + std::to_string(o.settle_ms));
  }
  if (!o.isa.empty()) {
    bool ok = false;
    try {
      ok = gradlora::set_cpu_kernels_isa(o.isa);
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "gradlora_bench_roofline: --isa: %s\n", e.what());
      return 2;
    }
    if (!ok) {
      std::fprintf(stderr, "gradlora_bench_roofline: --isa %s: this CPU does not have it\n", o.isa.c_str());
      return 2;
    }
  }
  if (o.threads > 0) at::set_num_threads(o.threads);
  torch::NoGradGuard no_grad;
  const bool kernels = gradlora::cpu_kernels_active();
  const std::string isa = gradlora::cpu_kernels_isa();
  // A column with the kernels runs them on `isa`; a library column turns them off.
  const auto use_kernels = [&](bool on) { gradlora::set_cpu_kernels_isa(on ? isa : "none"); };
  std::printf("threads %d (the kernels' loops run on %d), CPU kernels %s, median of %d interleaved repeats\n",
              at::get_num_threads(), gradlora::cpu_kernel_threads(), kernels ? isa.c_str() : "unavailable", o.repeats);
  std::printf("%-11s %3s %-16s %9s %8s %9s %8s %9s %9s %9s %8s\n", "shape", "r", "column", "step ms", "pass ms",
              "sweeps ms", "sgemm GF", "roof ms", "/roof", "/pass", "/AdamW");
  std::ostringstream js;
  js << "{\"threads\": " << at::get_num_threads() << ", \"kernel_threads\": " << gradlora::cpu_kernel_threads()
     << ", \"kernels\": " << (kernels ? "true" : "false") << ", \"isa\": \"" << isa << "\", \"torch_version\": \""
     << TORCH_VERSION << "\", \"repeats\": " << o.repeats << ", \"rows\": [";
  bool first_row = true;

  const torch::Tensor X = torch::randn({2048, 2048}), Y = torch::randn({2048, 2048});
  torch::Tensor Z = torch::empty({2048, 2048});
  // A training process has freed tensors of some MiB (activations) before its first step, and
  // glibc's allocator then serves smaller blocks from its heap and keeps their pages (freeing
  // an mmapped block raises the mmap threshold to its size, up to 32 MiB, and the trim
  // threshold to twice that). Free one such tensor here, so that every shape finds the
  // allocator in that state whatever the shapes' order: before it, a step of a shape timed
  // first took fresh, zeroed pages for its factor-sized temporaries (additive at 4096²,
  // r = 32: 1.2 ms of page faults in an 11.9 ms step).
  torch::empty({4 << 20}).fill_(0);  // 16 MiB
  for (const auto& [n, m] : shapes) {
    const std::string shape = std::to_string(n) + "x" + std::to_string(m);
    torch::manual_seed(1234);
    torch::Tensor p = torch::randn({n, m}).mul_(0.02).requires_grad_(true);
    p.mutable_grad() = torch::randn({n, m}).mul_(1e-3);
    torch::Tensor W = torch::randn({n, m});
    const torch::Tensor G = p.grad();
    for (const int64_t r : ranks) {
      std::vector<Column> cols;
      std::vector<std::unique_ptr<gradlora::LowRankOptimizer>> opts;
      for (const std::string& method : split(o.methods, ',')) {
        opts.push_back(make_opt(p, method, r));
        cols.push_back({method, method, true, {}});
        if (o.library && kernels) {
          opts.push_back(make_opt(p, method, r));
          cols.push_back({method + "/library", method, false, {}});
        }
      }
      torch::optim::AdamW adamw({p}, torch::optim::AdamWOptions(1e-3));
      for (size_t c = 0; c < opts.size(); ++c) {  // warm up: state allocated, first refresh done
        use_kernels(cols[c].kernels);
        for (int w = 0; w < 2; ++w) opts[c]->step();
      }
      use_kernels(true);
      adamw.step();
      std::vector<double> pass, read, rmw, rate, adam;
      for (int rep = 0; rep < o.repeats; ++rep) {
        pass.push_back(time_ms([&] { W.add_(G, 1e-3); }));
        read.push_back(time_ms([&] { G.sum(); }));
        rmw.push_back(time_ms([&] { W.add_(1e-3); }));
        for (size_t c = 0; c < opts.size(); ++c) {
          use_kernels(cols[c].kernels);
          cols[c].ms.push_back(time_ms([&] { opts[c]->step(); }));
        }
        use_kernels(true);
        adam.push_back(time_ms([&] { adamw.step(); }));
        // The sgemm last, then a pause: OpenBLAS's own threads keep spinning for a while after
        // a product and would slow whatever is timed next on the other core.
        rate.push_back(2.0 * 2048.0 * 2048.0 * 2048.0 / (time_ms([&] { at::mm_out(Z, X, Y); }) * 1e6));
        std::this_thread::sleep_for(std::chrono::milliseconds(o.settle_ms));
      }
      cols.push_back({"adamw", "adamw", true, adam});
      const double t_pass = median(pass), gflops = median(rate), t_adam = median(adam);
      const double t_read = median(read), t_rmw = median(rmw), t_sweeps = t_read + t_rmw;
      for (const Column& c : cols) {
        const double t = median(c.ms);
        const double flops = flops_of(c.method, n, m, r);
        const double t_flop = flops / (gflops * 1e6);
        const double roof = std::max(t_pass, t_flop);
        std::printf("%-11s %3lld %-16s %9.2f %8.2f %9.2f %8.1f %9.2f %9.2f %9.2f %8.3f\n", shape.c_str(),
                    static_cast<long long>(r), c.name.c_str(), t, t_pass, t_sweeps, gflops, roof, t / roof, t / t_pass,
                    t / t_adam);
        js << (first_row ? "" : ",") << "\n  {\"n\": " << n << ", \"m\": " << m << ", \"r\": " << r
           << ", \"column\": \"" << c.name << "\", \"method\": \"" << c.method
           << "\", \"kernels\": " << (c.kernels ? "true" : "false") << ", \"step_ms\": " << t
           << ", \"pass_ms\": " << t_pass << ", \"read_ms\": " << t_read << ", \"rmw_ms\": " << t_rmw
           << ", \"sgemm_gflops\": " << gflops << ", \"flops\": " << flops
           << ", \"floor_bytes\": " << 3.0 * static_cast<double>(n * m) * 4.0 << ", \"t_flop_ms\": " << t_flop
           << ", \"roofline_ms\": " << roof << ", \"adamw_ms\": " << t_adam << "}";
        first_row = false;
      }
      std::fflush(stdout);
    }
    // galore's refresh: steps that refresh (gap 1) against steps that do not, for the SVD and
    // the randomized range finder; and the share of the top-r energy ‖Qᵀ·G‖² (or ‖G·Q‖²)
    // that the randomized Q captures, against the SVD's Q.
    if (o.refresh && o.methods.find("galore") != std::string::npos) {
      const int64_t r = ranks.front();
      auto between = make_opt(p, "galore", r);
      between->step();
      std::vector<double> b;
      for (int rep = 0; rep < 3; ++rep) b.push_back(time_ms([&] { between->step(); }));
      double energy_svd = 0.0;
      for (const std::string projector : {"svd", "randomized"}) {
        auto every = make_opt(p, "galore", r, 1, projector);
        std::vector<double> a;
        for (int rep = 0; rep < (projector == "svd" ? 1 : 3); ++rep) a.push_back(time_ms([&] { every->step(); }));
        const torch::Tensor Q = every->state_tensors("w").at("Q");
        const torch::Tensor PQ = n < m ? torch::mm(Q.t(), G) : torch::mm(G, Q);  // proj_side auto
        const double energy = PQ.square().sum().item<double>();
        if (projector == "svd") energy_svd = energy;
        const double refresh = median(a) - median(b);
        std::printf(
            "%-11s %3lld galore refresh (%s): %.1f ms per refresh, %.2f ms per step over gap 200; top-r "
            "energy captured %.4f of the SVD's\n",
            shape.c_str(), static_cast<long long>(r), projector.c_str(), refresh, refresh / 200.0, energy / energy_svd);
        js << ",\n  {\"n\": " << n << ", \"m\": " << m << ", \"r\": " << r << ", \"column\": \"galore/refresh/"
           << projector << "\", \"method\": \"galore\", \"refresh_ms\": " << refresh
           << ", \"amortised_ms\": " << refresh / 200.0 << ", \"energy_vs_svd\": " << energy / energy_svd << "}";
      }
      std::fflush(stdout);
    }
  }
  js << "\n]}\n";
  if (!o.json.empty()) {
    std::ofstream(o.json) << js.str();
    std::printf("wrote %s\n", o.json.c_str());
  }
  return 0;
}
