// Optimizer-step benchmark: one n×m parameter whose gradient is already in .grad, stepped by
// gradlora::LowRankOptimizer (lora / random / additive / galore / hadamard, inner AdamW) and, in
// the same run, by torch::optim::AdamW and torch::optim::SGD on the same full-rank parameter.
//
//   gradlora_bench_step --threads=2 [Google Benchmark flags, e.g. --benchmark_filter=4096x4096]
//
// Each benchmark reports real time per step and these counters:
//   n, m, r          the shape and rank (r = 0 for the full-rank baselines)
//   state_bytes      optimizer state: LowRankOptimizer::report() (factors + inner moments), or the
//                    bytes of the torch optimizer's state tensors
//   moment_bytes     bytes of the inner rule's moments only (the 2·r·(n+m) floats of AdamW on A, B)
//   measured_bytes   bytes of the state tensors actually held after the timed steps (cross-check)
// scripts/bench.py turns the JSON output into ratios to AdamW, a table and plots.

#include <gradlora/gradlora.h>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Shape {
  int64_t n, m;
};

// Parameter and gradient of one benchmark: the same values for every method at one shape.
torch::Tensor make_param(const Shape& s) {
  torch::manual_seed(1234);
  torch::Tensor p = torch::randn({s.n, s.m}).mul_(0.02).requires_grad_(true);
  p.mutable_grad() = torch::randn({s.n, s.m}).mul_(1e-3);
  return p;
}

int64_t bytes_of(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

void set_counters(benchmark::State& st, const Shape& s, int64_t r, int64_t state_bytes, int64_t moment_bytes,
                  int64_t measured_bytes) {
  st.counters["n"] = static_cast<double>(s.n);
  st.counters["m"] = static_cast<double>(s.m);
  st.counters["r"] = static_cast<double>(r);
  st.counters["state_bytes"] = static_cast<double>(state_bytes);
  st.counters["moment_bytes"] = static_cast<double>(moment_bytes);
  st.counters["measured_bytes"] = static_cast<double>(measured_bytes);
}

// Bytes held by the state of a stock LibTorch optimizer.
int64_t torch_state_bytes(torch::optim::Optimizer& opt) {
  int64_t b = 0;
  for (auto& kv : opt.state()) {
    if (auto* a = dynamic_cast<torch::optim::AdamWParamState*>(kv.second.get())) {
      b += bytes_of(a->exp_avg()) + bytes_of(a->exp_avg_sq()) + bytes_of(a->max_exp_avg_sq());
    } else if (auto* g = dynamic_cast<torch::optim::SGDParamState*>(kv.second.get())) {
      b += bytes_of(g->momentum_buffer());
    }
  }
  return b;
}

void bm_adamw(benchmark::State& st, Shape s) {
  torch::Tensor p = make_param(s);
  torch::optim::AdamW opt({p}, torch::optim::AdamWOptions(1e-3));
  opt.step();  // allocates the moments outside the timed loop
  for (auto _ : st) opt.step();
  const int64_t b = torch_state_bytes(opt);
  set_counters(st, s, 0, b, b, b);
}

void bm_sgd(benchmark::State& st, Shape s) {
  torch::Tensor p = make_param(s);
  torch::optim::SGD opt({p}, torch::optim::SGDOptions(1e-3));
  opt.step();
  for (auto _ : st) opt.step();
  const int64_t b = torch_state_bytes(opt);
  set_counters(st, s, 0, b, b, b);
}

void bm_lowrank(benchmark::State& st, Shape s, gradlora::Method method, int64_t r) {
  torch::Tensor p = make_param(s);
  gradlora::Config cfg;
  cfg.log_report = false;
  cfg.optimizer.type = gradlora::InnerType::adamw;
  gradlora::Target t;
  t.match = "w";
  t.method = method;
  t.rank = r;
  cfg.targets.push_back(t);
  torch::OrderedDict<std::string, torch::Tensor> params;
  params.insert("w", p);
  gradlora::LowRankOptimizer opt(params, cfg);
  opt.step();
  for (auto _ : st) opt.step();
  const gradlora::ParamReport& rep = opt.report().params.at(0);
  // Moments: what the inner rule holds per trainable value (AdamW: exp_avg, exp_avg_sq).
  int64_t moments = 0, measured = 0;
  for (const auto& kv : opt.state_tensors("w")) {
    measured += bytes_of(kv.second);
    if (kv.first.rfind("inner.", 0) == 0) moments += bytes_of(kv.second);
  }
  set_counters(st, s, r, rep.state_bytes, moments, measured);
}

struct MethodName {
  gradlora::Method method;
  const char* name;
};

// Steps use several threads: wall-clock time is what a user waits for.
// CPU time is that of the whole process (all threads), a second view that background load on a shared
// machine disturbs less than wall-clock time.
void configure(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}

void register_all() {
  const std::vector<Shape> shapes{{1024, 1024}, {2048, 2048}, {4096, 4096}, {2048, 5504}};
  const std::vector<int64_t> ranks{1, 4, 8, 32, 128};
  // galore and hadamard are benchmarked when the build provides them (make_projector throws otherwise).
  const std::vector<MethodName> methods{{gradlora::Method::lora, "lora"},
                                        {gradlora::Method::random, "random"},
                                        {gradlora::Method::additive, "additive"},
                                        {gradlora::Method::galore, "galore"},
                                        {gradlora::Method::hadamard, "hadamard"}};
  std::vector<MethodName> available;
  for (const auto& mn : methods) {
    try {
      gradlora::Config cfg;
      cfg.log_report = false;
      gradlora::Target t;
      t.match = "w";
      t.method = mn.method;
      t.rank = 2;
      cfg.targets.push_back(t);
      torch::OrderedDict<std::string, torch::Tensor> params;
      params.insert("w", torch::zeros({8, 8}, torch::requires_grad()));
      gradlora::LowRankOptimizer probe(params, cfg);
      available.push_back(mn);
    } catch (const std::exception&) {
      // Method not in this build: skipped.
    }
  }
  for (const auto& s : shapes) {
    const std::string shape = std::to_string(s.n) + "x" + std::to_string(s.m);
    configure(benchmark::RegisterBenchmark(("step/adamw/" + shape).c_str(), bm_adamw, s));
    configure(benchmark::RegisterBenchmark(("step/sgd/" + shape).c_str(), bm_sgd, s));
    for (const auto& mn : available) {
      // Every rank for the seed's methods; rank 8 only for the later ones and for the 2048² point of
      // the curve over n (keeps the suite within minutes on two cores).
      const bool all_ranks = mn.method != gradlora::Method::galore && mn.method != gradlora::Method::hadamard &&
                             !(s.n == 2048 && s.m == 2048);
      for (int64_t r : ranks) {
        if (!all_ranks && r != 8) continue;
        const std::string name = std::string("step/") + mn.name + "/" + shape + "/r" + std::to_string(r);
        configure(benchmark::RegisterBenchmark(name.c_str(), bm_lowrank, s, mn.method, r));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  // --threads=N (ours) is removed before Google Benchmark parses the rest.
  int threads = 0;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads = std::atoi(argv[i] + 10);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (threads > 0) at::set_num_threads(threads);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("torch_version", TORCH_VERSION);
  register_all();
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
