// Measures what `on_resample` (keep | reset | transfer) does to `random`
// training, to choose its default. A student MLP fine-tunes towards a teacher
// (a perturbed copy of itself) with method `random` on both weight matrices;
// the table gives the final training loss, mean ± std over seeds.
//
//   ./build/examples/resample_study [steps=400] [seeds=5]
#include <gradlora/gradlora.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(64, 256))),
        fc2(register_module("fc2", torch::nn::Linear(256, 16))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2->forward(torch::gelu(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

double run(const std::string& inner, int64_t every, const char* on_resample, int steps, int seed) {
  torch::manual_seed(seed);
  Net student, teacher;
  {
    torch::NoGradGuard ng;
    auto sp = student->parameters(), tp = teacher->parameters();
    for (size_t i = 0; i < sp.size(); ++i) tp[i].copy_(sp[i] + 0.05 * torch::randn_like(sp[i]));
  }
  gradlora::Config cfg = gradlora::Config::from_yaml_string(
      "seed: " + std::to_string(seed) + "\noptimizer: " + inner +
      "\ntargets: [{match: 'fc*.weight', method: random, rank: 4, resample_every: " + std::to_string(every) +
      ", on_resample: " + on_resample + "}]\n");
  cfg.log_report = false;
  gradlora::LowRankOptimizer opt(student->named_parameters(), cfg);
  double tail = 0;
  for (int i = 0; i < steps; ++i) {
    torch::Tensor x = torch::randn({128, 64});
    torch::Tensor y;
    {
      torch::NoGradGuard ng;
      y = teacher->forward(x);
    }
    opt.zero_grad();
    torch::Tensor loss = torch::mse_loss(student->forward(x), y);
    loss.backward();
    opt.step();
    if (i >= steps - 20) tail += loss.item<double>() / 20;  // mean of the last 20 steps
  }
  return tail;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::stoi(argv[1]) : 400;
  const int seeds = argc > 2 ? std::stoi(argv[2]) : 5;
  at::set_num_threads(1);
  std::printf("| inner rule | resample_every | on_resample | final loss (mean ± std, %d seeds, %d steps) |\n", seeds,
              steps);
  std::printf("|---|---|---|---|\n");
  const std::vector<std::pair<const char*, std::string>> rules = {
      {"adamw", "{type: adamw, lr: 2.0e-3, weight_decay: 0.0}"},
      {"sgd+momentum", "{type: sgd, lr: 0.05, momentum: 0.9}"}};
  for (const auto& [label, inner] : rules) {
    for (int64_t every : {1, 10}) {
      for (const char* on : {"keep", "reset", "transfer"}) {
        std::vector<double> v;
        for (int s = 0; s < seeds; ++s) v.push_back(run(inner, every, on, steps, s));
        double mean = 0, var = 0;
        for (double x : v) mean += x / v.size();
        for (double x : v) var += (x - mean) * (x - mean) / (v.size() > 1 ? v.size() - 1 : 1);
        std::printf("| %s | %lld | %s | %.5f ± %.5f |\n", label, static_cast<long long>(every), on, mean,
                    std::sqrt(var));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
