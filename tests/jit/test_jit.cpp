// TorchScript modules trained through LowRankOptimizer: names,
// selection, equivalence with a torch::nn twin and with an explicit
// module-side LoRA, frozen parameters, save and reload.
#include <gradlora/gradlora.h>
#include <gradlora/jit.h>

#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include "test_util.h"  // the shared test model

#include <cstdio>
#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <vector>

namespace {

using gradlora::Config;
using gradlora::Init;
using gradlora::InnerType;
using gradlora::LowRankOptimizer;
using gradlora::Method;
using gradlora::Target;

constexpr int64_t kIn = 6, kHidden = 10, kOut = 4, kBatch = 16;

/// A file under the test's temporary directory, removed on destruction.
struct TempFile {
  explicit TempFile(const std::string& stem) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string id = std::string(info->test_suite_name()) + "_" + info->name() + "_" + stem;
    for (char& ch : id) {
      if (ch == '/') ch = '_';
    }
    path = ::testing::TempDir() + "gradlora_jit_" + id + ".pt";
  }
  ~TempFile() { std::remove(path.c_str()); }
  std::string path;
};

/// Initial weights shared by the scripted module and its references.
struct MlpWeights {
  torch::Tensor w1, b1, w2, b2;
  static MlpWeights random(uint64_t seed) {
    torch::manual_seed(seed);
    return {torch::randn({kHidden, kIn}) * 0.4, torch::randn({kHidden}) * 0.1, torch::randn({kOut, kHidden}) * 0.3,
            torch::randn({kOut}) * 0.1};
  }
};

/// Gives `m` the method forward(self, x) that returns `result`, a TorchScript expression.
void define_forward(torch::jit::Module& m, const std::string& result) {
  m.define("def forward(self, x):\n    return " + result + "\n");
}

torch::jit::Module scripted_linear(const std::shared_ptr<torch::jit::CompilationUnit>& cu, const torch::Tensor& w,
                                   const torch::Tensor& b) {
  torch::jit::Module m("Linear", cu, /*shouldMangle=*/true);
  m.register_parameter("weight", w.clone().requires_grad_(true), /*is_buffer=*/false);
  m.register_parameter("bias", b.clone().requires_grad_(true), /*is_buffer=*/false);
  define_forward(m, "torch.addmm(self.bias, x, self.weight.t())");
  return m;
}

/// fc2(tanh(fc1(x))), built in C++ with define(): two matrix products and a
/// nonlinearity, parameters fc1.weight, fc1.bias, fc2.weight, fc2.bias.
torch::jit::Module build_scripted_mlp(const MlpWeights& w) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module m("Mlp", cu, /*shouldMangle=*/true);
  m.register_module("fc1", scripted_linear(cu, w.w1, w.b1));
  m.register_module("fc2", scripted_linear(cu, w.w2, w.b2));
  define_forward(m, "self.fc2.forward(torch.tanh(self.fc1.forward(x)))");
  return m;
}

/// The scripted MLP as a user gets it: saved to a file and loaded with torch::jit::load.
torch::jit::Module load_scripted_mlp(const MlpWeights& w, const std::string& path) {
  build_scripted_mlp(w).save(path);
  return torch::jit::load(path);
}

/// The same network as a torch::nn module with the same parameter names: the shared
/// test MLP with the weights copied in.
gradlora::testing::Mlp make_twin(const MlpWeights& w) {
  gradlora::testing::Mlp twin(std::vector<int64_t>{kIn, kHidden, kOut});
  torch::NoGradGuard g;
  twin->fc(1)->weight.copy_(w.w1);
  twin->fc(1)->bias.copy_(w.b1);
  twin->fc(2)->weight.copy_(w.w2);
  twin->fc(2)->bias.copy_(w.b2);
  return twin;
}

struct Data {
  torch::Tensor x, y;
};
Data make_data(uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({kBatch, kIn}), torch::randn({kBatch, kOut})};
}

/// What a test on the scripted MLP starts from: initial weights drawn from `seed`, data
/// from seed + 1, and the module saved to a file and loaded back with torch::jit::load.
struct ScriptedMlp {
  explicit ScriptedMlp(uint64_t seed)
      : w0(MlpWeights::random(seed)), d(make_data(seed + 1)), file("mlp"), m(load_scripted_mlp(w0, file.path)) {}
  const MlpWeights w0;
  const Data d;
  const TempFile file;
  torch::jit::Module m;
};

