#include <gradlora/maths.h>
#include <gradlora/method.h>
#include <gradlora/optimizer.h>

#include "host_memory.h"
#include "optimizer_entry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_map>

namespace gradlora {

// ------------------------------------------------------------ options

LowRankOptions::LowRankOptions(double lr) : lr_(lr) {}
double LowRankOptions::get_lr() const { return lr(); }
void LowRankOptions::set_lr(const double lr) { this->lr(lr); }
void LowRankOptions::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue v;
  archive.read("lr", v);
  lr_ = v.toDouble();
}
void LowRankOptions::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("lr", c10::IValue(lr_));
}

// -------------------------------------------------------------- entry

namespace {

class FusedProjectHook final : public torch::autograd::FunctionPreHook {
 public:
  explicit FusedProjectHook(std::shared_ptr<FusedLink> link) : link_(std::move(link)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    auto* e = link_->entry;
    if (e == nullptr || grads.empty() || !grads[0].defined()) return grads;
    torch::NoGradGuard guard;
    // Projection is linear: accumulating projected micro-batch gradients equals
    // projecting the accumulated gradient.
    const bool accumulate = e->accumulating();
    std::vector<torch::Tensor> prev;
    if (accumulate) {
      for (const auto& t : e->projector->inner_params()) prev.push_back(t.grad());
    } else {
      e->projector->discard();  // whatever an earlier, since zeroed, backward prepared
    }
    e->backwards = accumulate ? e->backwards + 1 : 1;
    if (link_->norms) e->grad_norm = grads[0].norm(2);
    e->projector->project(grads[0]);
    if (link_->diagnostics) {
      // Of a single gradient only: the share of a sum of micro-batches is not known from their projections.
      e->energy = accumulate ? torch::Tensor() : e->projector->energy_kept(grads[0].norm(2).square());
    }
    if (accumulate) {
      auto params = e->projector->inner_params();
      for (size_t i = 0; i < params.size(); ++i) {
        if (prev[i].defined()) params[i].mutable_grad().add_(prev[i]);
      }
    }
    if (!accumulate) e->leave_placeholder();  // an untouched placeholder stays: no allocation per micro-batch
    return {torch::Tensor()};  // AccumulateGrad skips an undefined gradient: the full gradient is never stored
  }

 private:
  std::shared_ptr<FusedLink> link_;
};

}  // namespace

namespace {

// The most elements a CPU gradient may have for the host check below (a factor's gradient
// has far fewer; a larger one keeps the library's threads).
constexpr int64_t kHostCheckMax = int64_t{1} << 20;

// True when every element of a contiguous host array is finite: one pass, no allocation.
template <typename T>
bool all_finite(const T* p, int64_t n) {
  bool ok = true;
  for (int64_t k = 0; k < n; ++k) ok &= std::isfinite(p[k]);
  return ok;
}

// Per entry, whether every projected gradient it holds is finite. A small contiguous float
// or double gradient on the CPU (a factor's) is checked in place in one pass:
// torch::isfinite makes several and allocates for each, 3-4 % of a 2048x2048, r = 8 step
// on one thread. Larger ones (full-rank methods) keep the library's threads. Other devices
// reduce their flags on the device, stacked, read back in one synchronisation per device.
// `also` (optional, 1-D, any device) is read back in the same transfer as the flags of its
// device; its values come back as `also_positive` (value > 0), one per element.
std::vector<char> finite_flags(const std::vector<std::vector<torch::Tensor>>& grads_per_entry,
                               const torch::Tensor& also = {}, std::vector<char>* also_positive = nullptr) {
  std::vector<char> finite(grads_per_entry.size(), 1);
  struct PerDevice {
    torch::Device device;
    std::vector<size_t> entries;
    std::vector<torch::Tensor> flags;
  };
  std::vector<PerDevice> by_device;  // one or two devices: a list beats a map
  auto device_slot = [&](const torch::Device& dev) {
    auto it = std::find_if(by_device.begin(), by_device.end(), [&](const PerDevice& d) { return d.device == dev; });
    if (it == by_device.end()) it = by_device.insert(by_device.end(), PerDevice{dev, {}, {}});
    return it;
  };
  for (size_t i = 0; i < grads_per_entry.size(); ++i) {
    for (const auto& g : grads_per_entry[i]) {
      if (!g.defined() || g.numel() == 0) continue;
      if (g.device().is_cpu() && g.is_contiguous() && g.numel() <= kHostCheckMax &&
          (g.scalar_type() == torch::kFloat || g.scalar_type() == torch::kDouble)) {
        bool ok = true;
        AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "finite_flags",
                                   [&] { ok = all_finite(g.data_ptr<scalar_t>(), g.numel()); });
        if (!ok) finite[i] = 0;
        continue;
      }
      auto it = device_slot(g.device());
      it->entries.push_back(i);
      it->flags.push_back(torch::isfinite(g).all());
    }
  }
  if (also.defined()) device_slot(also.device());
  for (const auto& d : by_device) {
    const bool with_also = also.defined() && also.device() == d.device;
    std::vector<torch::Tensor> parts;
    if (!d.flags.empty()) parts.push_back(torch::stack(d.flags));
    if (with_also) parts.push_back(also.gt(0));
    const torch::Tensor flags = (parts.size() == 1 ? parts[0] : torch::cat(parts)).to(torch::kCPU);
    const bool* f = flags.data_ptr<bool>();
    for (size_t k = 0; k < d.entries.size(); ++k) {
      if (!f[k]) finite[d.entries[k]] = 0;
    }
    if (with_also && also_positive) {
      const bool* a = f + d.entries.size();
      also_positive->assign(a, a + also.numel());
    }
  }
  return finite;
}

}  // namespace

