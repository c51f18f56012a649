#pragma once
/// \file distributed.h
/// Data-parallel training on LibTorch's c10d process groups (Gloo on CPU),
/// all-reducing only the projected low-rank gradients.
///
/// DDP averages the full gradients dL/dP over the ranks: n·m numbers per
/// matrix. Every projection of gradlora is linear in G and identical on every
/// rank (same factors, same seeds), so averaging the projected gradients
/// (gA, gB: r·(n+m) numbers for `lora`/`random`; row/column block sums for
/// `additive`) gives exactly the factor gradients of the averaged G. Only
/// `full` parameters still send their whole gradient. `galore` with
/// `projector: randomized` also averages its low-rank sketches of G at each
/// refresh. See docs/data-parallel.md.
///
///     auto pg = gradlora::process_group_from_env();           // or launch_local(...)
///     gradlora::LowRankOptimizer opt(model->named_parameters(), cfg);
///     auto dp = gradlora::make_data_parallel(opt, pg);          // checks, broadcasts, installs
///     ... loss on this rank's shard (a mean over its examples); loss.backward(); opt.step();

#include <gradlora/optimizer.h>

#include <torch/types.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace gradlora {

/// Thrown when the ranks of a process group disagree (config, parameters) or
/// do not answer within the timeout. Raised on every rank that takes part.
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Options of DataParallel.
struct DataParallelOptions {
  /// Upper bound on the size of one all-reduce call. Gradients are packed, in
  /// model order, into flat buckets of at most this many bytes (one tensor
  /// larger than this gets a bucket of its own).
  int64_t bucket_bytes = 25 * 1024 * 1024;
  /// How long construction waits for the other ranks (config check, broadcast)
  /// and each step waits for its all-reduce before throwing DistributedError.
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};
  /// Broadcast parameters and factors from rank 0 at construction.
  bool broadcast_from_rank0 = true;
};

/// Communication counters of one DataParallel.
struct CommStats {
  int64_t steps = 0;                  ///< reducer calls so far
  int64_t last_step_bytes = 0;        ///< bytes all-reduced by the last step (payload per rank)
  int64_t last_step_collectives = 0;  ///< all-reduce calls issued by the last step
  int64_t total_bytes = 0;            ///< bytes all-reduced over all steps
  double last_step_seconds = 0.0;     ///< wall time of the last reduction (pack, all-reduce, unpack)
  double total_seconds = 0.0;         ///< wall time of all reductions
  /// Averages a projector asks for inside project() (galore's randomized refresh:
  /// its sketches of the gradient), over all steps: all-reduce calls and bytes
  /// (payload per rank). Not part of the per-step figures above.
  int64_t projector_collectives = 0;
  int64_t projector_bytes = 0;
};