torch::Tensor forward(torch::jit::Module& m, const torch::Tensor& x) { return m.forward({x}).toTensor(); }

Config base_config() {
  Config c;
  c.seed = 11;
  c.optimizer.type = InnerType::adamw;
  c.optimizer.lr = 2e-2;
  c.optimizer.weight_decay = 0.01;
  c.log_report = false;
  return c;
}

Target target(const std::string& match, Method method, int64_t rank = 3, double alpha = 6.0) {
  Target t;
  t.match = match;
  t.method = method;
  t.rank = rank;
  t.alpha = alpha;
  return t;
}

void train_scripted(torch::jit::Module& m, LowRankOptimizer& opt, const Data& d, int steps) {
  m.train();
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    torch::Tensor loss = torch::mse_loss(forward(m, d.x), d.y);
    loss.backward();
    opt.step();
  }
}

std::map<std::string, torch::Tensor> snapshot(const torch::OrderedDict<std::string, torch::Tensor>& params) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& kv : params) out[kv.key()] = kv.value().detach().clone();
  return out;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.detach().to(torch::kDouble) - b.detach().to(torch::kDouble)).abs().max().item<double>();
}

// ------------------------------------------------------------------ names

/// encoder.layers.{0,1}.{self_attn.in_proj_weight, self_attn.in_proj_bias, linear1.weight, linear1.bias},
/// plus a root parameter registered after the encoder (Python lists it first).
torch::jit::Module build_encoder(int64_t d) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module layers("ModuleList", cu, true);
  for (int i = 0; i < 2; ++i) {
    torch::jit::Module attn("MultiheadAttention", cu, true);
    attn.register_parameter("in_proj_weight", torch::randn({3 * d, d}).requires_grad_(), false);
    attn.register_parameter("in_proj_bias", torch::zeros({3 * d}).requires_grad_(), false);
    torch::jit::Module lin = scripted_linear(cu, torch::randn({d, 3 * d}) * 0.2, torch::zeros({d}));
    torch::jit::Module layer("EncoderLayer", cu, true);
    layer.register_module("self_attn", attn);
    layer.register_module("linear1", lin);
    define_forward(layer,
                   "x + self.linear1.forward(torch.relu(torch.addmm(self.self_attn.in_proj_bias, x, "
                   "self.self_attn.in_proj_weight.t())))");
    layers.register_module(std::to_string(i), layer);
  }
  torch::jit::Module encoder("Encoder", cu, true);
  encoder.register_module("layers", layers);
  define_forward(encoder, R"(getattr(self.layers, "1").forward(getattr(self.layers, "0").forward(x)))");
  torch::jit::Module root("Model", cu, true);
  root.register_module("encoder", encoder);
  root.register_parameter("logit_scale", torch::ones({1}).requires_grad_(), false);
  define_forward(root, "self.encoder.forward(x) * self.logit_scale");
  return root;
}

TEST(JitNamedParameters, DottedNamesInPythonOrderAliasingTheModule) {
  torch::manual_seed(0);
  torch::jit::Module m = build_encoder(4);
  TempFile file("encoder");
  m.save(file.path);
  torch::jit::Module loaded = torch::jit::load(file.path);

  const std::vector<std::string> expected{"logit_scale",
                                          "encoder.layers.0.self_attn.in_proj_weight",
                                          "encoder.layers.0.self_attn.in_proj_bias",
                                          "encoder.layers.0.linear1.weight",
                                          "encoder.layers.0.linear1.bias",
                                          "encoder.layers.1.self_attn.in_proj_weight",
                                          "encoder.layers.1.self_attn.in_proj_bias",
                                          "encoder.layers.1.linear1.weight",
                                          "encoder.layers.1.linear1.bias"};
  for (torch::jit::Module* mod : {&m, &loaded}) {
    const auto params = gradlora::named_parameters(*mod);
    EXPECT_EQ(params.keys(), expected);
    // Aliasing: the dictionary's tensors are the module's.
    torch::jit::Module layer0 = mod->attr("encoder").toModule().attr("layers").toModule().attr("0").toModule();
    const torch::Tensor w = layer0.attr("self_attn").toModule().attr("in_proj_weight").toTensor();
    EXPECT_TRUE(params["encoder.layers.0.self_attn.in_proj_weight"].is_same(w));
  }
}