// ---------------------------------------------------------- construct

LowRankOptimizer::LowRankOptimizer(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                   Config config)
    : torch::optim::Optimizer(std::vector<torch::optim::OptimizerParamGroup>{},
                              std::make_unique<LowRankOptions>(config.optimizer.lr)),
      config_(std::move(config)) {
  config_.validate();
  const size_t T = config_.targets.size();
  std::vector<int64_t> matches(T, 0);
  std::unordered_map<const void*, std::string> seen;

  // Selection first, so that nothing is built when any parameter is rejected.
  std::vector<std::unique_ptr<Entry>> entries;
  for (const auto& item : named_parameters) {
    auto e = std::make_unique<Entry>();
    e->name = item.key();
    e->param = item.value();
    TORCH_CHECK(e->param.defined(), "parameter '", e->name, "' is undefined");
    auto [it, fresh] = seen.emplace(e->param.unsafeGetTensorImpl(), e->name);
    if (!fresh) {
      throw ConfigError(fmt::format("parameters '{}' and '{}' are the same tensor (tied weights); pass it once",
                                    it->second, e->name));
    }
    for (size_t i = 0; i < T; ++i) {
      if (pattern_matches(config_.targets[i].match, e->name)) {
        e->target_index = static_cast<int64_t>(i);
        ++matches[i];
        break;
      }
    }
    e->method = e->target_index >= 0 ? config_.targets[e->target_index].method : config_.default_method;
    entries.push_back(std::move(e));
  }
  for (size_t i = 0; i < T; ++i) {
    if (matches[i] > 0) continue;
    const std::string msg = fmt::format(
        "config key 'targets[{}].match': pattern '{}' matches no parameter (set "
        "allow_unmatched_targets: true to make this a warning)",
        i, config_.targets[i].match);
    if (!config_.allow_unmatched_targets) throw ConfigError(msg);
    spdlog::warn("gradlora: {}", msg);
  }

  auto target_of = [&](const Entry& e) {
    Target t;
    if (e.target_index >= 0) {
      t = config_.targets[e.target_index];
    } else {
      t.match = "(default)";
      t.method = e.method;
    }
    return t;
  };
  check_state_fits(entries, target_of);

  // Build projectors and inner rules (may throw ConfigError; nothing is registered yet).
  for (auto& e : entries) {
    const Target t = target_of(*e);
    e->projector = make_projector(ProjectorContext{e->name, e->param, t, config_.seed, e->target_index});
    if (!e->projector) continue;  // frozen
    const double lr = t.lr.value_or(config_.optimizer.lr);
    const double wd = t.weight_decay.value_or(config_.optimizer.effective_weight_decay());
    e->inner = std::make_unique<InnerRule>(e->projector->inner_params(), config_.optimizer, lr, wd,
                                           e->projector->inner_rule_decays(), e->projector->inner_lr_factors());
  }

  // One parameter group per target that matched something, then `default`.
  std::vector<std::vector<torch::Tensor>> group_params(T + 1);
  for (auto& e : entries) {
    const size_t g = e->target_index >= 0 ? static_cast<size_t>(e->target_index) : T;
    group_params[g].push_back(e->param);
  }
  std::vector<size_t> group_of_slot(T + 1, 0);
  for (size_t g = 0; g <= T; ++g) {
    if (group_params[g].empty()) continue;
    const double lr = g < T ? config_.targets[g].lr.value_or(config_.optimizer.lr) : config_.optimizer.lr;
    group_of_slot[g] = param_groups_.size();
    add_param_group(torch::optim::OptimizerParamGroup(group_params[g], std::make_unique<LowRankOptions>(lr)));
  }
  for (auto& e : entries) {
    e->group = group_of_slot[e->target_index >= 0 ? static_cast<size_t>(e->target_index) : T];
    index_[e->name] = entries_.size();
    entries_.push_back(std::move(e));
  }
  if (config_.fuse_into_backward) {
    for (auto& e : entries_) {
      if (!e->projector || !e->projector->fusable() || !e->param.requires_grad()) continue;
      e->link = std::make_shared<FusedLink>();
      e->link->entry = e.get();
      e->link->norms = config_.max_grad_norm.has_value();
      e->link->diagnostics = config_.diagnostics;
      e->accumulator = torch::autograd::impl::grad_accumulator(e->param);
      e->accumulator->add_pre_hook(std::make_unique<FusedProjectHook>(e->link));
    }
  }
  build_report();
  if (config_.log_report) spdlog::info("gradlora selection:\n{}", report_.to_string());
}

