// Training-step benchmark: forward + backward + optimizer step of a stack of L bias-free linear
// layers (d×d, GELU between them, MSE loss) on one batch, in four configurations:
//   full         full fine-tuning, torch::optim::AdamW on every weight
//   module_lora  module-side LoRA, the baseline a user would otherwise write:
//                Y = X·W0ᵀ + s·(X·Bᵀ)·Aᵀ, W0 frozen (requires_grad false), A and B by torch::optim::AdamW
//   lora         optimizer-side lora: plain layers, gradlora::LowRankOptimizer (inner adamw)
//   fused        optimizer-side lora with fuse_into_backward: true
//   backward     forward + backward of the plain layers with no optimizer step: the floor of
//                any optimizer-side method, which receives dL/dW and so runs the backward's
//                n×m weight-gradient product that module-side LoRA never forms
//
// Each step is timed whole (forward, backward, opt->step(), releasing the gradients) and, apart,
// the part inside opt->step() ("opt"; in fused mode the projection runs inside backward()).
//
// Peak resident memory (VmHWM) is per process, so each configuration runs in its own child
// process: without --mode the binary re-executes itself once per configuration and round
// (--rounds, configurations in rotation, so that a change in the machine's speed reaches all
// of them alike) and collects one JSON line from each.
//
//   gradlora_bench_train --threads=2 [--layers=8] [--dim=2048] [--batch=256] [--rank=8]
//                        [--steps=10] [--warmup=2] [--rounds=3]
//                        [--modes=full,module_lora,lora,fused,backward] [--json=out.json]

#include "bench_args.h"
#include "bench_util.h"

#include <gradlora/gradlora.h>

#include <torch/torch.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Options {
  int threads = 0;
  int64_t layers = 8, dim = 2048, batch = 256, rank = 8;
  int steps = 10, warmup = 2, rounds = 3;
  std::string mode;  // empty: parent
  std::string modes = "full,module_lora,lora,fused,backward";
  std::string json;
};

using gradlora::bench::split;

Options parse(int argc, char** argv) {
  Options o;
  gradlora::bench::Args args("gradlora_bench_train");
  gradlora::bench::add_stack_options(args, o)
      .add("--mode", o.mode)
      .add("--modes", o.modes)
      .add("--rounds", o.rounds)
      .add("--json", o.json);
  args.parse(argc, argv);
  if (o.rounds < 1) {
    std::fprintf(stderr, "gradlora_bench_train: --rounds must be at least 1, got %d\n", o.rounds);
    std::exit(2);
  }
  return o;
}

// A field of /proc/self/status in bytes (VmRSS, VmHWM), 0 when unavailable.
int64_t proc_status_bytes(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(f, line)) {
    if (line.rfind(prefix, 0) == 0) return std::stoll(line.substr(prefix.size())) * 1024;  // kB
  }
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

// ------------------------------------------------------------------ child

