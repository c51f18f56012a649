// The core contract: optimizer-side `lora` equals module-side LoRA trained by
// torch::optim; `full` equals torch::optim bit for bit; frozen is frozen; the
// state stays at low rank; schedulers reach the factors.
#include "test_util.h"

#include <set>
#include <tuple>

using namespace gradlora;
using namespace gradlora::testing;  // the shared test helpers (test_util.h)

namespace {

std::string inner_yaml(InnerType t) {
  switch (t) {
    case InnerType::sgd:
      return "{type: sgd, lr: 0.05, momentum: 0.9, dampening: 0.1, weight_decay: 0.01}";
    case InnerType::adam:
      return "{type: adam, lr: 0.01, betas: [0.8, 0.99], eps: 1.0e-6, weight_decay: 0.02}";
    default:
      return "{type: adamw, lr: 0.01, weight_decay: 0.1}";
  }
}

std::unique_ptr<torch::optim::Optimizer> make_torch_optim(InnerType t, std::vector<torch::Tensor> params) {
  switch (t) {
    case InnerType::sgd:
      return std::make_unique<torch::optim::SGD>(
          params, torch::optim::SGDOptions(0.05).momentum(0.9).dampening(0.1).weight_decay(0.01));
    case InnerType::adam:
      return std::make_unique<torch::optim::Adam>(
          params, torch::optim::AdamOptions(0.01).betas({0.8, 0.99}).eps(1e-6).weight_decay(0.02));
    default:
      return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  }
}

/// Module-side LoRA written independently of the library: Y = X·W0ᵀ + s·(X·Bᵀ)·Aᵀ + b,
/// with W0 and b frozen and A, B trained by torch::optim.
// Each factor is offset + leaf, the leaf trained by LibTorch's optimizer (and decayed
// toward 0 by it): init zero, offset 0 and the leaf starts at the factor (PEFT's decay of
// A and B); init symmetric, the offset is the factor's start and the leaf starts at 0, so
// the decay pulls the factor toward its start.
struct ModuleLora {
  torch::Tensor W1, b1, W2, b2, A1, B1, A2, B2;  // leaves
  torch::Tensor oA1, oB1, oA2, oB2;              // offsets
  double s;
  torch::Tensor a1() const { return oA1 + A1; }
  torch::Tensor b1f() const { return oB1 + B1; }
  torch::Tensor a2() const { return oA2 + A2; }
  torch::Tensor b2f() const { return oB2 + B2; }
  torch::Tensor forward(const torch::Tensor& x) const {
    torch::Tensor h = torch::tanh(torch::mm(x, W1.t()) + s * torch::mm(torch::mm(x, b1f().t()), a1().t()) + b1);
    return torch::mm(h, W2.t()) + s * torch::mm(torch::mm(h, b2f().t()), a2().t()) + b2;
  }
};

constexpr const char* kLoraTargets = R"(
targets:
  - {match: "fc*.weight", method: lora, rank: 3, alpha: 6, init: INIT}
default: frozen
)";

std::string lora_config(InnerType t, Init init) {
  std::string targets = kLoraTargets;
  targets.replace(targets.find("INIT"), 4, to_string(init));
  return "seed: 7\noptimizer: " + inner_yaml(t) + targets;
}