LowRankOptimizer::~LowRankOptimizer() {
  for (auto& e : entries_) {
    if (!e->link) continue;
    e->link->entry = nullptr;
    e->remove_placeholder();  // a later backward accumulates into .grad as usual
  }
}

// --------------------------------------------------------------- step

torch::Tensor LowRankOptimizer::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode enable(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  if (config_.max_grad_norm) refuse_unclippable_accumulation();
  ++step_count_;
  // Phase 1: project every gradient (no persistent state changes). With a reducer
  // (data parallel) every parameter that steps at all joins, in model order, so that
  // every rank reduces the same layout: one without a gradient here contributes the
  // projection of a zero gradient, and a per-parameter presence flag travels along.
  std::vector<Entry*> active;
  std::vector<char> present;         // per active entry: this process has a gradient for it
  std::vector<torch::Tensor> norms;  // max_grad_norm: ‖G‖ of each gradient this process has
  for (auto& e : entries_) {
    if (!e->projector) continue;
    bool has = true;
    if (e->link) {  // fused: projected during backward()
      const bool accumulated = e->accumulating();
      e->remove_placeholder();
      if (!accumulated) {
        e->projector->discard();
        has = false;
      } else if (config_.max_grad_norm) {
        norms.push_back(e->grad_norm);
      }
    } else {
      const torch::Tensor& g = e->param.grad();
      if (g.defined()) {
        torch::Tensor norm;
        if (config_.max_grad_norm || config_.diagnostics) norm = g.norm(2);
        if (config_.max_grad_norm) norms.push_back(norm);
        e->projector->project(g);
        if (config_.diagnostics) e->energy = e->projector->energy_kept(norm.square());
      } else {
        has = false;
      }
    }
    if (!has) {
      if (!reducer_) continue;
      e->projector->project_zero();
    }
    e->inner->set_lr(param_groups_[e->group].options().get_lr());
    active.push_back(e.get());
    present.push_back(has ? 1 : 0);
  }
  // Phase 1b: gradient clipping. The projections are linear in G, so scaling them
  // equals clipping G first (a `full` parameter's gradient is scaled itself). Under
  // data parallel each rank clips its own gradient, before the ranks average.
  if (config_.max_grad_norm && !norms.empty()) clip_projected(active, norms, *config_.max_grad_norm);
  // Phase 2: data-parallel averaging of the projected gradients, followed by the
  // presence flags (1 where this process has a gradient) in the dtype and on the device
  // of the last gradient, so that they ride in the last bucket. After the reduction a
  // flag is > 0 exactly when some rank had a gradient for the parameter.
  torch::Tensor used_anywhere;
  if (reducer_ && !active.empty()) {
    std::vector<torch::Tensor> grads;
    for (Entry* e : active) {
      for (const auto& t : e->projector->inner_params()) {
        if (!t.grad().defined()) {
          throw std::logic_error(fmt::format(
              "gradlora: parameter '{}' ({}): an inner parameter has no gradient after projection; the data-parallel "
              "layout needs one per inner parameter",
              e->name, to_string(e->method)));
        }
        grads.push_back(t.grad());
      }
    }
    used_anywhere = torch::ones({static_cast<int64_t>(active.size())}, grads.back().options());
    for (size_t i = 0; i < active.size(); ++i) {
      if (!present[i]) used_anywhere.narrow(0, static_cast<int64_t>(i), 1).zero_();  // on the device: no sync
    }
    grads.push_back(used_anywhere);
    reducer_(grads);
  }
  // Phase 3: finite check (all before any change, so `error` leaves everything as it was),
  // then inner step and write-back. The reduced presence flags are read back with the
  // finite flags (one host synchronisation per device, as without a reducer).
  std::vector<std::vector<torch::Tensor>> grads(active.size());
  for (size_t i = 0; i < active.size(); ++i) {
    for (const auto& t : active[i]->projector->inner_params()) grads[i].push_back(t.grad());
  }
  std::vector<char> used(active.size(), 1);
  const std::vector<char> finite = finite_flags(grads, used_anywhere, &used);
  // Drops what project() prepared and, where this process had no gradient, the zeros
  // (or, after the reduction, the averages) this step put into the .grad of the inner
  // parameters: they were undefined before.
  auto drop = [&](size_t i) {
    active[i]->projector->discard();
    if (present[i]) return;
    for (auto t : active[i]->projector->inner_params()) {
      if (t.grad().defined()) t.mutable_grad() = torch::Tensor();
    }
  };
  for (size_t i = 0; i < active.size(); ++i) {
    if (!used[i] || finite[i] || config_.on_nonfinite != OnNonFinite::error) continue;
    for (size_t j = 0; j < active.size(); ++j) drop(j);
    throw std::runtime_error(
        fmt::format("gradlora: non-finite gradient (NaN or Inf) for parameter '{}' at step {} (on_nonfinite: error)",
                    active[i]->name, step_count_));
  }
  for (size_t i = 0; i < active.size(); ++i) {
    Entry& e = *active[i];
    if (!used[i]) {
      drop(i);  // no rank had a gradient: as in a single process, the parameter does not step
      continue;
    }
    if (!finite[i]) {
      drop(i);
      ++skipped_count_;
      spdlog::warn("gradlora: skipped parameter '{}' at step {}: non-finite gradient (NaN or Inf)", e.name,
                   step_count_);
      continue;
    }
    e.projector->commit(*e.inner);
    e.inner->step();
    e.projector->write_back(*e.inner);
  }
  return loss;
}

