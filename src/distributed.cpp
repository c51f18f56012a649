// Data-parallel training on c10d (Gloo, NCCL): see include/gradlora/distributed.h and docs/data-parallel.md.

// Debian's LibTorch 1.13 is built with Gloo (the symbols are in libtorch_cpu) but its
// headers hide ProcessGroupGloo behind this macro, which only the torch build defines.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif

#include <gradlora/distributed.h>
#include <gradlora/method.h>

#define GRADLORA_COMPAT_C10D
#include "torch_compat.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef GRADLORA_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <thread>

namespace gradlora {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_of(std::chrono::milliseconds ms) { return static_cast<double>(ms.count()) / 1000.0; }

/// Waits for one collective; turns a timeout or a peer failure into DistributedError.
void wait_work(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout, const std::string& what,
               int rank) {
  try {
    work->wait(timeout);
  } catch (const std::exception& e) {
    throw DistributedError(fmt::format("gradlora: rank {}: {} failed or did not complete within {:g} s: {}", rank, what,
                                       seconds_of(timeout), e.what()));
  }
}

/// Consecutive tensors of one dtype, packed into at most `bucket_bytes` (a tensor larger
/// than that gets a bucket of its own).
struct Bucket {
  std::vector<size_t> members;
  torch::Tensor flat;  // the packed tensor (or the single member itself when contiguous)
  bool direct = false;
};

std::vector<Bucket> make_buckets(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
  std::vector<Bucket> buckets;
  int64_t bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const torch::Tensor& t = tensors[i];
    if (!t.defined()) continue;
    const int64_t b = t.numel() * static_cast<int64_t>(t.element_size());
    const bool fits = !buckets.empty() && tensors[buckets.back().members.front()].scalar_type() == t.scalar_type() &&
                      bytes + b <= bucket_bytes;
    if (!fits) {
      buckets.emplace_back();
      bytes = 0;
    }
    buckets.back().members.push_back(i);
    bytes += b;
  }
  for (auto& bk : buckets) {
    const torch::Tensor& first = tensors[bk.members.front()];
    if (bk.members.size() == 1 && first.is_contiguous()) {
      bk.flat = first;
      bk.direct = true;
    } else {
      std::vector<torch::Tensor> parts;
      parts.reserve(bk.members.size());
      for (size_t i : bk.members) parts.push_back(tensors[i].reshape({-1}));
      bk.flat = torch::cat(parts);
    }
  }
  return buckets;
}