/// Runs both sides for `steps` steps and returns the largest weight and factor gap seen.
/// `module_scale` lets a test break the module side's scale on purpose. Both sides run on `device`.
std::pair<double, double> run_equivalence(InnerType t, Init init, torch::ScalarType dtype, int steps,
                                          double module_scale, torch::Device device = torch::kCPU) {
  Mlp model = make_mlp(dtype, device);
  LowRankOptimizer opt(model->named_parameters(), quiet(lora_config(t, init)));
  torch::optim::StepLR sched(opt, /*step_size=*/7, /*gamma=*/0.5);

  torch::NoGradGuard ng;
  ModuleLora ref;
  ref.s = module_scale;
  auto [A1, B1] = opt.factors("fc1.weight");
  auto [A2, B2] = opt.factors("fc2.weight");
  // The implicit base of symmetric init: P0 = P − s·A0·B0.
  ref.W1 = model->fc(1)->weight.detach() - module_scale * torch::mm(A1, B1).to(dtype);
  ref.W2 = model->fc(2)->weight.detach() - module_scale * torch::mm(A2, B2).to(dtype);
  ref.b1 = model->fc(1)->bias.detach().clone();
  ref.b2 = model->fc(2)->bias.detach().clone();
  auto split = [&](const torch::Tensor& f, torch::Tensor& leaf, torch::Tensor& offset) {
    const torch::Tensor v = f.clone().to(dtype);
    offset = init == Init::symmetric ? v : torch::zeros_like(v);
    leaf = (init == Init::symmetric ? torch::zeros_like(v) : v).requires_grad_();
  };
  split(A1, ref.A1, ref.oA1);
  split(B1, ref.B1, ref.oB1);
  split(A2, ref.A2, ref.oA2);
  split(B2, ref.B2, ref.oB2);
  auto ref_opt = make_torch_optim(t, {ref.A1, ref.B1, ref.A2, ref.B2});
  torch::optim::StepLR ref_sched(*ref_opt, 7, 0.5);

  double wgap = 0, fgap = 0;
  for (int i = 0; i < steps; ++i) {
    auto [x, y] = batch(i, dtype, device);
    {
      torch::AutoGradMode on(true);
      opt.zero_grad();
      torch::mse_loss(model->forward(x), y).backward();
      ref_opt->zero_grad();
      torch::mse_loss(ref.forward(x), y).backward();
    }
    opt.step();
    sched.step();
    ref_opt->step();
    ref_sched.step();
    const torch::Tensor W1 = ref.W1 + module_scale * torch::mm(ref.a1(), ref.b1f());
    const torch::Tensor W2 = ref.W2 + module_scale * torch::mm(ref.a2(), ref.b2f());
    wgap = std::max({wgap, max_abs_diff(model->fc(1)->weight, W1), max_abs_diff(model->fc(2)->weight, W2)});
    auto [a1, b1] = opt.factors("fc1.weight");
    auto [a2, b2] = opt.factors("fc2.weight");
    fgap = std::max({fgap, max_abs_diff(a1, ref.a1()), max_abs_diff(b1, ref.b1f()), max_abs_diff(a2, ref.a2()),
                     max_abs_diff(b2, ref.b2f())});
  }
  return {wgap, fgap};
}

class ModuleEquivalence
    : public ::testing::TestWithParam<std::tuple<InnerType, Init, torch::ScalarType, torch::Device>> {};

}  // namespace

TEST_P(ModuleEquivalence, OptimizerSideLoraFollowsModuleSideLora) {
  const auto [rule, init, dtype, device] = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  const double s = 2.0;  // alpha 6 / rank 3
  auto [wgap, fgap] = run_equivalence(rule, init, dtype, 25, s, device);
  const double tol = dtype == torch::kDouble ? 1e-11 : 1e-5;
  EXPECT_LE(wgap, tol) << "weights";
  EXPECT_LE(fgap, tol) << "factors";
}

INSTANTIATE_TEST_SUITE_P(Rules, ModuleEquivalence,
                         ::testing::Combine(::testing::Values(InnerType::sgd, InnerType::adam, InnerType::adamw),
                                            ::testing::Values(Init::zero, Init::symmetric),
                                            ::testing::Values(torch::kFloat, torch::kDouble),
                                            ::testing::ValuesIn(test_devices())),
                         CaseAndDeviceName());

// The equivalence test can fail: with the scale dropped on the module side
// (s = 1 instead of 2) the trajectories part at once, under SGD and AdamW.
TEST(ModuleEquivalenceControl, DetectsAWrongScale) {
  for (InnerType t : {InnerType::sgd, InnerType::adamw}) {
    auto [wgap, fgap] = run_equivalence(t, Init::zero, torch::kDouble, 25, 1.0);
    EXPECT_GT(wgap, 1e-4) << to_string(t);
    (void)fgap;
  }
}

// ---- full parity (optimizer side against torch::optim on the same device)

namespace {
class FullParity : public ::testing::TestWithParam<torch::Device> {};
}  // namespace

namespace {

// One step on batch i through model a with `opt` and model b with `ref`.
void step_both(Mlp& a, torch::optim::Optimizer& opt, Mlp& b, torch::optim::Optimizer& ref, int64_t i,
               torch::Device device) {
  auto [x, y] = batch(i, torch::kFloat, device);
  opt.zero_grad();
  ref.zero_grad();
  torch::mse_loss(a->forward(x), y).backward();
  torch::mse_loss(b->forward(x), y).backward();
  opt.step();
  ref.step();
}

}  // namespace

TEST_P(FullParity, AdamWBitForBit) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  Mlp a = make_mlp(torch::kFloat, device), b = make_mlp(torch::kFloat, device);
  LowRankOptimizer opt(a->named_parameters(),
                       quiet("optimizer: {type: adamw, lr: 0.02, weight_decay: 0.05, amsgrad: true}\ndefault: full"));
  torch::optim::AdamW ref(b->parameters(), torch::optim::AdamWOptions(0.02).weight_decay(0.05).amsgrad(true));
  for (int i = 0; i < 15; ++i) {
    step_both(a, opt, b, ref, i, device);
  }
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i])) << i;
}