int run_child(const Options& o) {
  if (o.threads > 0) at::set_num_threads(o.threads);
  const int64_t start_rss = proc_status_bytes("VmRSS");
  const std::string& mode = o.mode;
  const bool module_lora = mode == "module_lora";
  const bool optimizer_side = mode == "lora" || mode == "fused";
  if (!module_lora && !optimizer_side && mode != "full" && mode != "backward") {
    std::cerr << "gradlora_bench_train: unknown --mode '" << mode
              << "' (full | module_lora | lora | fused | backward)\n";
    return 2;
  }
  const int64_t L = o.layers, d = o.dim, r = o.rank;
  const double s = 1.0;  // alpha = rank

  torch::manual_seed(0);
  torch::OrderedDict<std::string, torch::Tensor> weights;
  std::vector<torch::Tensor> W, A, B;
  const double bound = 1.0 / std::sqrt(static_cast<double>(d));  // nn::Linear's default init
  for (int64_t l = 0; l < L; ++l) {
    torch::Tensor w = torch::empty({d, d}).uniform_(-bound, bound).requires_grad_(!module_lora);
    W.push_back(w);
    weights.insert("layers." + std::to_string(l) + ".weight", w);
  }
  // Same weights and data in every configuration; the adapters are drawn afterwards.
  const torch::Tensor X = torch::randn({o.batch, d});
  const torch::Tensor Y = torch::randn({o.batch, d}).mul_(0.1);
  for (int64_t l = 0; module_lora && l < L; ++l) {
    A.push_back(torch::zeros({d, r}, torch::requires_grad()));                       // PEFT lora_B
    B.push_back(torch::empty({r, d}).uniform_(-bound, bound).requires_grad_(true));  // PEFT lora_A
  }

  std::unique_ptr<torch::optim::Optimizer> opt;
  std::vector<torch::Tensor> trained;
  if (mode == "full") {
    trained = W;
    opt = std::make_unique<torch::optim::AdamW>(W, torch::optim::AdamWOptions(1e-4));
  } else if (mode == "backward") {
    trained = W;  // gradients computed and released, no step
  } else if (module_lora) {
    trained = A;
    trained.insert(trained.end(), B.begin(), B.end());
    opt = std::make_unique<torch::optim::AdamW>(trained, torch::optim::AdamWOptions(1e-4));
  } else {
    trained = W;
    gradlora::Config cfg;
    cfg.log_report = false;
    cfg.optimizer.type = gradlora::InnerType::adamw;
    cfg.optimizer.lr = 1e-4;
    cfg.fuse_into_backward = mode == "fused";
    gradlora::Target t;
    t.match = "layers.*.weight";
    t.method = gradlora::Method::lora;
    t.rank = r;
    cfg.targets.push_back(t);
    opt = std::make_unique<gradlora::LowRankOptimizer>(weights, cfg);
  }

  auto forward = [&]() {
    torch::Tensor x = X;
    for (int64_t l = 0; l < L; ++l) {
      torch::Tensor y = torch::mm(x, W[l].t());
      if (module_lora) y = y + torch::mm(torch::mm(x, B[l].t()), A[l].t()).mul(s);
      x = l + 1 < L ? torch::gelu(y) : y;
    }
    return torch::mse_loss(x, Y);
  };

  const int64_t setup_rss = proc_status_bytes("VmRSS");
  std::vector<double> times, opt_times;  // the whole step; the part inside opt->step()
  double first_loss = 0, last_loss = 0;
  // Does any trained weight hold a full gradient between backward() and step()? (Fused mode
  // leaves an empty placeholder there, never the n×m gradient.)
  bool grads_after_backward = false;
  for (int i = 0; i < o.warmup + o.steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    torch::Tensor loss = forward();
    loss.backward();
    for (const auto& w : W) {
      grads_after_backward = grads_after_backward || (w.grad().defined() && w.grad().numel() == w.numel());
    }
    const auto t_opt = std::chrono::steady_clock::now();
    if (opt) opt->step();
    const auto t_opt_end = std::chrono::steady_clock::now();
    // Gradients are released (set to none) in every configuration, as PyTorch's zero_grad(set_to_none=True).
    for (auto& p : trained) p.mutable_grad() = torch::Tensor();
    const auto t1 = std::chrono::steady_clock::now();
    const double l = loss.item<double>();
    if (i == 0) first_loss = l;
    last_loss = l;
    if (i >= o.warmup) {
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      opt_times.push_back(std::chrono::duration<double, std::milli>(t_opt_end - t_opt).count());
    }
  }
  const int64_t peak = proc_status_bytes("VmHWM");
  // In fused mode the full gradients must never reach .grad; if they do, the build has no fused mode.
  const bool fused_active = mode == "fused" && !grads_after_backward;
  std::printf(
      "{\"mode\": \"%s\", \"layers\": %lld, \"dim\": %lld, \"batch\": %lld, \"rank\": %lld, \"threads\": %d, "
      "\"steps\": %d, \"step_ms_median\": %.4f, \"step_ms_min\": %.4f, \"opt_ms_median\": %.4f, "
      "\"peak_rss_bytes\": %lld, \"start_rss_bytes\": %lld, \"setup_rss_bytes\": %lld, \"grads_after_backward\": %s, "
      "\"fused_active\": %s, "
      "\"first_loss\": %.6g, \"last_loss\": %.6g, \"torch_version\": \"%s\"}\n",
      mode.c_str(), static_cast<long long>(L), static_cast<long long>(d), static_cast<long long>(o.batch),
      static_cast<long long>(r), at::get_num_threads(), o.steps, median(times),
      *std::min_element(times.begin(), times.end()), median(opt_times), static_cast<long long>(peak),
      static_cast<long long>(start_rss), static_cast<long long>(setup_rss), grads_after_backward ? "true" : "false",
      fused_active ? "true" : "false", first_loss, last_loss, TORCH_VERSION);
  return 0;
}