void unpack(const Bucket& bk, std::vector<torch::Tensor>& tensors) {
  if (bk.direct) return;
  int64_t offset = 0;
  for (size_t i : bk.members) {
    torch::Tensor& t = tensors[i];
    const int64_t n = t.numel();
    t.copy_(bk.flat.narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

std::string fmt_double(double d) { return fmt::format("{:.17g}", d); }
template <typename T>
std::string fmt_opt(const std::optional<T>& o) {
  return o ? fmt::format("{}", *o) : std::string("(unset)");
}
std::string fmt_opt(const std::optional<double>& o) { return o ? fmt_double(*o) : std::string("(unset)"); }

/// Ordered `key = value` lines.
std::vector<std::pair<std::string, std::string>> parse_lines(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    const size_t eq = line.find(" = ");
    if (eq != std::string::npos) out.emplace_back(line.substr(0, eq), line.substr(eq + 3));
    pos = end + 1;
  }
  return out;
}

/// All-gathers one string per rank (lengths first, then the padded bytes). The tensors
/// travel on `device` (NCCL carries CUDA tensors only) and are read back on the CPU.
std::vector<std::string> allgather_strings(c10d::ProcessGroup& pg, const std::string& mine,
                                           std::chrono::milliseconds timeout, torch::Device device) {
  const int world = pg.getSize();
  const int rank = pg.getRank();
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(device);
  std::vector<torch::Tensor> in{torch::tensor({static_cast<int64_t>(mine.size())}, torch::kLong).to(device)};
  std::vector<std::vector<torch::Tensor>> out(1);
  for (int r = 0; r < world; ++r) out[0].push_back(torch::empty({1}, longs));
  wait_work(pg.allgather(out, in), timeout, "the config check (all-gather of the config fingerprint)", rank);
  int64_t longest = 0;
  std::vector<int64_t> lengths;
  for (const auto& t : out[0]) {
    lengths.push_back(t.cpu().item<int64_t>());
    longest = std::max(longest, lengths.back());
  }
  torch::Tensor mine_t = torch::zeros({std::max<int64_t>(longest, 1)}, torch::kByte);
  std::memcpy(mine_t.data_ptr<uint8_t>(), mine.data(), mine.size());
  std::vector<torch::Tensor> in2{mine_t.to(device)};
  std::vector<std::vector<torch::Tensor>> out2(1);
  for (int r = 0; r < world; ++r) out2[0].push_back(torch::empty_like(in2[0]));
  wait_work(pg.allgather(out2, in2), timeout, "the config check (all-gather of the config fingerprint)", rank);
  std::vector<std::string> texts;
  for (int r = 0; r < world; ++r) {
    const torch::Tensor bytes = out2[0][r].cpu();
    texts.emplace_back(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(lengths[r]));
  }
  return texts;
}

/// Where the small control tensors of a collective must live: NCCL takes CUDA tensors only
/// (the device of the optimizer's first parameter), Gloo takes CPU tensors.
torch::Device control_device(const c10d::ProcessGroup& pg, const LowRankOptimizer& opt) {
  if (pg.getBackendName() != "nccl") return torch::kCPU;
  for (const auto& g : opt.param_groups()) {
    for (const auto& p : g.params()) {
      if (p.is_cuda()) return p.device();
    }
  }
  throw DistributedError("gradlora: an NCCL process group needs the optimizer's parameters on a CUDA device");
}

/// Empty when all ranks agree; otherwise one line per differing key.
std::vector<std::string> fingerprint_differences(const std::vector<std::string>& texts) {
  const size_t world = texts.size();
  std::vector<std::map<std::string, std::string>> maps(world);
  std::vector<std::string> order;
  std::map<std::string, bool> seen;
  for (size_t r = 0; r < world; ++r) {
    for (auto& kv : parse_lines(texts[r])) {
      if (!seen[kv.first]) {
        seen[kv.first] = true;
        order.push_back(kv.first);
      }
      maps[r][kv.first] = kv.second;
    }
  }
  std::vector<std::string> diffs;
  for (const auto& key : order) {
    std::vector<std::string> values;
    bool differ = false;
    for (size_t r = 0; r < world; ++r) {
      auto it = maps[r].find(key);
      values.push_back(it == maps[r].end() ? std::string("(absent)") : it->second);
      if (values.back() != values.front()) differ = true;
    }
    if (!differ) continue;
    std::vector<std::string> per_rank;
    for (size_t r = 0; r < world; ++r) per_rank.push_back(fmt::format("rank {}: {}", r, values[r]));
    diffs.push_back(fmt::format("'{}' ({})", key, fmt::join(per_rank, ", ")));
  }
  return diffs;
}

int env_int(const char* name, bool required, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    if (required) throw DistributedError(fmt::format("gradlora: environment variable {} is not set", name));
    return fallback;
  }
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno != 0 || *end != '\0' || x < 0 || x > 1000000) {
    throw DistributedError(
        fmt::format("gradlora: environment variable {}='{}' is not a valid non-negative integer", name, v));
  }
  return static_cast<int>(x);
}

bool is_loopback(const std::string& addr) { return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0; }

}  // namespace

// ---------------------------------------------------------- collectives

int64_t allreduce_mean(c10d::ProcessGroup& pg, std::vector<torch::Tensor>& tensors, int64_t bucket_bytes,
                       std::chrono::milliseconds timeout) {
  torch::NoGradGuard no_grad;
  std::vector<Bucket> buckets = make_buckets(tensors, bucket_bytes);
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;  // Gloo in LibTorch 1.13 rejects AVG: sum, then divide.
  for (auto& bk : buckets) {
    std::vector<torch::Tensor> one{bk.flat};
    works.push_back(pg.allreduce(one, opts));
  }
  const double world = static_cast<double>(pg.getSize());
  for (size_t i = 0; i < buckets.size(); ++i) {
    wait_work(works[i], timeout, fmt::format("all-reduce of gradient bucket {} of {}", i + 1, buckets.size()),
              pg.getRank());
    buckets[i].flat.div_(world);
    unpack(buckets[i], tensors);
  }
  return static_cast<int64_t>(buckets.size());
}

