#include <gradlora/maths.h>
#include <gradlora/optimizer.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>

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
void LowRankOptions::serialize(torch::serialize::OutputArchive& archive) const { archive.write("lr", c10::IValue(lr_)); }

// -------------------------------------------------------------- entry

// Fused mode: a pre-hook on the parameter's gradient accumulator projects the
// gradient as soon as autograd has summed it and returns an undefined tensor,
// so the accumulator never stores the full gradient in .grad. The link is
// cleared when the optimizer goes away; the hook then lets gradients through.
//
// What the hook accumulated must be dropped by any zero_grad() — the optimizer's
// (called through torch::optim::Optimizer&, which cannot be overridden in 2.x) or
// the module's — without gradlora overriding anything. So the hook leaves a
// placeholder in the parameter's .grad: an empty tensor of the parameter's dtype
// and device. zero_grad() either resets it (set_to_none) or zeroes it in place,
// which bumps its version counter; either way the next backward or step() sees
// that the placeholder is gone or touched and starts afresh. The placeholder
// holds no data, so gradient-norm utilities count it as zero.
struct FusedLink {
  LowRankOptimizer::Entry* entry = nullptr;
};

struct LowRankOptimizer::Entry {
  std::string name;
  torch::Tensor param;
  Method method = Method::frozen;
  size_t group = 0;
  int64_t target_index = -1;  // -1: default
  std::unique_ptr<Projector> projector;
  std::unique_ptr<InnerRule> inner;
  // fused mode
  std::shared_ptr<torch::autograd::Node> accumulator;  // held, or the hook is lost with it
  std::shared_ptr<FusedLink> link;
  torch::Tensor placeholder;          // what the hook leaves in param.grad
  int64_t placeholder_version = -1;   // its version counter when the hook left it

  /// True while the projected gradients accumulated since the last step() are
  /// still wanted: the placeholder is in .grad and nobody zeroed it.
  bool accumulating() const {
    if (!placeholder.defined() || !param.grad().defined()) return false;
    return param.grad().unsafeGetTensorImpl() == placeholder.unsafeGetTensorImpl() &&
           static_cast<int64_t>(placeholder._version()) == placeholder_version;
  }
  void leave_placeholder() {
    placeholder = torch::empty({0}, param.options().requires_grad(false));
    placeholder_version = static_cast<int64_t>(placeholder._version());
    param.mutable_grad() = placeholder;
  }
  void remove_placeholder() {
    if (placeholder.defined() && param.grad().defined() &&
        param.grad().unsafeGetTensorImpl() == placeholder.unsafeGetTensorImpl()) {
      param.mutable_grad() = torch::Tensor();
    }
    placeholder = torch::Tensor();
    placeholder_version = -1;
  }
};

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
    e->projector->project(grads[0]);
    if (accumulate) {
      auto params = e->projector->inner_params();
      for (size_t i = 0; i < params.size(); ++i) {
        if (prev[i].defined()) params[i].mutable_grad().add_(prev[i]);
      }
    }
    e->leave_placeholder();
    return {torch::Tensor()};  // AccumulateGrad skips an undefined gradient: the full gradient is never stored
  }

 private:
  std::shared_ptr<FusedLink> link_;
};

}  // namespace