TEST(JitNamedParameters, TiedTensorListedOnceUnderFirstName) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::Tensor shared = torch::randn({3, 3}).requires_grad_();
  torch::jit::Module sub("Sub", cu, true);
  sub.register_parameter("w", shared, false);
  sub.register_parameter("v", torch::randn({3}).requires_grad_(), false);
  torch::jit::Module root("Root", cu, true);
  root.register_parameter("embed", shared, false);
  root.register_module("head", sub);
  root.register_module("head_again", sub);  // the same submodule under two names
  const auto params = gradlora::named_parameters(root);
  EXPECT_EQ(params.keys(), (std::vector<std::string>{"embed", "head.v"}));
  // The optimizer, which rejects the same tensor under two names, accepts the list.
  Config c = base_config();
  c.targets.push_back(target("embed", Method::lora, 2, 2.0));
  LowRankOptimizer opt(params, c);
  EXPECT_EQ(opt.method_of("embed"), Method::lora);
}

// -------------------------------------------------------------- selection

TEST(JitSelection, TargetsSelectByDottedNameAndFrozenStayBitIdentical) {
  torch::manual_seed(1);
  TempFile file("encoder");
  build_encoder(4).save(file.path);
  torch::jit::Module m = torch::jit::load(file.path);
  const auto params = gradlora::named_parameters(m);

  Config c = gradlora::Config::from_yaml_string(R"YAML(
seed: 3
log_report: false
optimizer: {type: adamw, lr: 1.0e-2, weight_decay: 0.0}
targets:
  - match: "encoder.layers.*.self_attn.in_proj_weight"
    method: lora
    rank: 2
    alpha: 4
    init: symmetric
  - match: "encoder.layers.1.linear1.weight"
    method: additive
    rank: 2
  - match: "re:encoder\\.layers\\.0\\..*_bias"
    method: full
default: frozen
)YAML");
  LowRankOptimizer opt(params, c);
  const std::map<std::string, Method> expected{{"logit_scale", Method::frozen},
                                               {"encoder.layers.0.self_attn.in_proj_weight", Method::lora},
                                               {"encoder.layers.0.self_attn.in_proj_bias", Method::full},
                                               {"encoder.layers.0.linear1.weight", Method::frozen},
                                               {"encoder.layers.0.linear1.bias", Method::frozen},
                                               {"encoder.layers.1.self_attn.in_proj_weight", Method::lora},
                                               {"encoder.layers.1.self_attn.in_proj_bias", Method::frozen},
                                               {"encoder.layers.1.linear1.weight", Method::additive},
                                               {"encoder.layers.1.linear1.bias", Method::frozen}};
  for (const auto& [name, method] : expected) EXPECT_EQ(opt.method_of(name), method) << name;

  const auto before = snapshot(params);
  torch::manual_seed(2);
  const torch::Tensor x = torch::randn({8, 4}), y = torch::randn({8, 4});
  m.train();
  for (int i = 0; i < 3; ++i) {
    opt.zero_grad();
    torch::mse_loss(forward(m, x), y).backward();
    opt.step();
  }
  for (const auto& [name, method] : expected) {
    const torch::Tensor now = params[name];
    if (method == Method::frozen) {
      EXPECT_TRUE(torch::equal(now, before.at(name))) << name << " is frozen but changed";
    } else {
      EXPECT_GT(max_abs_diff(now, before.at(name)), 1e-4) << name << " was not trained";
    }
  }
}

TEST(JitSelection, UnmatchedTargetNamesThePattern) {
  TempFile file("mlp");
  torch::jit::Module m = load_scripted_mlp(MlpWeights::random(0), file.path);
  Config c = base_config();
  c.targets.push_back(target("layers.*.weight", Method::lora));
  try {
    LowRankOptimizer opt(gradlora::named_parameters(m), c);
    FAIL() << "expected ConfigError";
  } catch (const gradlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.*.weight"), std::string::npos) << e.what();
  }
}

// --------------------------------------------- equivalence: module-side LoRA

struct LoraCase {
  Init init;
  InnerType inner;
};
void PrintTo(const LoraCase& c, std::ostream* os) {
  *os << "init " << gradlora::to_string(c.init) << ", inner " << gradlora::to_string(c.inner);
}