void broadcast_tensors(c10d::ProcessGroup& pg, std::vector<torch::Tensor>& tensors, int root,
                       std::chrono::milliseconds timeout) {
  torch::NoGradGuard no_grad;
  std::vector<Bucket> buckets = make_buckets(tensors, int64_t{64} << 20);
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (auto& bk : buckets) {
    std::vector<torch::Tensor> one{bk.flat};
    works.push_back(pg.broadcast(one, opts));
  }
  for (size_t i = 0; i < buckets.size(); ++i) {
    wait_work(works[i], timeout, fmt::format("broadcast from rank {}", root), pg.getRank());
    unpack(buckets[i], tensors);
  }
}

// ---------------------------------------------------------- fingerprint

std::string distributed_fingerprint(const LowRankOptimizer& optimizer) {
  const Config& c = optimizer.config();
  std::string s;
  auto line = [&s](const std::string& key, const std::string& value) { s += key + " = " + value + "\n"; };
  line("seed", std::to_string(c.seed));
  const InnerConfig& o = c.optimizer;
  line("optimizer.type", to_string(o.type));
  line("optimizer.lr", fmt_double(o.lr));
  line("optimizer.betas", fmt::format("[{}, {}]", fmt_double(o.betas[0]), fmt_double(o.betas[1])));
  line("optimizer.eps", fmt_double(o.eps));
  line("optimizer.weight_decay", fmt_opt(o.weight_decay));
  line("optimizer.amsgrad", o.amsgrad ? "true" : "false");
  line("optimizer.momentum", fmt_double(o.momentum));
  line("optimizer.dampening", fmt_double(o.dampening));
  line("optimizer.nesterov", o.nesterov ? "true" : "false");
  line("targets.size", std::to_string(c.targets.size()));
  for (size_t i = 0; i < c.targets.size(); ++i) {
    const Target& t = c.targets[i];
    const std::string p = fmt::format("targets[{}].", i);
    for (const auto& [key, value] : describe_target(t)) line(p + key, value);
  }
  line("default", to_string(c.default_method));
  line("allow_unmatched_targets", c.allow_unmatched_targets ? "true" : "false");
  line("on_nonfinite", to_string(c.on_nonfinite));
  line("fuse_into_backward", c.fuse_into_backward ? "true" : "false");
  line("max_grad_norm", fmt_opt(c.max_grad_norm));
  // The selection: what each parameter is, and what it sends.
  for (const auto& p : optimizer.report().params) {
    line(fmt::format("parameter '{}'", p.name),
         fmt::format("shape [{}], method {}, rank {}, all-reduce {} B", fmt::join(p.shape, ", "), to_string(p.method),
                     p.rank, p.allreduce_bytes));
  }
  // The dtypes (from the optimizer's own parameter list, in group order).
  std::vector<std::string> dtypes;
  for (const auto& g : optimizer.param_groups()) {
    for (const auto& t : g.params()) dtypes.push_back(std::string(c10::toString(t.scalar_type())));
  }
  line("parameter dtypes", fmt::format("{}", fmt::join(dtypes, ", ")));
  return s;
}

// ---------------------------------------------------------- DataParallel

