// Fine-tuning a TorchScript model with LoRA, done from the optimizer side: the
// scripted module is loaded with torch::jit::load, trained, and saved back with
// its structure unchanged (no adapter layers), so whatever loaded the original
// file loads the fine-tuned one.
//
//   ./build/examples/torchscript_finetune [config.yaml] [input.pt] [output.pt]
//
// Defaults: configs/torchscript.yaml, torchscript_base.pt, torchscript_tuned.pt
// (in the working directory). When input.pt does not exist, the example builds a
// small transformer-style encoder in C++ (torch::jit::Module::define, no Python
// needed) and saves it there first; its parameter names follow
// torch.nn.TransformerEncoder (encoder.layers.0.self_attn.in_proj_weight, ...).
//
// The task: a "teacher" copy of the model whose attention and MLP weights carry
// a hidden rank-2 change; fine-tuning recovers the teacher's outputs.
#include <gradlora/gradlora.h>
#include <gradlora/jit.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

namespace {

constexpr int64_t kFeatures = 8, kModel = 32, kHidden = 64, kSeq = 8, kOut = 4, kLayers = 2;

torch::jit::Module linear(const std::shared_ptr<torch::jit::CompilationUnit>& cu, int64_t in, int64_t out) {
  torch::jit::Module m("Linear", cu, /*shouldMangle=*/true);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  m.register_parameter("weight", torch::empty({out, in}).uniform_(-bound, bound).requires_grad_(), false);
  m.register_parameter("bias", torch::empty({out}).uniform_(-bound, bound).requires_grad_(), false);
  m.define(R"JIT(
def forward(self, x):
    return torch.matmul(x, self.weight.t()) + self.bias
)JIT");
  return m;
}

/// embed → kLayers × (single-head self-attention + MLP, both residual) → mean over the sequence → head.
torch::jit::Module build_model() {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module layers("ModuleList", cu, true);
  for (int64_t i = 0; i < kLayers; ++i) {
    torch::jit::Module attn("MultiheadAttention", cu, true);
    const double bound = std::sqrt(6.0 / (4.0 * kModel));  // Xavier-uniform on the 3d×d matrix
    attn.register_parameter("in_proj_weight", torch::empty({3 * kModel, kModel}).uniform_(-bound, bound), false);
    attn.register_parameter("in_proj_bias", torch::zeros({3 * kModel}), false);
    attn.register_module("out_proj", linear(cu, kModel, kModel));
    torch::jit::Module layer("TransformerEncoderLayer", cu, true);
    layer.register_module("self_attn", attn);
    layer.register_module("linear1", linear(cu, kModel, kHidden));
    layer.register_module("linear2", linear(cu, kHidden, kModel));
    layer.register_attribute("scaling", c10::FloatType::get(), 1.0 / std::sqrt(static_cast<double>(kModel)));
    layer.define(R"JIT(
def forward(self, x):
    qkv = torch.matmul(x, self.self_attn.in_proj_weight.t()) + self.self_attn.in_proj_bias
    q, k, v = qkv.chunk(3, -1)
    attention = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scaling, -1)
    x = x + self.self_attn.out_proj.forward(torch.matmul(attention, v))
    return x + self.linear2.forward(torch.relu(self.linear1.forward(x)))
)JIT");
    layers.register_module(std::to_string(i), layer);
  }
  torch::jit::Module encoder("TransformerEncoder", cu, true);
  encoder.register_module("layers", layers);
  encoder.define(R"JIT(
def forward(self, x):
    x = getattr(self.layers, "0").forward(x)
    return getattr(self.layers, "1").forward(x)
)JIT");
  torch::jit::Module model("Model", cu, true);
  model.register_module("embed", linear(cu, kFeatures, kModel));
  model.register_module("encoder", encoder);
  model.register_module("head", linear(cu, kModel, kOut));
  model.define(R"JIT(
def forward(self, x):
    h = self.encoder.forward(self.embed.forward(x))
    return self.head.forward(h.mean(1))
)JIT");
  for (const auto& p : model.parameters()) p.requires_grad_(true);
  return model;
}

bool exists(const std::string& path) { return std::ifstream(path).good(); }

double mse(torch::jit::Module& m, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard g;
  return torch::mse_loss(m.forward({x}).toTensor(), y).item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string config_path = argc > 1 ? argv[1] : std::string(GRADLORA_EXAMPLE_CONFIG);
  const std::string input_path = argc > 2 ? argv[2] : std::string("torchscript_base.pt");
  const std::string output_path = argc > 3 ? argv[3] : std::string("torchscript_tuned.pt");
  torch::manual_seed(0);

  if (!exists(input_path)) {
    build_model().save(input_path);
    std::printf("built a scripted encoder in C++ and saved it to %s\n", input_path.c_str());
  }

  // 1. Load the TorchScript file and build the optimizer from its parameters.
  torch::jit::Module model = torch::jit::load(input_path);
  gradlora::LowRankOptimizer opt(gradlora::named_parameters(model), gradlora::Config::from_yaml_file(config_path));
  gradlora::set_requires_grad(model, opt);  // no gradients are computed for the frozen weights

  // 2. The task: outputs of a teacher whose LoRA-selected weights carry a hidden rank-2 change.
  torch::jit::Module teacher = model.deepcopy();
  {
    torch::NoGradGuard g;
    for (const auto& p : gradlora::named_parameters(teacher)) {
      if (opt.method_of(p.key()) != gradlora::Method::lora) continue;
      const torch::Tensor& w = p.value();
      const double s = 0.5 / std::sqrt(static_cast<double>(w.size(1)));
      w.add_(torch::randn({w.size(0), 2}).mm(torch::randn({2, w.size(1)})) * s);
    }
  }
  const torch::Tensor x_train = torch::randn({1024, kSeq, kFeatures}), x_test = torch::randn({256, kSeq, kFeatures});
  torch::Tensor y_train, y_test;
  {
    torch::NoGradGuard g;
    teacher.eval();
    y_train = teacher.forward({x_train}).toTensor();
    y_test = teacher.forward({x_test}).toTensor();
  }
  model.eval();
  std::printf("test loss before fine-tuning: %.6f\n", mse(model, x_test, y_test));

  // 3. An ordinary LibTorch training loop on the scripted module.
  const int64_t batch = 64, steps = 400;
  for (int64_t step = 1; step <= steps; ++step) {
    model.train();
    const torch::Tensor idx = torch::randint(x_train.size(0), {batch}, torch::kLong);
    opt.zero_grad();
    torch::Tensor loss =
        torch::mse_loss(model.forward({x_train.index_select(0, idx)}).toTensor(), y_train.index_select(0, idx));
    loss.backward();
    opt.step();
    if (step % 100 == 0) {
      model.eval();
      std::printf("step %4lld  train loss %.6f  test loss %.6f\n", static_cast<long long>(step), loss.item<double>(),
                  mse(model, x_test, y_test));
    }
  }

  // 4. Save the fine-tuned module (same structure, new weights) and check the file.
  gradlora::set_requires_grad(model, true);
  model.save(output_path);
  torch::jit::Module reloaded = torch::jit::load(output_path);
  reloaded.eval();
  model.eval();
  torch::NoGradGuard g;
  const double diff =
      (reloaded.forward({x_test}).toTensor() - model.forward({x_test}).toTensor()).abs().max().item<double>();
  std::printf("saved %s; reloaded test loss %.6f, max |output difference| to the fine-tuned module %.3g\n",
              output_path.c_str(), mse(reloaded, x_test, y_test), diff);
  return diff == 0.0 ? 0 : 1;
}