class JitLoraEquivalence : public ::testing::TestWithParam<LoraCase> {};

/// Scripted MLP (saved and re-loaded) trained by LowRankOptimizer with `lora` on
/// both weights, `full` on fc1.bias and fc2.bias frozen, against the network-side
/// LoRA written out by hand: y = fc2(tanh(x·W1ᵀ + b1)) with W = P0 + s·A·B, where
/// A and B are leaf tensors that autograd differentiates and torch::optim updates.
TEST_P(JitLoraEquivalence, EqualsExplicitModuleSideLora) {
  const LoraCase pc = GetParam();
  ScriptedMlp mlp(5);

  Config c = base_config();
  if (pc.inner == InnerType::sgd) {
    c.optimizer.type = InnerType::sgd;
    c.optimizer.lr = 5e-2;
    c.optimizer.momentum = 0.9;
    c.optimizer.weight_decay = 0.0;
  }
  c.targets.push_back(target("fc1.weight", Method::lora, 3, 6.0));  // s = 2
  c.targets.push_back(target("fc2.weight", Method::lora, 2, 1.0));  // s = 0.5
  c.targets.push_back(target("fc1.bias", Method::full));
  for (auto& t : c.targets) t.init = pc.init;
  const auto params = gradlora::named_parameters(mlp.m);
  LowRankOptimizer opt(params, c);
  EXPECT_EQ(opt.method_of("fc2.bias"), Method::frozen);

  // Reference: each factor offset + leaf, the leaf trained by torch::optim. Init zero:
  // offset 0, the leaf starts at the factor (decay toward 0, as PEFT). Init symmetric: the
  // offset is the factor's start, the leaf starts at 0 (decay toward the start), and
  // P0 = P − s·A0·B0 keeps P unchanged at step 0.
  const double s1 = 2.0, s2 = 0.5;
  const bool sym = pc.init == Init::symmetric;
  auto leaf = [](const torch::Tensor& t) { return t.detach().clone().requires_grad_(true); };
  auto offset = [&](const torch::Tensor& t) { return sym ? t.detach().clone() : torch::zeros_like(t); };
  auto start = [&](const torch::Tensor& t) { return leaf(sym ? torch::zeros_like(t) : t); };
  auto [A1i, B1i] = opt.factors("fc1.weight");
  auto [A2i, B2i] = opt.factors("fc2.weight");
  const torch::Tensor oA1 = offset(A1i), oB1 = offset(B1i), oA2 = offset(A2i), oB2 = offset(B2i);
  torch::Tensor lA1 = start(A1i), lB1 = start(B1i), lA2 = start(A2i), lB2 = start(B2i), b1 = leaf(mlp.w0.b1);
  auto A1 = [&] { return oA1 + lA1; };
  auto B1 = [&] { return oB1 + lB1; };
  auto A2 = [&] { return oA2 + lA2; };
  auto B2 = [&] { return oB2 + lB2; };
  const torch::Tensor P01 = (mlp.w0.w1 - s1 * A1i.mm(B1i)).detach();
  const torch::Tensor P02 = (mlp.w0.w2 - s2 * A2i.mm(B2i)).detach();
  std::unique_ptr<torch::optim::Optimizer> ref;
  if (pc.inner == InnerType::sgd) {
    ref = std::make_unique<torch::optim::SGD>(std::vector<torch::Tensor>{lA1, lB1, b1, lA2, lB2},
                                              torch::optim::SGDOptions(5e-2).momentum(0.9));
  } else {
    ref = std::make_unique<torch::optim::AdamW>(std::vector<torch::Tensor>{lA1, lB1, b1, lA2, lB2},
                                                torch::optim::AdamWOptions(2e-2).weight_decay(0.01));
  }
  auto ref_forward = [&](const torch::Tensor& x) {
    torch::Tensor W1 = P01 + s1 * A1().mm(B1());
    torch::Tensor W2 = P02 + s2 * A2().mm(B2());
    return torch::addmm(mlp.w0.b2, torch::tanh(torch::addmm(b1, x, W1.t())), W2.t());
  };

  mlp.m.train();
  const int steps = 6;
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    torch::Tensor loss = torch::mse_loss(forward(mlp.m, mlp.d.x), mlp.d.y);
    loss.backward();
    opt.step();

    ref->zero_grad();
    torch::Tensor ref_loss = torch::mse_loss(ref_forward(mlp.d.x), mlp.d.y);
    ref_loss.backward();
    ref->step();
    EXPECT_NEAR(loss.item<double>(), ref_loss.item<double>(), 1e-5) << "step " << i;
  }
  torch::NoGradGuard g;
  const double tol = 1e-5;
  EXPECT_LE(max_abs_diff(opt.factors("fc1.weight").first, A1()), tol);
  EXPECT_LE(max_abs_diff(opt.factors("fc1.weight").second, B1()), tol);
  EXPECT_LE(max_abs_diff(opt.factors("fc2.weight").first, A2()), tol);
  EXPECT_LE(max_abs_diff(opt.factors("fc2.weight").second, B2()), tol);
  EXPECT_LE(max_abs_diff(params["fc1.weight"], P01 + s1 * A1().mm(B1())), tol);
  EXPECT_LE(max_abs_diff(params["fc2.weight"], P02 + s2 * A2().mm(B2())), tol);
  EXPECT_LE(max_abs_diff(params["fc1.bias"], b1), tol);
  EXPECT_TRUE(torch::equal(params["fc2.bias"], mlp.w0.b2)) << "frozen fc2.bias changed";
  EXPECT_LE(max_abs_diff(forward(mlp.m, mlp.d.x), ref_forward(mlp.d.x)), tol);
  // The weights did move (the comparison is not between two untouched networks).
  EXPECT_GT(max_abs_diff(params["fc1.weight"], mlp.w0.w1), 1e-3);
  EXPECT_GT(max_abs_diff(params["fc2.weight"], mlp.w0.w2), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Cases, JitLoraEquivalence,
                         ::testing::Values(LoraCase{Init::zero, InnerType::adamw},
                                           LoraCase{Init::symmetric, InnerType::adamw},
                                           LoraCase{Init::zero, InnerType::sgd}),
                         [](const ::testing::TestParamInfo<LoraCase>& info) {
                           return std::string(gradlora::to_string(info.param.init)) + "_" +
                                  gradlora::to_string(info.param.inner);
                         });