/// Ties a LowRankOptimizer to a process group. Construction (collective: call
/// it on every rank in the same order)
///  1. all-gathers a description of the config and of the selected parameters
///     (names, shapes, dtypes, methods, ranks) and throws DistributedError on
///     every rank, naming the differing keys and ranks, when they disagree;
///  2. broadcasts every parameter and every persistent projector tensor
///     (factors, P0) from rank 0, so all ranks start identical;
///  3. installs a gradient reducer on the optimizer: each step() then
///     all-reduces (sum, then divide by the world size — Gloo in LibTorch 1.13
///     has no ReduceOp::AVG) the projected gradients, bucketed into few calls.
/// Throws ConfigError (on every rank) for a parameter whose method cannot train
/// data-parallel (MethodInfo::data_parallel_refusal), e.g. `galore` with
/// `projector: svd`: the SVD of each rank's own gradient would differ between
/// ranks. `galore` with `projector: randomized` averages its sketches of the
/// gradient over the ranks at each refresh (CommStats::projector_bytes).
/// Unused parameters (as DDP's find_unused_parameters): every step reduces the
/// same layout on every rank, whichever gradients arrived — every non-frozen
/// parameter in model order, a rank without a gradient for one contributing the
/// projection of a zero gradient — plus one presence flag per parameter in the
/// last bucket. A parameter used on some ranks steps on the average with those
/// zeros; one used on no rank is skipped (no step, no state change), as in a
/// single process. The optimizer must outlive this object; destroying it removes
/// the reducer.
class DataParallel {
 public:
  DataParallel(LowRankOptimizer& optimizer, c10::intrusive_ptr<c10d::ProcessGroup> pg,
               DataParallelOptions options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  /// This process's rank and the number of ranks.
  int rank() const;
  int world_size() const;
  /// Communication counters (bytes, calls, time).
  const CommStats& stats() const { return *stats_; }
  /// Bytes every step all-reduces (whichever parameters have a gradient):
  /// report().total_allreduce_bytes of the optimizer plus the presence flags
  /// (one element per non-frozen parameter, in the dtype of the last gradient).
  int64_t expected_step_bytes() const;
  /// The presence flags' share of expected_step_bytes().
  int64_t flag_bytes() const { return flag_bytes_; }
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const { return pg_; }

 private:
  LowRankOptimizer& opt_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  DataParallelOptions options_;
  std::shared_ptr<CommStats> stats_;
  int64_t flag_bytes_ = 0;
};

/// Builds a DataParallel (see there) on the heap.
std::unique_ptr<DataParallel> make_data_parallel(LowRankOptimizer& optimizer, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 DataParallelOptions options = {});

/// All-reduces `tensors` in place and divides them by the world size: packs
/// them (per dtype, in order) into flat buckets of at most `bucket_bytes`,
/// issues one SUM all-reduce per bucket, waits (up to `timeout`), and copies
/// the averages back. Returns the number of all-reduce calls. Collective.
int64_t allreduce_mean(c10d::ProcessGroup& pg, std::vector<torch::Tensor>& tensors, int64_t bucket_bytes,
                       std::chrono::milliseconds timeout);

/// Broadcasts `tensors` in place from `root`, bucketed like allreduce_mean.
/// Undefined tensors are skipped (they must be undefined on every rank). Collective.
void broadcast_tensors(c10d::ProcessGroup& pg, std::vector<torch::Tensor>& tensors, int root,
                       std::chrono::milliseconds timeout);

/// A textual description of what must agree across ranks: one `key = value`
/// line per config field and per selected parameter (name, shape, dtype,
/// method, rank). DataParallel compares these between ranks.
std::string distributed_fingerprint(const LowRankOptimizer& optimizer);

/// Creates a Gloo process group.
///  * `store_path` non-empty: rendezvous through a c10d::FileStore at that path
///    (shared file system or one machine).
///  * otherwise: a c10d::TCPStore at `master_addr:master_port`, served by rank 0.
/// The Gloo device binds to the interface named by $GLOO_SOCKET_IFNAME when set,
/// to 127.0.0.1 when `master_addr` is a loopback address or a FileStore is
/// used, and to this host's address otherwise. `timeout` bounds the
/// rendezvous and every collective.
c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(
    int rank, int world_size, const std::string& store_path, const std::string& master_addr = "127.0.0.1",
    int master_port = 29500, std::chrono::milliseconds timeout = std::chrono::seconds(60));

/// True when this build of gradlora has the NCCL backend: LibTorch was built with
/// CUDA and NCCL (detected when gradlora is configured; Debian's CPU build has not).
bool nccl_available();

/// The same rendezvous as make_gloo_process_group, with c10d's NCCL backend (one
/// CUDA device per rank: LOCAL_RANK's, else rank modulo the device count). Throws
/// DistributedError when nccl_available() is false.
c10::intrusive_ptr<c10d::ProcessGroup> make_nccl_process_group(
    int rank, int world_size, const std::string& store_path, const std::string& master_addr = "127.0.0.1",
    int master_port = 29500, std::chrono::milliseconds timeout = std::chrono::seconds(60));

/// Creates a process group from the environment, as torchrun sets it:
/// RANK, WORLD_SIZE, and MASTER_ADDR + MASTER_PORT (TCPStore), or
/// GRADLORA_STORE_FILE (FileStore; set by launch_local). The backend follows
/// the device the tensors live on: NCCL for CUDA where nccl_available(), Gloo
/// otherwise (Gloo also carries CUDA tensors, through the host). Throws
/// DistributedError naming the variable when one is missing or invalid.
c10::intrusive_ptr<c10d::ProcessGroup> process_group_from_env(
    std::chrono::milliseconds timeout = std::chrono::seconds(60), torch::Device device = torch::kCPU);

/// True when RANK and WORLD_SIZE are set (this process is one rank of a job).
bool launched_distributed();

/// Options of launch_local.
struct LaunchOptions {
  /// Kill the remaining ranks (SIGTERM, then SIGKILL after `grace`) as soon as
  /// one rank fails, so that nobody waits for a dead peer.
  std::chrono::milliseconds grace{std::chrono::seconds(5)};
  /// Whole-job limit (0 = none): ranks still running after it are killed and
  /// launch_local returns 124.
  std::chrono::milliseconds job_timeout{0};
};

/// Runs `fn(rank, world_size)` in `nproc` forked processes on this machine and
/// waits for them. Each child sees RANK, WORLD_SIZE, LOCAL_RANK and
/// GRADLORA_STORE_FILE (a FileStore in a fresh temporary directory), so
/// process_group_from_env() inside `fn` joins the job. A child's exit status is
/// fn's return value (an escaping exception is logged and gives 1).
/// Returns 0 when every rank returned 0; otherwise the status of the first rank
/// that failed (128 + signal number for a killed rank) and the others are
/// terminated. Call it early, before the parent starts thread pools (OpenMP
/// is not fork-safe): the children should do all of the torch work.
int launch_local(int nproc, const std::function<int(int rank, int world_size)>& fn, LaunchOptions options = {});

}  // namespace gradlora
