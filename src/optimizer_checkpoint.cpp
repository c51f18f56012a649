// Checkpoints of LowRankOptimizer: everything it holds, keyed by parameter name;
// load() validates everything before it changes anything.
#include <gradlora/optimizer.h>

#include "optimizer_entry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace gradlora {

namespace {

constexpr int64_t kFormatVersion = 1;

}  // namespace

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
      sub.write("rank", c10::IValue(e.projector->rank()));
      sub.write("inner_type", c10::IValue(std::string(to_string(e.inner->type()))));
      sub.write("settings", c10::IValue(e.projector->checkpoint_settings()));
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
      throw std::runtime_error(
          fmt::format("checkpoint format {} is not supported (expected {})", v.toInt(), kFormatVersion));
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
      problems.push_back(
          fmt::format("checkpoint has {} parameter groups, the optimizer {}", lrs.size(), param_groups_.size()));
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
        problems.push_back(who +
                           fmt::format("method is '{}' in the checkpoint, '{}' here", method, to_string(e.method)));
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
      const int64_t rank = e.projector->rank();
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
      const std::string settings = e.projector->checkpoint_settings();
      if (sub.try_read("settings", v) && v.isString() && v.toStringRef() != settings) {
        problems.push_back(who +
                           fmt::format("settings are '{}' in the checkpoint, '{}' here", v.toStringRef(), settings));
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