void LowRankOptimizer::check_state_fits(const std::vector<std::unique_ptr<Entry>>& entries,
                                        const std::function<Target(const Entry&)>& target_of) const {
  // Per target (the last slot: `default`), the host bytes its parameters' state will take:
  // the projectors' tensors, the factors' gradients and the inner rule's moments.
  const int64_t per_value = InnerRule::state_tensors_per_element(config_.optimizer) + 1;
  std::vector<double> bytes(config_.targets.size() + 1, 0.0);
  std::vector<int64_t> count(bytes.size(), 0);
  for (const auto& e : entries) {
    const MethodInfo& info = method_info(e->method);
    if (!info.footprint || !e->param.device().is_cpu()) continue;  // device memory: not checked here
    if (info.low_rank && e->param.dim() < 2) continue;             // make_projector refuses it, naming the key
    const auto [persistent, trainable] =
        info.footprint(ProjectorContext{e->name, e->param, target_of(*e), config_.seed});
    const auto esize = static_cast<double>(c10::elementSize(factor_dtype(e->param.scalar_type())));
    const size_t slot = e->target_index >= 0 ? static_cast<size_t>(e->target_index) : config_.targets.size();
    bytes[slot] += static_cast<double>(persistent) + static_cast<double>(trainable) * esize * per_value;
    ++count[slot];
  }
  double total = 0;
  for (double b : bytes) total += b;
  const std::optional<double> avail = detail::available_host_bytes();
  if (!avail || total <= *avail) return;
  const size_t worst = static_cast<size_t>(std::max_element(bytes.begin(), bytes.end()) - bytes.begin());
  std::string key = "default", what = fmt::format(" ({})", to_string(config_.default_method));
  if (worst < config_.targets.size()) {
    const Target& t = config_.targets[worst];
    const bool low_rank = method_info(t.method).low_rank;
    key = fmt::format("targets[{}].{}", worst, low_rank ? "rank" : "method");
    what = low_rank ? fmt::format(" ({} rank {})", to_string(t.method), t.rank)
                    : fmt::format(" ({})", to_string(t.method));
  }
  throw ConfigError(fmt::format(
      "config key '{}'{}: its {} parameter(s) need an optimizer state of {:.0f} bytes ({}), all targets {:.0f} "
      "bytes, but this machine has {:.0f} bytes available",
      key, what, count[worst], bytes[worst], human_bytes(static_cast<int64_t>(bytes[worst])), total, *avail));
}