// ----------------------------------------------------------------- parent

// Runs this binary again with --mode=<mode> and returns its stdout.
std::string run_in_child(int argc, char** argv, const std::string& mode) {
  int fds[2];
  if (pipe(fds) != 0) throw std::runtime_error("pipe() failed");
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork() failed");
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    std::vector<std::string> args{argv[0]};
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a.rfind("--json=", 0) != 0 && a.rfind("--modes=", 0) != 0 && a.rfind("--rounds=", 0) != 0) {
        args.push_back(a);
      }
    }
    args.push_back("--mode=" + mode);
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    execv("/proc/self/exe", cargs.data());
    _exit(127);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t k;
  while ((k = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(k));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("child for mode '" + mode + "' failed (status " + std::to_string(status) + ")");
  }
  return out;
}

// A number field of a one-line JSON object written by run_child.
double field(const std::string& json, const std::string& key) {
  const auto p = json.find("\"" + key + "\": ");
  if (p == std::string::npos) return NAN;
  return std::atof(json.c_str() + p + key.size() + 4);
}

int run_parent(int argc, char** argv, const Options& o) {
  std::vector<std::string> lines;
  std::map<std::string, std::string> by_mode;  // the last round's line of each mode
  // Per mode, each round's median step and peak memory; the summary takes their medians.
  std::map<std::string, std::vector<double>> times, opt_times, peaks;
  const std::vector<std::string> modes = split(o.modes, ',');
  for (int round = 0; round < o.rounds; ++round) {
    for (const auto& mode : modes) {
      std::fprintf(stderr, "gradlora_bench_train: round %d of %d, %s\n", round + 1, o.rounds, mode.c_str());
      std::string out = run_in_child(argc, argv, mode);
      while (!out.empty() && out.back() == '\n') out.pop_back();
      out.insert(out.size() - 1, ", \"round\": " + std::to_string(round));
      times[mode].push_back(field(out, "step_ms_median"));
      opt_times[mode].push_back(field(out, "opt_ms_median"));
      peaks[mode].push_back(field(out, "peak_rss_bytes"));
      lines.push_back(out);
      by_mode[mode] = out;
    }
  }
  auto ratio_to = [&](const std::string& ref, const std::map<std::string, std::vector<double>>& v,
                      const std::string& mode) { return v.count(ref) ? median(v.at(mode)) / median(v.at(ref)) : NAN; };
  std::printf("%-12s %10s %9s %7s %9s %10s %7s %9s  %s\n", "mode", "step [ms]", "opt [ms]", "x full", "x module",
              "peak [MiB]", "x full", "x module", "note");
  for (const auto& mode : modes) {
    std::string note;
    if (mode == "fused" && by_mode[mode].find("\"fused_active\": false") != std::string::npos) {
      note = "fuse_into_backward had no effect: full gradients reached .grad (not implemented in this build)";
    }
    std::printf("%-12s %10.1f %9.1f %7.3f %9.3f %10.1f %7.3f %9.3f  %s\n", mode.c_str(), median(times[mode]),
                median(opt_times[mode]), ratio_to("full", times, mode), ratio_to("module_lora", times, mode),
                median(peaks[mode]) / (1 << 20), ratio_to("full", peaks, mode), ratio_to("module_lora", peaks, mode),
                note.c_str());
  }
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << "[\n";
    for (size_t i = 0; i < lines.size(); ++i) f << "  " << lines[i] << (i + 1 < lines.size() ? ",\n" : "\n");
    f << "]\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    return o.mode.empty() ? run_parent(argc, argv, o) : run_child(o);
  } catch (const std::exception& e) {
    std::cerr << "gradlora_bench_train: " << e.what() << "\n";
    return 1;
  }
}
