// full: the parameter itself, stepped by the inner rule (bit-identical to torch::optim).
#include "methods.h"

namespace gradlora::methods {

namespace {

class FullProjector final : public Projector {
 public:
  using Projector::Projector;
  std::vector<torch::Tensor> inner_params() const override { return {ctx_.param}; }
  void project(const torch::Tensor&) override {}  // the inner rule reads P.grad itself
  void project_zero() override { ctx_.param.mutable_grad() = torch::zeros_like(ctx_.param); }
  void write_back(InnerRule&) override { ++steps_; }
  std::vector<std::pair<std::string, torch::Tensor>> tensors() const override { return {}; }
  int64_t trainable() const override { return ctx_.param.numel(); }
  int64_t rank() const override { return 0; }
  bool fusable() const override { return false; }  // the inner rule needs the full gradient
  std::string settings() const override { return "full"; }
};

}  // namespace

MethodInfo full() {
  MethodInfo m;
  m.name = "full";
  m.weight_decay_on = "the parameter, by the inner rule (as torch::optim)";
  m.low_rank = false;
  m.footprint = [](const ProjectorContext& ctx) { return std::make_pair(int64_t{0}, ctx.param.numel()); };
  m.make = [](ProjectorContext ctx) { return std::make_unique<FullProjector>(std::move(ctx)); };
  return m;
}

}  // namespace gradlora::methods
