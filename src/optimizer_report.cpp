// The selection report of LowRankOptimizer (what each parameter gets, and the totals).
#include <gradlora/optimizer.h>

#include "optimizer_entry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace gradlora {

std::string human_bytes(int64_t b) {
  const double d = static_cast<double>(b);
  if (b >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", d / (1 << 30));
  if (b >= (int64_t{1} << 20)) return fmt::format("{:.2f} MiB", d / (1 << 20));
  if (b >= (int64_t{1} << 10)) return fmt::format("{:.1f} KiB", d / (1 << 10));
  return fmt::format("{} B", b);
}

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
      p.rank = e->projector->rank();
      p.trainable = e->projector->trainable();
      const int64_t inner_esize = static_cast<int64_t>(e->projector->inner_params().front().element_size());
      const int64_t persistent = e->projector->persistent_bytes();
      p.persistent_bytes = persistent;
      p.moment_bytes = e->inner->state_tensors_per_element() * p.trainable * inner_esize;
      p.state_bytes = p.persistent_bytes + p.moment_bytes;
      p.allreduce_bytes = p.trainable * inner_esize;
      p.note = e->projector->note();
      if (e->projector->transposed()) p.note += p.note.empty() ? "fan_in_fan_out" : ", fan_in_fan_out";
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
  std::string out = fmt::format("{:<{}}  {:<14} {:<9} {:>4} {:>12} {:>12} {:>11} {:>11}  {}\n", "parameter", w, "shape",
                                "method", "rank", "numel", "trainable", "state", "adamw", "note");
  for (const auto& p : params) {
    std::string row = fmt::format("{:<{}}  {:<14} {:<9} {:>4} {:>12} {:>12} {:>11} {:>11}  {}", p.name, w,
                                  fmt::format("{}", fmt::join(p.shape, "x")), gradlora::to_string(p.method),
                                  p.rank ? std::to_string(p.rank) : "-", p.numel, p.trainable,
                                  human_bytes(p.state_bytes), human_bytes(p.adamw_state_bytes), p.note);
    row.erase(row.find_last_not_of(' ') + 1);  // no trailing blanks when there is no note
    out += row + "\n";
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

}  // namespace gradlora
