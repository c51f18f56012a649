#pragma once
// This process's place in a data-parallel run of the trainer.
#include "settings.h"

#include <gradlora/distributed.h>
#include <gradlora/optimizer.h>

#include <chrono>

namespace gradlora::app {

/// How long a rank waits for the others: rank 0 pre-trains (when the cache is
/// empty), evaluates and writes checkpoints while the other ranks wait.
constexpr std::chrono::milliseconds kRankWait = std::chrono::minutes(30);

/// This process's place in a data-parallel run; a single process has no group.
struct Ranks {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  int rank = 0, world = 1;
  /// Where the small control tensors travel: the training device under NCCL, else the CPU.
  torch::Device control = torch::kCPU;
  bool main() const { return rank == 0; }

  /// Rank 0's `value` on every rank (a barrier as well).
  bool agree_on_rank0(bool value) {
    if (!pg) return value;
    std::vector<torch::Tensor> flag{torch::full({1}, value ? 1.0 : 0.0, torch::kFloat64).to(control)};
    broadcast_tensors(*pg, flag, 0, kRankWait);
    return flag[0].cpu().item<double>() > 0.5;
  }

  /// Mean loss over the ranks; stop when any rank asks to.
  void sync(double& loss, bool& stop) {
    std::vector<torch::Tensor> v{torch::tensor({loss, stop ? 1.0 : 0.0}, torch::kFloat64).to(control)};
    allreduce_mean(*pg, v, 1 << 20, kRankWait);
    const torch::Tensor r = v[0].cpu();
    loss = r[0].item<double>();
    stop = r[1].item<double>() > 0.0;
  }
};

/// Joins the process group when this process is one rank of a job.
Ranks join_ranks(const TrainingSettings& t);
/// Bytes a full-gradient all-reduce of the trained parameters would send per step.
int64_t full_gradient_bytes(const LowRankOptimizer& opt);

}  // namespace gradlora::app
