// A complete LibTorch training loop in which gradlora::LowRankOptimizer takes
// the place of torch::optim::AdamW. The model is not changed in any way.
//
//   ./build/examples/mlp_example [configs/example_mlp.yaml]
#include <gradlora/gradlora.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : fc1(register_module("fc1", torch::nn::Linear(32, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 128))),
        fc3(register_module("fc3", torch::nn::Linear(128, 1))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::gelu(fc1->forward(x));
    x = torch::gelu(fc2->forward(x));
    return fc3->forward(x);
  }
  torch::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(Mlp);

int main(int argc, char** argv) {
  const std::string config_path = argc > 1 ? argv[1] : std::string(GRADLORA_EXAMPLE_CONFIG);
  torch::manual_seed(0);
  Mlp model;

  // Data it generates: y = sin(x·w) + noise, 2048 samples of 32 features.
  torch::Tensor x = torch::randn({2048, 32});
  torch::Tensor w = torch::randn({32, 1}) / 4;
  torch::Tensor y = torch::sin(x.mm(w) * 3) + 0.05 * torch::randn({2048, 1});

  // The one line that changes: instead of
  //   torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  gradlora::LowRankOptimizer opt(model->named_parameters(), gradlora::Config::from_yaml_file(config_path));
  torch::optim::StepLR scheduler(opt, /*step_size=*/200, /*gamma=*/0.5);

  const int64_t batch = 128, epochs = 40;
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    torch::Tensor perm = torch::randperm(x.size(0));
    double total = 0;
    int64_t batches = 0;
    for (int64_t i = 0; i + batch <= x.size(0); i += batch) {
      torch::Tensor idx = perm.slice(0, i, i + batch);
      opt.zero_grad();
      torch::Tensor loss = torch::mse_loss(model->forward(x.index_select(0, idx)), y.index_select(0, idx));
      loss.backward();
      opt.step();
      scheduler.step();
      total += loss.item<double>();
      ++batches;
    }
    if (epoch == 1 || epoch % 5 == 0) {
      std::printf("epoch %3lld  loss %.5f  lr %.2e\n", static_cast<long long>(epoch), total / batches,
                  opt.param_groups()[0].options().get_lr());
    }
  }
  auto [A, B] = opt.factors("fc2.weight");
  std::printf("fc2.weight factors: A %lldx%lld, B %lldx%lld\n", static_cast<long long>(A.size(0)),
              static_cast<long long>(A.size(1)), static_cast<long long>(B.size(0)), static_cast<long long>(B.size(1)));
  return 0;
}