TEST_P(FullParity, SgdNesterovBitForBit) {
  const torch::Device device = GetParam();
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  Mlp a = make_mlp(torch::kFloat, device), b = make_mlp(torch::kFloat, device);
  LowRankOptimizer opt(a->named_parameters(),
                       quiet("optimizer: {type: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01}\n"
                             "default: full"));
  torch::optim::SGD ref(b->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(0.01));
  torch::optim::StepLR s1(opt, 4, 0.3), s2(ref, 4, 0.3);
  for (int i = 0; i < 15; ++i) {
    step_both(a, opt, b, ref, i, device);
    s1.step();
    s2.step();
  }
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i])) << i;
}

INSTANTIATE_TEST_SUITE_P(Devices, FullParity, ::testing::ValuesIn(test_devices()), DeviceName());

// ---- frozen, step 0, schedulers, skipping

TEST(Core, FrozenParametersNeverChange) {
  Mlp m = make_mlp();
  std::map<std::string, torch::Tensor> before;
  for (const auto& kv : m->named_parameters()) before[kv.key()] = kv.value().detach().clone();
  LowRankOptimizer opt(m->named_parameters(),
                       quiet("optimizer: {lr: 0.05}\ntargets: [{match: fc1.weight, rank: 2, init: symmetric}]"));
  for (int i = 0; i < 5; ++i) {
    auto [x, y] = batch(i);
    opt.zero_grad();
    torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
  for (const auto& kv : m->named_parameters()) {
    if (kv.key() == "fc1.weight") {
      EXPECT_FALSE(torch::equal(kv.value(), before[kv.key()])) << "the trained weight must move";
    } else {
      EXPECT_TRUE(torch::equal(kv.value(), before[kv.key()])) << kv.key();
      EXPECT_EQ(opt.method_of(kv.key()), Method::frozen);
    }
  }
}

TEST(Core, ModelUnchangedAtStepZeroForBothInits) {
  for (const char* init : {"zero", "symmetric"}) {
    for (const char* wb : {"incremental", "exact"}) {
      Mlp m = make_mlp();
      const torch::Tensor w0 = m->fc(1)->weight.detach().clone();
      auto [x, y] = batch(0);
      const torch::Tensor out0 = m->forward(x).detach();
      LowRankOptimizer opt(m->named_parameters(),
                           quiet(fmt::format("optimizer: {{lr: 0.0, weight_decay: 0.0}}\n"
                                             "targets: [{{match: fc1.weight, rank: 4, init: {}, writeback: {}}}]",
                                             init, wb)));
      EXPECT_TRUE(torch::equal(m->fc(1)->weight, w0)) << init << " " << wb;
      opt.zero_grad();
      torch::mse_loss(m->forward(x), y).backward();
      opt.step();  // lr 0: the factors do not move, so neither may the weight
      EXPECT_TRUE(torch::equal(m->fc(1)->weight, w0)) << init << " " << wb;
      EXPECT_TRUE(torch::equal(m->forward(x).detach(), out0)) << init << " " << wb;
    }
  }
}

TEST(Core, SchedulerReachesTheFactorUpdates) {
  // Inner SGD without momentum: ΔA = −lr·gA, so the factor step tracks the group lr exactly.
  Mlp m = make_mlp(torch::kDouble);
  LowRankOptimizer opt(m->named_parameters(), quiet("optimizer: {type: sgd, lr: 0.2}\n"
                                                    "targets: [{match: fc1.weight, rank: 2, init: symmetric}]"));
  torch::optim::StepLR sched(opt, /*step_size=*/1, /*gamma=*/0.25);
  std::set<double> lrs;
  for (int i = 0; i < 4; ++i) {
    auto [x, y] = batch(i, torch::kDouble);
    opt.zero_grad();
    torch::mse_loss(m->forward(x), y).backward();
    auto [A, B] = opt.factors("fc1.weight");
    const torch::Tensor A0 = A.clone();
    auto [gA, gB] = lora_factor_grads(m->fc(1)->weight.grad(), A, B, 1.0);
    const double lr = opt.param_groups()[0].options().get_lr();  // what the scheduler set
    lrs.insert(lr);
    opt.step();
    EXPECT_LE(max_abs_diff(A, A0 - lr * gA), 1e-14) << "step " << i << " lr " << lr;
    sched.step();
  }
  EXPECT_GE(lrs.size(), 3u) << "the scheduler must have changed the learning rate";
  EXPECT_LT(*lrs.begin(), 0.2 * 0.25 * 0.25 * 1.0000001);
}

TEST(Core, ParametersWithoutGradientAreSkipped) {
  Mlp m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(), quiet("targets: [{match: 'fc*.weight', rank: 2}]\ndefault: full"));
  const torch::Tensor w2 = m->fc(2)->weight.detach().clone();
  const torch::Tensor b2 = m->fc(2)->bias.detach().clone();
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  m->fc(2)->weight.mutable_grad() = torch::Tensor();
  m->fc(2)->bias.mutable_grad() = torch::Tensor();
  const torch::Tensor w1 = m->fc(1)->weight.detach().clone();
  opt.step();
  EXPECT_TRUE(torch::equal(m->fc(2)->weight, w2));
  EXPECT_TRUE(torch::equal(m->fc(2)->bias, b2));
  EXPECT_FALSE(torch::equal(m->fc(1)->weight, w1));
  EXPECT_EQ(opt.projector("fc2.weight").steps(), 0);
  EXPECT_EQ(opt.projector("fc1.weight").steps(), 1);
  for (const auto& kv : opt.state_tensors("fc2.weight")) EXPECT_EQ(kv.first.rfind("inner.", 0), std::string::npos);
}

