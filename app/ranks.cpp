// The trainer's data-parallel plumbing.
#include "ranks.h"

#include "run_loop.h"

#include <fmt/format.h>

namespace gradlora::app {

// ------------------------------------------------------------ data-parallel

/// Joins the process group when this process is one rank of a job.
Ranks join_ranks(const TrainingSettings& t) {
  Ranks d;
  if (!launched_distributed()) return d;
  const torch::Device device = training_device(t);
  d.pg = process_group_from_env(kRankWait, device);
  if (d.pg->getBackendName() == "nccl") d.control = device;
  d.rank = d.pg->getRank();
  d.world = d.pg->getSize();
  if (t.batch % d.world != 0) {
    throw SettingsError(
        fmt::format("training.batch: {} windows cannot be split evenly over {} ranks (--nproc); use "
                    "a multiple of {}",
                    t.batch, d.world, d.world));
  }
  return d;
}

/// Bytes a data-parallel run would all-reduce per step if it averaged the full
/// gradient of every trainable parameter (what DDP does).
int64_t full_gradient_bytes(const LowRankOptimizer& opt) {
  int64_t b = 0;
  for (const auto& p : opt.report().params) {
    if (p.trainable > 0) b += p.adamw_state_bytes / 2;  // AdamW holds 2 tensors of its size
  }
  return b;
}

}  // namespace gradlora::app
