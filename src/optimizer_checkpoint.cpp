// Checkpoints of LowRankOptimizer: everything it holds, keyed by parameter name;
// load() verifies the checksums and validates everything before it changes anything.
#include <gradlora/optimizer.h>

#include "checksum.h"
#include "optimizer_entry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace gradlora {

namespace {

// 2: every state tensor and the metadata carry a checksum (1 had none).
constexpr int64_t kFormatVersion = 2;

}  // namespace

void LowRankOptimizer::save(torch::serialize::OutputArchive& archive) const {
  // Every value written goes into `meta` in the same order load() reads it back;
  // every tensor gets its own checksum, listed beside its key.
  detail::MetaChecksum meta;
  archive.write("gradlora_format", c10::IValue(kFormatVersion));
  archive.write("step_count", c10::IValue(step_count_));
  archive.write("skipped_count", c10::IValue(skipped_count_));
  c10::List<std::string> names;
  c10::List<double> lrs;
  for (const auto& e : entries_) names.push_back(e->name);
  for (const auto& g : param_groups_) lrs.push_back(g.options().get_lr());
  archive.write("names", c10::IValue(names));
  archive.write("group_lrs", c10::IValue(lrs));
  meta.add(kFormatVersion).add(step_count_).add(skipped_count_).add(c10::IValue(names)).add(c10::IValue(lrs));
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = *entries_[i];
    torch::serialize::OutputArchive sub(archive.compilation_unit());
    const std::string method = to_string(e.method);
    const c10::List<int64_t> shape(e.param.sizes().vec());
    sub.write("method", c10::IValue(method));
    sub.write("shape", c10::IValue(shape));
    meta.add(method).add(c10::IValue(shape)).add(e.projector != nullptr);
    if (e.projector) {
      const std::string inner = to_string(e.inner->type()), settings = e.projector->checkpoint_settings();
      sub.write("rank", c10::IValue(e.projector->rank()));
      sub.write("inner_type", c10::IValue(inner));
      sub.write("settings", c10::IValue(settings));
      TensorMap m;
      e.projector->save(m);
      e.inner->save(m, "inner_");
      c10::List<std::string> keys;
      c10::List<int64_t> sums;
      for (const auto& kv : m) {
        keys.push_back(kv.first);
        sums.push_back(detail::to_stored(detail::tensor_checksum(kv.second)));
        sub.write(kv.first, kv.second);
      }
      sub.write("tensor_keys", c10::IValue(keys));
      sub.write("tensor_checksums", c10::IValue(sums));
      meta.add(e.projector->rank()).add(inner).add(settings).add(c10::IValue(keys)).add(c10::IValue(sums));
    }
    archive.write(fmt::format("p{}", i), sub);
  }
  archive.write("checksum", c10::IValue(detail::to_stored(meta.value())));
}

namespace {

// One parameter's record as the file holds it.
struct SavedEntry {
  std::string method;
  std::vector<int64_t> shape;
  bool lowrank = false;  // has a projector: rank, inner rule, settings, tensors
  int64_t rank = 0;
  std::string inner_type, settings;
  std::vector<std::string> keys;
  std::vector<int64_t> sums;
  TensorMap tensors;
};

}  // namespace