TEST(Core, ZeroGradClearsEveryGradient) {
  Mlp m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(), quiet("targets: [{match: fc1.weight, rank: 2}]"));
  auto [x, y] = batch(0);
  torch::mse_loss(m->forward(x), y).backward();
  opt.step();
  opt.zero_grad();
  for (const auto& p : m->parameters()) {
    EXPECT_TRUE(!p.grad().defined() || p.grad().abs().sum().item<double>() == 0.0);
  }
}

TEST(Core, PerTargetLearningRatesMakeGroups) {
  Mlp m = make_mlp();
  LowRankOptimizer opt(m->named_parameters(),
                       quiet("optimizer: {lr: 0.01}\n"
                             "targets: [{match: fc1.weight, rank: 2, lr: 0.5}, {match: fc2.weight, rank: 2}]\n"
                             "default: full"));
  ASSERT_EQ(opt.param_groups().size(), 3u);  // fc1.weight, fc2.weight, default
  EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.5);
  EXPECT_DOUBLE_EQ(opt.param_groups()[1].options().get_lr(), 0.01);
  EXPECT_EQ(opt.param_groups()[2].params().size(), 2u);  // the biases
}

// ---- memory

TEST(Memory, LoraStateHoldsNoFullSizeTensor) {
  Mlp m = make_mlp(torch::kFloat, 12, 16, 6);
  LowRankOptimizer opt(m->named_parameters(), quiet("targets: [{match: 'fc*.weight', rank: 2}]"));
  for (int i = 0; i < 3; ++i) {
    auto [x, y] = batch(i);
    opt.zero_grad();
    torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
  for (const char* name : {"fc1.weight", "fc2.weight"}) {
    const auto st = opt.state_tensors(name);
    const int64_t nm = m->named_parameters()[name].numel();
    int64_t moments = 0;
    for (const auto& kv : st) {
      EXPECT_LT(kv.second.numel(), nm) << name << " " << kv.first;
      if (kv.first.rfind("inner.", 0) == 0) moments += kv.second.numel();
    }
    const torch::Tensor P = m->named_parameters()[name];          // a copy: named_parameters() is a temporary
    EXPECT_EQ(moments, 2 * 2 * (P.size(0) + P.size(1))) << name;  // adamw: 2·r·(n+m)
  }
}

TEST(Memory, ReportAt4096SquaredRank8) {
  const auto params = single_weight(torch::zeros({4096, 4096}));
  LowRankOptimizer opt(params, quiet("targets: [{match: w, rank: 8}]"));
  const ParamReport& p = opt.report().params.at(0);
  EXPECT_EQ(p.moment_bytes, 2 * 8 * (4096 + 4096) * 4);          // 512 KiB of moments
  EXPECT_EQ(p.persistent_bytes, 8 * (4096 + 4096) * 4);          // the factors
  EXPECT_EQ(p.adamw_state_bytes, int64_t{2} * 4096 * 4096 * 4);  // 128 MiB for AdamW
  EXPECT_EQ(p.allreduce_bytes, 4 * 8 * (4096 + 4096));
  EXPECT_EQ(p.adamw_state_bytes / p.moment_bytes, 256);
  EXPECT_NE(opt.report().to_string().find("lora"), std::string::npos);
}