DataParallel::DataParallel(LowRankOptimizer& optimizer, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                           DataParallelOptions options)
    : opt_(optimizer), pg_(std::move(pg)), options_(options), stats_(std::make_shared<CommStats>()) {
  TORCH_CHECK(pg_, "gradlora::DataParallel: the process group is null");
  if (options_.bucket_bytes <= 0) {
    throw ConfigError(fmt::format("DataParallelOptions::bucket_bytes must be positive, got {}", options_.bucket_bytes));
  }
  if (options_.timeout.count() <= 0) {
    throw ConfigError(
        fmt::format("DataParallelOptions::timeout must be positive, got {} ms", options_.timeout.count()));
  }
  const int rank = pg_->getRank();
  const int world = pg_->getSize();

  // 1. Every rank must run the same config on the same parameters.
  const std::vector<std::string> texts =
      allgather_strings(*pg_, distributed_fingerprint(opt_), options_.timeout, control_device(*pg_, opt_));
  const std::vector<std::string> diffs = fingerprint_differences(texts);
  if (!diffs.empty()) {
    const size_t shown = std::min<size_t>(diffs.size(), 10);
    std::vector<std::string> head(diffs.begin(), diffs.begin() + static_cast<std::ptrdiff_t>(shown));
    throw DistributedError(fmt::format(
        "gradlora: rank {} of {}: the ranks do not run the same optimizer config ({} difference(s){}):\n  {}", rank,
        world, diffs.size(), shown < diffs.size() ? fmt::format(", first {}", shown) : std::string(),
        fmt::join(head, "\n  ")));
  }

  // Some methods cannot average their projected gradients (after the check above, every
  // rank throws here alike): each method says so in its registry entry.
  for (const auto& name : opt_.names()) {
    const Method method = opt_.method_of(name);
    const MethodInfo& info = method_info(method);
    if (!info.data_parallel_refusal) continue;
    const std::string why = info.data_parallel_refusal(opt_.projector(name).context().target);
    if (!why.empty()) {
      throw ConfigError(
          fmt::format("gradlora: DataParallel: parameter '{}' uses method '{}': {}", name, info.name, why));
    }
  }

  // 2. Start identical: parameters, then every persistent tensor of every projector and inner rule.
  if (options_.broadcast_from_rank0 && world > 1) {
    std::vector<torch::Tensor> ts;
    for (const auto& g : opt_.param_groups()) {
      for (const auto& p : g.params()) ts.push_back(p);
    }
    for (const auto& name : opt_.names()) {
      for (const auto& kv : opt_.state_tensors(name)) {
        if (kv.second.defined()) ts.push_back(kv.second);
      }
    }
    broadcast_tensors(*pg_, ts, 0, options_.timeout);
  }

  // The presence flags step() appends: one per non-frozen parameter, in the dtype of the
  // last projected gradient (the factors' dtype, or the parameter's for `full`).
  int64_t stepped = 0, flag_size = 0;
  for (const auto& name : opt_.names()) {
    if (opt_.method_of(name) == Method::frozen) continue;
    ++stepped;
    flag_size = static_cast<int64_t>(opt_.projector(name).inner_params().back().element_size());
  }
  flag_bytes_ = stepped * flag_size;

  // 3. The reducer: average the projected gradients and the presence flags.
  auto group = pg_;
  auto stats = stats_;
  const int64_t bucket_bytes = options_.bucket_bytes;
  const auto timeout = options_.timeout;
  opt_.set_gradient_reducer([group, stats, bucket_bytes, timeout](std::vector<torch::Tensor>& grads) {
    const auto t0 = Clock::now();
    int64_t bytes = 0;
    for (const auto& g : grads) bytes += g.numel() * static_cast<int64_t>(g.element_size());
    const int64_t calls = allreduce_mean(*group, grads, bucket_bytes, timeout);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    ++stats->steps;
    stats->last_step_bytes = bytes;
    stats->last_step_collectives = calls;
    stats->total_bytes += bytes;
    stats->last_step_seconds = secs;
    stats->total_seconds += secs;
  });
  // 4. Averages inside a projection (galore's randomized refresh: the sketch of the
  // gradient), one all-reduce each, counted apart from the per-step reduction.
  auto collective = [group, stats, timeout](torch::Tensor& t) {
    std::vector<torch::Tensor> one{t};
    stats->projector_collectives += allreduce_mean(*group, one, std::numeric_limits<int64_t>::max(), timeout);
    stats->projector_bytes += t.numel() * static_cast<int64_t>(t.element_size());
  };
  for (const auto& name : opt_.names()) {
    if (opt_.method_of(name) != Method::frozen) opt_.projector(name).set_collective(collective);
  }
  spdlog::debug("gradlora: rank {} of {} joined; {} B all-reduced per step", rank, world, expected_step_bytes());
}