void LowRankOptimizer::refuse_unclippable_accumulation() const {
  for (const auto& e : entries_) {
    if (!e->link || e->backwards < 2 || !e->accumulating()) continue;
    throw std::runtime_error(fmt::format(
        "gradlora: max_grad_norm in fused mode needs one backward() per step, but parameter '{}' received {} "
        "gradients since the last step: the norm of their sum cannot be formed from their projections (set "
        "fuse_into_backward: false to accumulate micro-batches, or call step() after each backward)",
        e->name, e->backwards));
  }
}

void LowRankOptimizer::clip_projected(const std::vector<Entry*>& active, std::vector<torch::Tensor>& norms,
                                      double max_norm) {
  // torch::nn::utils::clip_grad_norm_'s arithmetic: per-tensor norms, their norm, the
  // coefficient max/(total + 1e-6) clamped to 1, one multiply per gradient; no host sync.
  const torch::Device device = norms.front().device();
  for (auto& n : norms) n = n.to(device);
  const torch::Tensor total = norms.size() == 1 ? norms[0] : torch::stack(norms).norm(2);
  const torch::Tensor coef = torch::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
  for (Entry* e : active) {
    for (const auto& t : e->projector->inner_params()) {
      if (t.grad().defined()) torch::Tensor(t.grad()).mul_(coef.to(t.device()));
    }
  }
}

// ------------------------------------------------------------ queries

LowRankOptimizer::Entry& LowRankOptimizer::entry(const std::string& name) {
  auto it = index_.find(name);
  if (it == index_.end()) throw std::invalid_argument(fmt::format("gradlora: no parameter named '{}'", name));
  return *entries_[it->second];
}

const LowRankOptimizer::Entry& LowRankOptimizer::entry(const std::string& name) const {
  return const_cast<LowRankOptimizer*>(this)->entry(name);
}

std::pair<torch::Tensor, torch::Tensor> LowRankOptimizer::factors(const std::string& name) const {
  const Entry& e = entry(name);
  if (!e.projector) {
    throw std::invalid_argument(fmt::format("parameter '{}' is frozen and has no factors", name));
  }
  return e.projector->factors();
}

std::map<std::string, torch::Tensor> LowRankOptimizer::state_tensors(const std::string& name) const {
  const Entry& e = entry(name);
  std::map<std::string, torch::Tensor> out;
  if (!e.projector) return out;
  for (const auto& kv : e.projector->tensors()) out[kv.first] = kv.second;
  for (size_t i = 0; i < e.inner->params().size(); ++i) {
    for (const auto& kv : e.inner->state(i)) out[fmt::format("inner.{}.{}", i, kv.first)] = kv.second;
  }
  return out;
}

Method LowRankOptimizer::method_of(const std::string& name) const { return entry(name).method; }

Projector& LowRankOptimizer::projector(const std::string& name) {
  Entry& e = entry(name);
  if (!e.projector) throw std::invalid_argument(fmt::format("parameter '{}' is frozen", name));
  return *e.projector;
}

std::vector<std::string> LowRankOptimizer::names() const {
  std::vector<std::string> v;
  for (const auto& e : entries_) v.push_back(e->name);
  return v;
}

std::vector<SubspaceStats> LowRankOptimizer::subspace_stats() const {
  std::vector<SubspaceStats> out;
  if (!config_.diagnostics) return out;
  for (const auto& e : entries_) {
    if (!e->projector || !method_info(e->method).low_rank) continue;
    SubspaceStats st;
    st.name = e->name;
    st.method = e->method;
    if (e->energy.defined()) st.energy_kept = e->energy.item<double>();
    const auto [overlap, at] = e->projector->last_overlap();
    if (overlap.defined()) {
      st.overlap = overlap.item<double>();
      st.overlap_step = at;
    }
    out.push_back(std::move(st));
  }
  return out;
}

}  // namespace gradlora