// ---------------------------------------- every method: scripted == nn twin

class JitEveryMethod : public ::testing::TestWithParam<Method> {};

/// The same config on the scripted module and on its torch::nn twin (same names,
/// so the same seeded factors) gives the same weights: the optimizer sees no
/// difference between the two kinds of module.
TEST_P(JitEveryMethod, ScriptedModuleTrainsLikeItsNnTwin) {
  const Method method = GetParam();
  ScriptedMlp mlp(21);
  gradlora::testing::Mlp twin = make_twin(mlp.w0);

  Config c = base_config();
  c.targets.push_back(target("fc*.weight", method, 2, 4.0));
  if (method == Method::galore) {
    c.targets.back().options["update_proj_gap"] = int64_t{2};  // refresh the projection during the run
  }
  c.targets.push_back(target("*.bias", Method::full));
  const auto params = gradlora::named_parameters(mlp.m);
  std::unique_ptr<LowRankOptimizer> opt_ptr;
  try {
    opt_ptr = std::make_unique<LowRankOptimizer>(params, c);
  } catch (const gradlora::ConfigError& e) {
    if (std::string(e.what()).find("not available yet") != std::string::npos) GTEST_SKIP() << e.what();
    throw;
  }
  LowRankOptimizer& opt = *opt_ptr;
  LowRankOptimizer twin_opt(twin->named_parameters(), c);
  EXPECT_EQ(opt.names(), twin_opt.names());

  const auto before = snapshot(params);
  const int steps = 5;
  train_scripted(mlp.m, opt, mlp.d, steps);
  twin->train();
  for (int i = 0; i < steps; ++i) {
    twin_opt.zero_grad();
    torch::mse_loss(twin->forward(mlp.d.x), mlp.d.y).backward();
    twin_opt.step();
  }
  const auto twin_params = twin->named_parameters();
  for (const auto& kv : params) {
    EXPECT_LE(max_abs_diff(kv.value(), twin_params[kv.key()]), 1e-5) << kv.key();
  }
  for (const char* name : {"fc1.weight", "fc2.weight"}) {
    if (method == Method::frozen) {
      EXPECT_TRUE(torch::equal(params[name], before.at(name))) << name << " is frozen but changed";
    } else {
      EXPECT_GT(max_abs_diff(params[name], before.at(name)), 1e-3) << name << " was not trained";
    }
  }
  EXPECT_GT(max_abs_diff(params["fc1.bias"], before.at("fc1.bias")), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Methods, JitEveryMethod,
                         ::testing::Values(Method::lora, Method::random, Method::additive, Method::galore,
                                           Method::hadamard, Method::full, Method::frozen),
                         [](const ::testing::TestParamInfo<Method>& info) {
                           return std::string(gradlora::to_string(info.param));
                         });

// ------------------------------------------------------------- fused mode

/// fuse_into_backward projects inside backward() through a hook on each
/// parameter's gradient accumulator; the TorchScript graph executor's own
/// autodiff must reach those hooks just as eager autograd does.
TEST(JitFused, FusedModeOnScriptedModuleEqualsPlainSteps) {
  ScriptedMlp mlp(51);
  torch::jit::Module& plain = mlp.m;
  torch::jit::Module fused = torch::jit::load(mlp.file.path);
  Config c = base_config();
  c.targets.push_back(target("fc*.weight", Method::lora, 2, 4.0));
  c.targets.push_back(target("fc1.bias", Method::full));
  LowRankOptimizer plain_opt(gradlora::named_parameters(plain), c);
  c.fuse_into_backward = true;
  LowRankOptimizer fused_opt(gradlora::named_parameters(fused), c);
  const auto before = snapshot(gradlora::named_parameters(fused));
  train_scripted(plain, plain_opt, mlp.d, 4);
  train_scripted(fused, fused_opt, mlp.d, 4);
  const auto plain_params = gradlora::named_parameters(plain);
  for (const auto& kv : gradlora::named_parameters(fused)) {
    EXPECT_LE(max_abs_diff(kv.value(), plain_params[kv.key()]), 1e-6) << kv.key();
  }
  EXPECT_GT(max_abs_diff(plain_params["fc1.weight"], before.at("fc1.weight")), 1e-3);
  EXPECT_TRUE(torch::equal(plain_params["fc2.bias"], before.at("fc2.bias")));
}

// ------------------------------------------------------------ save, reload

TEST(JitSaveLoad, SavedModuleReproducesFineTunedOutputsAndResumes) {
  const MlpWeights w0 = MlpWeights::random(31);
  const Data d = make_data(32);
  TempFile base("base"), tuned("tuned"), ckpt("opt");
  Config c = base_config();
  c.targets.push_back(target("fc*.weight", Method::lora, 2, 4.0));
  c.targets.push_back(target("fc1.bias", Method::full));

  // Uninterrupted: 4 + 3 steps.
  torch::jit::Module m = load_scripted_mlp(w0, base.path);
  LowRankOptimizer opt(gradlora::named_parameters(m), c);
  m.eval();
  const torch::Tensor initial_out = forward(m, d.x).detach();
  train_scripted(m, opt, d, 4);
  m.eval();
  const torch::Tensor tuned_out = forward(m, d.x).detach();
  const auto tuned_params = snapshot(gradlora::named_parameters(m));
  m.save(tuned.path);
  torch::save(opt, ckpt.path);
  train_scripted(m, opt, d, 3);
  const auto final_params = snapshot(gradlora::named_parameters(m));

  // The saved file gives the fine-tuned outputs, not the initial ones.
  torch::jit::Module reloaded = torch::jit::load(tuned.path);
  reloaded.eval();
  // Its parameters are the fine-tuned ones, bit for bit. Its outputs equal the tuned module's
  // to float rounding only: on LibTorch 2.x the profiling executor can run a freshly loaded module's
  // first calls on another graph than a module that has already run many times (1.49e-8 apart here).
  for (const auto& kv : gradlora::named_parameters(reloaded)) {
    EXPECT_TRUE(torch::equal(kv.value(), tuned_params.at(kv.key()))) << kv.key();
  }
  const torch::Tensor reloaded_out = forward(reloaded, d.x).detach();
  std::printf("reloaded module: outputs differ from the tuned module's by %.3g\n",
              max_abs_diff(reloaded_out, tuned_out));
  EXPECT_LE(max_abs_diff(reloaded_out, tuned_out), 1e-6);
  EXPECT_GT(max_abs_diff(reloaded_out, initial_out), 1e-3);

  // Resume: reloaded module + optimizer checkpoint continue exactly as before.
  LowRankOptimizer resumed(gradlora::named_parameters(reloaded), c);
  torch::load(resumed, ckpt.path);
  train_scripted(reloaded, resumed, d, 3);
  for (const auto& kv : gradlora::named_parameters(reloaded)) {
    EXPECT_LE(max_abs_diff(kv.value(), final_params.at(kv.key())), 1e-6) << kv.key();
  }
}

// ------------------------------------------------------------ requires_grad

TEST(JitRequiresGrad, FollowsTheSelection) {
  const MlpWeights w0 = MlpWeights::random(41);
  const Data d = make_data(42);
  TempFile file("mlp");
  {
    // A model exported with gradients switched off: nothing would train.
    torch::jit::Module off = build_scripted_mlp(w0);
    gradlora::set_requires_grad(off, false);
    off.save(file.path);
  }
  torch::jit::Module m = torch::jit::load(file.path);
  for (const auto& p : m.parameters()) ASSERT_FALSE(p.requires_grad());

  Config c = base_config();
  c.targets.push_back(target("fc1.weight", Method::lora, 2, 4.0));
  c.targets.push_back(target("fc2.bias", Method::full));
  const auto params = gradlora::named_parameters(m);
  LowRankOptimizer opt(params, c);
  gradlora::set_requires_grad(m, opt);
  EXPECT_TRUE(params["fc1.weight"].requires_grad());
  EXPECT_TRUE(params["fc2.bias"].requires_grad());
  EXPECT_FALSE(params["fc1.bias"].requires_grad());
  EXPECT_FALSE(params["fc2.weight"].requires_grad());

  const auto before = snapshot(params);
  train_scripted(m, opt, d, 3);
  EXPECT_FALSE(params["fc2.weight"].grad().defined()) << "a frozen weight got a gradient";
  EXPECT_GT(max_abs_diff(params["fc1.weight"], before.at("fc1.weight")), 1e-3);
  EXPECT_GT(max_abs_diff(params["fc2.bias"], before.at("fc2.bias")), 1e-3);
  EXPECT_TRUE(torch::equal(params["fc2.weight"], before.at("fc2.weight")));
  EXPECT_TRUE(torch::equal(params["fc1.bias"], before.at("fc1.bias")));

  // An optimizer built from another module is refused, and nothing changes.
  auto encoder_params = gradlora::named_parameters(build_encoder(4));
  LowRankOptimizer other(encoder_params, [] {
    Config e = base_config();
    e.default_method = Method::full;
    return e;
  }());
  EXPECT_THROW(gradlora::set_requires_grad(m, other), std::invalid_argument);
  EXPECT_FALSE(params["fc2.weight"].requires_grad());
  EXPECT_TRUE(params["fc1.weight"].requires_grad());
}

// ------------------------------------------------------------ embedding modules

// A scripted nn.Embedding has the qualified type name __torch__.torch.nn.modules.sparse.Embedding;
// a second one of that name is mangled (…sparse.___torch_mangle_N.Embedding).
torch::jit::Module scripted_embedding(const std::shared_ptr<torch::jit::CompilationUnit>& cu, int64_t num,
                                      int64_t dim) {
  torch::jit::Module m(c10::QualifiedName("__torch__.torch.nn.modules.sparse.Embedding"), cu, /*shouldMangle=*/true);
  m.register_parameter("weight", torch::randn({num, dim}), /*is_buffer=*/false);
  return m;
}

TEST(JitEmbeddingModules, FoundByQualifiedTypeName) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module model("Model", cu, /*shouldMangle=*/true);
  torch::jit::Module block("Block", cu, /*shouldMangle=*/true);
  block.register_module("wpe", scripted_embedding(cu, 8, 3));
  block.register_module("proj", scripted_linear(cu, torch::randn({3, 3}), torch::randn({3})));
  model.register_module("wte", scripted_embedding(cu, 10, 3));
  model.register_module("block", block);
  const std::string mangled = model.attr("wte").toModule().type()->name()->qualifiedName();  // the second made
  EXPECT_NE(mangled.find("___torch_mangle_"), std::string::npos) << mangled << ": the test wants a mangled name";
  EXPECT_EQ(gradlora::embedding_modules(model), (std::set<std::string>{"block.wpe", "wte"}));
}

}  // namespace