void LowRankOptimizer::load(torch::serialize::InputArchive& archive) {
  // 1. Read everything the file holds, as save() wrote it, hashing the metadata
  //    in the same order.
  int64_t step_count = 0, skipped = 0;
  std::vector<std::string> names;
  std::vector<double> lrs;
  std::vector<SavedEntry> saved;
  uint64_t stored = 0;
  detail::MetaChecksum meta;
  try {
    c10::IValue v;
    if (!archive.try_read("gradlora_format", v)) {
      throw std::runtime_error("not a gradlora optimizer checkpoint (no 'gradlora_format' key)");
    }
    if (v.toInt() == 1) {
      throw std::runtime_error(fmt::format(
          "checkpoint format 1 carries no checksums and is not supported (expected {}): its contents cannot be "
          "verified",
          kFormatVersion));
    }
    if (v.toInt() != kFormatVersion) {
      throw std::runtime_error(
          fmt::format("checkpoint format {} is not supported (expected {})", v.toInt(), kFormatVersion));
    }
    archive.read("step_count", v);
    step_count = v.toInt();
    archive.read("skipped_count", v);
    skipped = v.toInt();
    meta.add(kFormatVersion).add(step_count).add(skipped);
    archive.read("names", v);
    meta.add(v);
    for (const auto& n : v.toListRef()) names.push_back(n.toStringRef());
    archive.read("group_lrs", v);
    meta.add(v);
    for (const auto& d : v.toListRef()) lrs.push_back(d.toDouble());
    for (size_t i = 0; i < names.size(); ++i) {
      SavedEntry s;
      torch::serialize::InputArchive sub;
      archive.read(fmt::format("p{}", i), sub);
      sub.read("method", v);
      s.method = v.toStringRef();
      meta.add(v);
      sub.read("shape", v);
      meta.add(v);
      s.shape = v.toIntVector();
      s.lowrank = sub.try_read("rank", v);
      meta.add(s.lowrank);
      if (s.lowrank) {
        s.rank = v.toInt();
        meta.add(s.rank);
        sub.read("inner_type", v);
        s.inner_type = v.toStringRef();
        sub.read("settings", v);
        s.settings = v.toStringRef();
        meta.add(s.inner_type).add(s.settings);
        sub.read("tensor_keys", v);
        meta.add(v);
        for (const auto& k : v.toListRef()) s.keys.push_back(k.toStringRef());
        sub.read("tensor_checksums", v);
        meta.add(v);
        s.sums = v.toIntVector();
        for (const auto& k : s.keys) {
          torch::Tensor t;
          sub.read(k, t);
          s.tensors[k] = t;
        }
      }
      saved.push_back(std::move(s));
    }
    archive.read("checksum", v);
    stored = detail::from_stored(v.toInt());
  } catch (const c10::Error& err) {
    throw std::runtime_error(fmt::format("gradlora: cannot load optimizer checkpoint: corrupt or incomplete ({})",
                                         err.what_without_backtrace()));
  } catch (const std::runtime_error&) {
    throw;  // the messages above
  } catch (const std::exception& err) {
    throw std::runtime_error(
        fmt::format("gradlora: cannot load optimizer checkpoint: corrupt or incomplete ({})", err.what()));
  }

  // 2. Verify the checksums: the metadata (which holds the tensors' checksums), then
  //    every tensor.
  const uint64_t computed = meta.value();
  if (computed != stored) {
    throw std::runtime_error(fmt::format(
        "gradlora: optimizer checkpoint is damaged: its metadata (counters, names, learning rates, per-parameter "
        "settings and tensor checksums) fails its checksum (stored {}, computed {})",
        detail::hex(stored), detail::hex(computed)));
  }
  for (size_t i = 0; i < saved.size(); ++i) {
    const SavedEntry& s = saved[i];
    if (s.sums.size() != s.keys.size()) {
      throw std::runtime_error(
          fmt::format("gradlora: optimizer checkpoint is damaged: parameter '{}' lists {} "
                      "tensors and {} checksums",
                      names[i], s.keys.size(), s.sums.size()));
    }
    for (size_t k = 0; k < s.keys.size(); ++k) {
      const uint64_t want = detail::from_stored(s.sums[k]);
      const uint64_t got = detail::tensor_checksum(s.tensors.at(s.keys[k]));
      if (got != want) {
        throw std::runtime_error(fmt::format(
            "gradlora: optimizer checkpoint is damaged: state tensor '{}' of parameter '{}' fails its checksum "
            "(stored {}, computed {})",
            s.keys[k], names[i], detail::hex(want), detail::hex(got)));
      }
    }
  }

  // 3. Does it fit this optimizer?
  std::vector<std::string> problems;
  std::vector<TensorMap> maps(entries_.size());
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
    const SavedEntry& s = saved[it->second];
    const std::string who = fmt::format("parameter '{}': ", e.name);
    if (s.method != to_string(e.method)) {
      problems.push_back(who +
                         fmt::format("method is '{}' in the checkpoint, '{}' here", s.method, to_string(e.method)));
      continue;
    }
    if (s.shape != e.param.sizes().vec()) {
      problems.push_back(who + fmt::format("shape is [{}] in the checkpoint, [{}] here", fmt::join(s.shape, ", "),
                                           fmt::join(e.param.sizes(), ", ")));
      continue;
    }
    if (!e.projector) continue;
    if (!s.lowrank) {
      problems.push_back(who + "the checkpoint holds no low-rank state for it");
      continue;
    }
    const int64_t rank = e.projector->rank();
    if (s.rank != rank) {
      problems.push_back(who + fmt::format("rank is {} in the checkpoint, {} here", s.rank, rank));
      continue;
    }
    if (s.inner_type != to_string(e.inner->type())) {
      problems.push_back(who + fmt::format("inner rule is '{}' in the checkpoint, '{}' here", s.inner_type,
                                           to_string(e.inner->type())));
      continue;
    }
    const std::string settings = e.projector->checkpoint_settings();
    if (s.settings != settings) {
      problems.push_back(who + fmt::format("settings are '{}' in the checkpoint, '{}' here", s.settings, settings));
      continue;
    }
    maps[i] = s.tensors;
    std::vector<std::string> local;
    e.projector->check(maps[i], local);
    e.inner->check(maps[i], "inner_", local);
    for (auto& p : local) problems.push_back(who + p);
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