DataParallel::~DataParallel() {
  opt_.set_gradient_reducer(nullptr);
  for (const auto& name : opt_.names()) {
    if (opt_.method_of(name) != Method::frozen) opt_.projector(name).set_collective(nullptr);
  }
}

int DataParallel::rank() const { return pg_->getRank(); }
int DataParallel::world_size() const { return pg_->getSize(); }
int64_t DataParallel::expected_step_bytes() const { return opt_.report().total_allreduce_bytes + flag_bytes_; }

std::unique_ptr<DataParallel> make_data_parallel(LowRankOptimizer& optimizer, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 DataParallelOptions options) {
  return std::make_unique<DataParallel>(optimizer, std::move(pg), options);
}

// ---------------------------------------------------------- process groups

namespace {

c10::intrusive_ptr<c10d::Store> make_store(int rank, int world_size, const std::string& store_path,
                                           const std::string& master_addr, int master_port,
                                           std::chrono::milliseconds timeout) {
  if (world_size < 1) throw ConfigError(fmt::format("gradlora: world size must be >= 1, got {}", world_size));
  if (rank < 0 || rank >= world_size) {
    throw ConfigError(fmt::format("gradlora: rank must be in [0, {}), got {}", world_size, rank));
  }
  c10::intrusive_ptr<c10d::Store> store;
  if (!store_path.empty()) {
    store = c10::make_intrusive<c10d::FileStore>(store_path, world_size);
  } else {
    if (master_port <= 0 || master_port > 65535) {
      throw ConfigError(fmt::format("gradlora: MASTER_PORT must be in 1..65535, got {}", master_port));
    }
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(master_port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<size_t>(world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    compat::use_plain_sockets(so);
    try {
      store = c10::make_intrusive<c10d::TCPStore>(master_addr, so);
    } catch (const std::exception& e) {
      throw DistributedError(fmt::format("gradlora: rank {}: cannot reach the TCPStore at {}:{} within {:g} s: {}",
                                         rank, master_addr, master_port, seconds_of(timeout), e.what()));
    }
  }
  store->setTimeout(timeout);
  return store;
}

}  // namespace

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(int rank, int world_size, const std::string& store_path,
                                                               const std::string& master_addr, int master_port,
                                                               std::chrono::milliseconds timeout) {
  auto store = make_store(rank, world_size, store_path, master_addr, master_port, timeout);
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname && *ifname) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (!store_path.empty() || is_loopback(master_addr)) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  opts->threads = 2;
  try {
    return compat::as_process_group(c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, opts), store,
                                    rank, world_size, "gloo");
  } catch (const std::exception& e) {
    throw DistributedError(fmt::format("gradlora: rank {} of {}: Gloo rendezvous failed within {:g} s: {}", rank,
                                       world_size, seconds_of(timeout), e.what()));
  }
}

bool nccl_available() {
#ifdef GRADLORA_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

c10::intrusive_ptr<c10d::ProcessGroup> make_nccl_process_group(int rank, int world_size, const std::string& store_path,
                                                               const std::string& master_addr, int master_port,
                                                               std::chrono::milliseconds timeout) {
#ifdef GRADLORA_HAVE_NCCL
  auto store = make_store(rank, world_size, store_path, master_addr, master_port, timeout);
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  try {
    return compat::as_process_group(c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, opts), store,
                                    rank, world_size, "nccl");
  } catch (const std::exception& e) {
    throw DistributedError(
        fmt::format("gradlora: rank {} of {}: NCCL process group failed: {}", rank, world_size, e.what()));
  }
#else
  (void)store_path, (void)master_addr, (void)master_port, (void)timeout;
  throw DistributedError(
      fmt::format("gradlora: rank {} of {}: this build has no NCCL backend (LibTorch without CUDA/NCCL); use Gloo",
                  rank, world_size));
#endif
}

bool launched_distributed() { return std::getenv("RANK") && std::getenv("WORLD_SIZE"); }