namespace {

constexpr int64_t kFormatVersion = 1;

std::string human_bytes(int64_t b) {
  const double d = static_cast<double>(b);
  if (b >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", d / (1 << 30));
  if (b >= (int64_t{1} << 20)) return fmt::format("{:.2f} MiB", d / (1 << 20));
  if (b >= (int64_t{1} << 10)) return fmt::format("{:.1f} KiB", d / (1 << 10));
  return fmt::format("{} B", b);
}

// Target settings that change what the saved tensors mean (checked on load; the
// learning rates are restored from the checkpoint instead).
std::string checkpoint_settings(Method method, const Target& t) {
  const std::string init_std = t.init_std ? fmt::format("{:.17g}", *t.init_std) : "auto";
  switch (method) {
    case Method::full:
      return "full";
    case Method::lora:
      return fmt::format("scale {:.17g}, init {}, init_std {}, merge_every {}", t.scale(), to_string(t.init),
                         t.init == Init::symmetric ? init_std : "-", t.merge_every);
    case Method::random:
      return fmt::format("scale {:.17g}, init_std {}, resample_every {}, on_resample {}", t.scale(), init_std,
                         t.resample_every, to_string(t.resample_policy()));
    default:
      return fmt::format("scale {:.17g}", t.scale());
  }
}

// Per entry, whether every projected gradient it holds is finite, with one host
// synchronisation per device: the flags are reduced on the device, stacked, and
// read back together.
std::vector<char> finite_flags(const std::vector<std::vector<torch::Tensor>>& grads_per_entry) {
  std::vector<char> finite(grads_per_entry.size(), 1);
  std::map<std::string, std::pair<std::vector<size_t>, std::vector<torch::Tensor>>> by_device;
  for (size_t i = 0; i < grads_per_entry.size(); ++i) {
    for (const auto& g : grads_per_entry[i]) {
      if (!g.defined() || g.numel() == 0) continue;
      auto& slot = by_device[g.device().str()];
      slot.first.push_back(i);
      slot.second.push_back(torch::isfinite(g).all());
    }
  }
  for (auto& kv : by_device) {
    const torch::Tensor flags = torch::stack(kv.second.second).to(torch::kCPU);
    const bool* f = flags.data_ptr<bool>();
    for (size_t k = 0; k < kv.second.first.size(); ++k) {
      if (!f[k]) finite[kv.second.first[k]] = 0;
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
    const std::string msg =
        fmt::format("config key 'targets[{}].match': pattern '{}' matches no parameter (set "
                    "allow_unmatched_targets: true to make this a warning)",
                    i, config_.targets[i].match);
    if (!config_.allow_unmatched_targets) throw ConfigError(msg);
    spdlog::warn("gradlora: {}", msg);
  }

  // Build projectors and inner rules (may throw ConfigError; nothing is registered yet).
  for (auto& e : entries) {
    if (e->method == Method::frozen) continue;
    Target t;
    if (e->target_index >= 0) {
      t = config_.targets[e->target_index];
    } else {
      t.match = "(default)";
      t.method = e->method;
    }
    e->projector = make_projector(ProjectorContext{e->name, e->param, t, config_.seed});
    const double lr = t.lr.value_or(config_.optimizer.lr);
    const double wd = t.weight_decay.value_or(config_.optimizer.effective_weight_decay());
    e->inner = std::make_unique<InnerRule>(e->projector->inner_params(), config_.optimizer, lr, wd);
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
      if (!e->projector || e->method == Method::full || !e->param.requires_grad()) continue;
      e->link = std::make_shared<FusedLink>();
      e->link->entry = e.get();
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
  ++step_count_;
  // Phase 1: project every gradient (no persistent state changes).
  std::vector<Entry*> active;
  for (auto& e : entries_) {
    if (!e->projector) continue;
    if (e->link) {  // fused: projected during backward()
      const bool accumulated = e->accumulating();
      e->remove_placeholder();
      if (!accumulated) {
        e->projector->discard();
        continue;
      }
    } else {
      const torch::Tensor& g = e->param.grad();
      if (!g.defined()) continue;
      e->projector->project(g);
    }
    e->inner->set_lr(param_groups_[e->group].options().get_lr());
    active.push_back(e.get());
  }
  // Phase 2: data-parallel averaging of the projected gradients.
  if (reducer_ && !active.empty()) {
    std::vector<torch::Tensor> grads;
    for (Entry* e : active) {
      for (const auto& t : e->projector->inner_params()) {
        if (t.grad().defined()) grads.push_back(t.grad());
      }
    }
    reducer_(grads);
  }
  // Phase 3: finite check (all before any change, so `error` leaves everything as it was),
  // then inner step and write-back.
  std::vector<std::vector<torch::Tensor>> grads(active.size());
  for (size_t i = 0; i < active.size(); ++i) {
    for (const auto& t : active[i]->projector->inner_params()) grads[i].push_back(t.grad());
  }
  const std::vector<char> finite = finite_flags(grads);
  for (size_t i = 0; i < active.size(); ++i) {
    if (finite[i] || config_.on_nonfinite != OnNonFinite::error) continue;
    for (Entry* e : active) e->projector->discard();
    throw std::runtime_error(
        fmt::format("gradlora: non-finite gradient (NaN or Inf) for parameter '{}' at step {} (on_nonfinite: error)",
                    active[i]->name, step_count_));
  }
  for (size_t i = 0; i < active.size(); ++i) {
    Entry& e = *active[i];
    if (!finite[i]) {
      e.projector->discard();
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

// ------------------------------------------------------------- report

void LowRankOptimizer::build_report() {
  SelectionReport r;
  for (const auto& e : entries_) {
    ParamReport p;
    p.name = e->name;
    p.shape = e->param.sizes().vec();
    p.method = e->method;
    p.numel = e->param.numel();
    const int64_t esize = static_cast<int64_t>(e->param.element_size());
    p.adamw_state_bytes = 2 * p.numel * esize;
    if (e->projector) {
      const Target& t = e->projector->context().target;
      p.rank = (e->method == Method::full) ? 0 : t.rank;
      p.trainable = e->projector->trainable();
      const int64_t inner_esize = static_cast<int64_t>(c10::elementSize(
          e->method == Method::full ? e->param.scalar_type() : factor_dtype(e->param.scalar_type())));
      const int64_t persistent = e->projector->persistent_bytes();
      p.persistent_bytes = persistent;
      p.moment_bytes = e->inner->state_tensors_per_element() * p.trainable * inner_esize;
      p.state_bytes = p.persistent_bytes + p.moment_bytes;
      p.allreduce_bytes = p.trainable * inner_esize;
      p.note = e->projector->note();
    }
    r.total_params += p.numel;
    r.total_trainable += p.trainable;
    r.total_state_bytes += p.state_bytes;
    r.total_adamw_state_bytes += p.adamw_state_bytes;
    r.total_allreduce_bytes += p.allreduce_bytes;
    r.params.push_back(std::move(p));
  }
  report_ = std::move(r);
}

std::string SelectionReport::to_string() const {
  size_t w = 9;
  for (const auto& p : params) w = std::max(w, p.name.size());
  std::string out = fmt::format("{:<{}}  {:<14} {:<9} {:>4} {:>12} {:>12} {:>11} {:>11}  {}\n", "parameter", w,
                                "shape", "method", "rank", "numel", "trainable", "state", "adamw", "note");
  for (const auto& p : params) {
    out += fmt::format("{:<{}}  {:<14} {:<9} {:>4} {:>12} {:>12} {:>11} {:>11}  {}\n", p.name, w,
                       fmt::format("{}", fmt::join(p.shape, "x")), gradlora::to_string(p.method),
                       p.rank ? std::to_string(p.rank) : "-", p.numel, p.trainable, human_bytes(p.state_bytes),
                       human_bytes(p.adamw_state_bytes), p.note);
  }
  const double pct = total_params ? 100.0 * static_cast<double>(total_trainable) / total_params : 0.0;
  const double ratio = total_state_bytes ? static_cast<double>(total_adamw_state_bytes) / total_state_bytes : 0.0;
  out += fmt::format(
      "trainable: {} of {} values ({:.3f}%) | optimizer state: {} vs {} for AdamW ({:.1f}x smaller) | "
      "all-reduce per step: {}",
      total_trainable, total_params, pct, human_bytes(total_state_bytes), human_bytes(total_adamw_state_bytes), ratio,
      human_bytes(total_allreduce_bytes));
  return out;
}

// -------------------------------------------------------- checkpoints

void LowRankOptimizer::save(torch::serialize::OutputArchive& archive) const {
  archive.write("gradlora_format", c10::IValue(kFormatVersion));
  archive.write("step_count", c10::IValue(step_count_));
  archive.write("skipped_count", c10::IValue(skipped_count_));
  c10::List<std::string> names;
  c10::List<double> lrs;
  for (const auto& e : entries_) names.push_back(e->name);
  for (const auto& g : param_groups_) lrs.push_back(g.options().get_lr());
  archive.write("names", c10::IValue(names));
  archive.write("group_lrs", c10::IValue(lrs));
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = *entries_[i];
    torch::serialize::OutputArchive sub(archive.compilation_unit());
    sub.write("method", c10::IValue(std::string(to_string(e.method))));
    sub.write("shape", c10::IValue(c10::List<int64_t>(e.param.sizes().vec())));
    if (e.projector) {
      sub.write("rank", c10::IValue(e.method == Method::full ? int64_t{0} : e.projector->context().target.rank));
      sub.write("inner_type", c10::IValue(std::string(to_string(e.inner->type()))));
      sub.write("settings", c10::IValue(checkpoint_settings(e.method, e.projector->context().target)));
      TensorMap m;
      e.projector->save(m);
      e.inner->save(m, "inner_");
      c10::List<std::string> keys;
      for (const auto& kv : m) {
        keys.push_back(kv.first);
        sub.write(kv.first, kv.second);
      }
      sub.write("tensor_keys", c10::IValue(keys));
    }
    archive.write(fmt::format("p{}", i), sub);
  }
}

void LowRankOptimizer::load(torch::serialize::InputArchive& archive) {
  std::vector<std::string> problems;
  std::vector<TensorMap> maps(entries_.size());
  int64_t step_count = 0, skipped = 0;
  std::vector<double> lrs;
  try {
    c10::IValue v;
    if (!archive.try_read("gradlora_format", v)) {
      throw std::runtime_error("not a gradlora optimizer checkpoint (no 'gradlora_format' key)");
    }
    if (v.toInt() != kFormatVersion) {
      throw std::runtime_error(fmt::format("checkpoint format {} is not supported (expected {})", v.toInt(),
                                           kFormatVersion));
    }
    archive.read("step_count", v);
    step_count = v.toInt();
    archive.read("skipped_count", v);
    skipped = v.toInt();
    archive.read("names", v);
    std::vector<std::string> names;
    for (const auto& n : v.toListRef()) names.push_back(n.toStringRef());
    archive.read("group_lrs", v);
    for (const auto& d : v.toListRef()) lrs.push_back(d.toDouble());
    if (lrs.size() != param_groups_.size()) {
      problems.push_back(fmt::format("checkpoint has {} parameter groups, the optimizer {}", lrs.size(),
                                     param_groups_.size()));
    }
    std::map<std::string, size_t> pos;
    for (size_t i = 0; i < names.size(); ++i) pos[names[i]] = i;
    for (const auto& e : entries_) {
      if (!pos.count(e->name)) problems.push_back(fmt::format("parameter '{}' is not in the checkpoint", e->name));
    }
    for (const auto& n : names) {
      if (!index_.count(n)) problems.push_back(fmt::format("checkpoint has parameter '{}', the model has not", n));
    }
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = *entries_[i];
      auto it = pos.find(e.name);
      if (it == pos.end()) continue;
      torch::serialize::InputArchive sub;
      archive.read(fmt::format("p{}", it->second), sub);
      const std::string who = fmt::format("parameter '{}': ", e.name);
      sub.read("method", v);
      const std::string method = v.toStringRef();
      if (method != to_string(e.method)) {
        problems.push_back(who + fmt::format("method is '{}' in the checkpoint, '{}' here", method,
                                             to_string(e.method)));
        continue;
      }
      sub.read("shape", v);
      const std::vector<int64_t> shape = v.toIntVector();
      if (shape != e.param.sizes().vec()) {
        problems.push_back(who + fmt::format("shape is [{}] in the checkpoint, [{}] here", fmt::join(shape, ", "),
                                             fmt::join(e.param.sizes(), ", ")));
        continue;
      }
      if (!e.projector) continue;
      sub.read("rank", v);
      const int64_t rank = e.method == Method::full ? 0 : e.projector->context().target.rank;
      if (v.toInt() != rank) {
        problems.push_back(who + fmt::format("rank is {} in the checkpoint, {} here", v.toInt(), rank));
        continue;
      }
      sub.read("inner_type", v);
      if (v.toStringRef() != to_string(e.inner->type())) {
        problems.push_back(who + fmt::format("inner rule is '{}' in the checkpoint, '{}' here", v.toStringRef(),
                                             to_string(e.inner->type())));
        continue;
      }
      const std::string settings = checkpoint_settings(e.method, e.projector->context().target);
      if (sub.try_read("settings", v) && v.isString() && v.toStringRef() != settings) {
        problems.push_back(who + fmt::format("settings are '{}' in the checkpoint, '{}' here", v.toStringRef(),
                                             settings));
        continue;
      }
      sub.read("tensor_keys", v);
      for (const auto& k : v.toListRef()) {
        torch::Tensor t;
        sub.read(k.toStringRef(), t);
        maps[i][k.toStringRef()] = t;
      }
      std::vector<std::string> local;
      e.projector->check(maps[i], local);
      e.inner->check(maps[i], "inner_", local);
      for (auto& p : local) problems.push_back(who + p);
    }
  } catch (const c10::Error& err) {
    throw std::runtime_error(fmt::format("gradlora: cannot load optimizer checkpoint: corrupt or incomplete ({})",
                                         err.what_without_backtrace()));
  }
  if (!problems.empty()) {
    throw std::runtime_error(fmt::format("gradlora: checkpoint does not fit this optimizer ({} problem(s)):\n  {}",
                                         problems.size(), fmt::join(problems, "\n  ")));
  }
  // Everything checked: apply (cannot fail from here on).
  torch::NoGradGuard guard;
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& e = *entries_[i];
    if (!e.projector) continue;
    e.projector->load(maps[i]);
    e.inner->load(maps[i], "inner_");
  }
  for (size_t g = 0; g < param_groups_.size(); ++g) param_groups_[g].options().set_lr(lrs[g]);
  step_count_ = step_count;
  skipped_count_ = skipped;
}

}  // namespace gradlora
