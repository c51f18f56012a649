// Trains one step through the installed package and prints what it did.
#include <gradlora/distributed.h>
#include <gradlora/gradlora.h>

#include <torch/torch.h>

#include <cstdio>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear fc(8, 4);
  auto cfg = gradlora::Config::from_yaml_string(
      "log_report: false\n"
      "optimizer: {type: sgd, lr: 0.1}\n"
      "targets: [{match: weight, method: lora, rank: 2, init: symmetric}]\n"
      "default: full\n");
  gradlora::LowRankOptimizer opt(fc->named_parameters(), cfg);
  const torch::Tensor before = fc->weight.detach().clone();
  torch::mse_loss(fc->forward(torch::randn({16, 8})), torch::randn({16, 4})).backward();
  opt.step();
  const double moved = (fc->weight - before).abs().max().item<double>();
  std::printf("consumer: trainable %lld, weight moved %s, nccl %s\n",
              static_cast<long long>(opt.report().total_trainable), moved > 0 ? "yes" : "no",
              gradlora::nccl_available() ? "yes" : "no");
  return moved > 0 ? 0 : 1;
}