c10::intrusive_ptr<c10d::ProcessGroup> process_group_from_env(std::chrono::milliseconds timeout, torch::Device device) {
  const bool nccl = device.is_cuda() && nccl_available();
  auto make = nccl ? make_nccl_process_group : make_gloo_process_group;
  const int world = env_int("WORLD_SIZE", true, 1);
  const int rank = env_int("RANK", true, 0);
  if (world < 1 || rank >= world) {
    throw DistributedError(fmt::format("gradlora: RANK={} does not fit WORLD_SIZE={}", rank, world));
  }
  const char* file = std::getenv("GRADLORA_STORE_FILE");
  if (file && *file) return make(rank, world, file, "127.0.0.1", 0, timeout);
  const char* addr = std::getenv("MASTER_ADDR");
  if (!addr || !*addr) {
    throw DistributedError("gradlora: environment variable MASTER_ADDR is not set (nor GRADLORA_STORE_FILE)");
  }
  const int port = env_int("MASTER_PORT", true, 0);
  return make(rank, world, "", addr, port, timeout);
}

// ---------------------------------------------------------- launcher

int launch_local(int nproc, const std::function<int(int rank, int world_size)>& fn, LaunchOptions options) {
  if (nproc < 1) throw ConfigError(fmt::format("gradlora: --nproc must be >= 1, got {}", nproc));
  namespace fs = std::filesystem;
  std::string tmpl = (fs::temp_directory_path() / "gradlora-launch-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) {
    throw std::runtime_error(fmt::format("gradlora: cannot create a temporary directory: {}", std::strerror(errno)));
  }
  const fs::path dir(tmpl);
  const std::string store = (dir / "store").string();
  std::fflush(nullptr);

  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      const int err = errno;
      for (pid_t p : pids) kill(p, SIGKILL);
      for (pid_t p : pids) waitpid(p, nullptr, 0);
      fs::remove_all(dir);
      throw std::runtime_error(fmt::format("gradlora: fork of rank {} failed: {}", r, std::strerror(err)));
    }
    if (pid == 0) {
#ifdef __linux__
      prctl(PR_SET_PDEATHSIG, SIGTERM);  // no orphaned ranks when the launcher dies
#endif
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("GRADLORA_STORE_FILE", store.c_str(), 1);
      int code = 1;
      try {
        code = fn(r, nproc);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "gradlora: rank %d failed: %s\n", r, e.what());
        code = 1;
      } catch (...) {
        std::fprintf(stderr, "gradlora: rank %d failed with an unknown exception\n", r);
        code = 1;
      }
      std::fflush(nullptr);
      if (code != 0 && (code & 0xff) == 0) code = 1;
      _exit(code & 0xff);
    }
    pids.push_back(pid);
  }

  const auto start = Clock::now();
  std::vector<bool> done(pids.size(), false);
  size_t remaining = pids.size();
  int result = 0;
  bool killing = false;
  Clock::time_point kill_deadline{};
  while (remaining > 0) {
    bool reaped = false;
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      const pid_t w = waitpid(pids[i], &status, WNOHANG);
      if (w == 0) continue;
      done[i] = true;
      --remaining;
      reaped = true;
      int code = 0;
      if (w < 0) {
        code = 1;
      } else if (WIFEXITED(status)) {
        code = WEXITSTATUS(status);
      } else if (WIFSIGNALED(status)) {
        code = 128 + WTERMSIG(status);
      }
      if (code != 0 && result == 0 && !killing) {
        result = code;
        if (code == 130) {  // the convention for a run stopped by Ctrl-C, not a failure
          spdlog::warn("gradlora: rank {} was interrupted (status 130); stopping the other ranks", i);
        } else {
          spdlog::error("gradlora: rank {} exited with status {}; stopping the other ranks", i, code);
        }
      }
    }
    const auto now = Clock::now();
    if (!killing && options.job_timeout.count() > 0 && now - start > options.job_timeout && remaining > 0) {
      spdlog::error("gradlora: job exceeded {:g} s; stopping the ranks", seconds_of(options.job_timeout));
      result = 124;
    }
    if (!killing && result != 0 && remaining > 0) {
      killing = true;
      kill_deadline = now + options.grace;
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) kill(pids[i], SIGTERM);
      }
    } else if (killing && now > kill_deadline) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) kill(pids[i], SIGKILL);
      }
      kill_deadline = now + std::chrono::hours(1);
    }
    if (!reaped && remaining > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  return result;
}

}  // namespace gradlora
