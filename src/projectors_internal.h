#pragma once
// Factories of the methods beyond the seed (galore, hadamard), defined in
// projectors_beyond.cpp and called from make_projector().
#include <gradlora/maths.h>
#include <gradlora/projector.h>

#include <memory>

namespace gradlora::detail {

/// Factors' dtype (fp32, or fp64 for double weights) on the parameter's device.
inline torch::TensorOptions factor_options(const torch::Tensor& P) {
  return torch::TensorOptions().dtype(factor_dtype(P.scalar_type())).device(P.device());
}

/// `writeback: auto` means exact (or an fp32 master copy) for bf16/fp16 weights.
inline bool use_exact(const ProjectorContext& ctx) {
  switch (ctx.target.writeback) {
    case WriteBack::exact:
      return true;
    case WriteBack::incremental:
      return false;
    default:
      return ctx.param.scalar_type() == torch::kBFloat16 || ctx.param.scalar_type() == torch::kHalf;
  }
}

/// Drops a tensor's .grad (the inner rule then skips it).
inline void release_grad(torch::Tensor& t) {
  if (t.grad().defined()) t.mutable_grad() = torch::Tensor();
}

std::unique_ptr<Projector> make_galore_projector(ProjectorContext ctx);
std::unique_ptr<Projector> make_hadamard_projector(ProjectorContext ctx);

}  // namespace gradlora::detail
