// The files of a run.
#include "run_files.h"

#include "run_loop.h"
#include "svg.h"

#include <gradlora/checkpoint.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace gradlora::app {

namespace fs = std::filesystem;

namespace {

double parse_num(const std::string& s) { return s.empty() ? kNaN : std::stod(s); }

}  // namespace

// ------------------------------------------------------- files of a run

std::string metrics_csv(const std::vector<MetricRow>& rows) {
  // The diagnostics columns: every name any row has, in the order first seen.
  std::vector<std::string> extra;
  bool val = false;
  for (const auto& r : rows) {
    val = val || std::isfinite(r.val_loss);
    for (const auto& [name, v] : r.extra) {
      if (std::find(extra.begin(), extra.end(), name) == extra.end()) extra.push_back(name);
    }
  }
  std::string out = "step,lr,train_loss,eval_loss,base_eval_loss,tokens,elapsed_s";
  if (val) out += ",val_loss";
  for (const auto& name : extra) out += "," + name;
  out += "\n";
  for (const auto& r : rows) {
    out += fmt::format("{},{},{},{},{},{},{:.3f}", r.step, fmt_num(r.lr), fmt_num(r.train_loss), fmt_num(r.eval_loss),
                       fmt_num(r.base_eval_loss), r.tokens, r.elapsed_s);
    if (val) out += "," + fmt_num(r.val_loss);
    for (const auto& name : extra) {
      double v = kNaN;
      for (const auto& [n, x] : r.extra) {
        if (n == name) v = x;
      }
      out += "," + fmt_num(v);
    }
    out += "\n";
  }
  return out;
}

std::vector<MetricRow> parse_metrics_csv(const std::string& text) {
  std::vector<MetricRow> rows;
  std::stringstream ss(text);
  std::string line;
  std::getline(ss, line);  // header: 7 fixed columns, val_loss when present, then the diagnostics'
  std::vector<std::string> header;
  {
    std::stringstream hs(line);
    std::string cell;
    while (std::getline(hs, cell, ',')) header.push_back(cell);
  }
  while (std::getline(ss, line)) {
    if (line.empty()) continue;
    std::vector<std::string> f;
    std::stringstream ls(line);
    std::string cell;
    while (std::getline(ls, cell, ',')) f.push_back(cell);
    while (f.size() < std::max<size_t>(7, header.size())) f.emplace_back();
    MetricRow r;
    r.step = std::stoll(f[0]);
    r.lr = parse_num(f[1]);
    r.train_loss = parse_num(f[2]);
    r.eval_loss = parse_num(f[3]);
    r.base_eval_loss = parse_num(f[4]);
    r.tokens = f[5].empty() ? 0 : std::stoll(f[5]);
    r.elapsed_s = parse_num(f[6]);
    for (size_t i = 7; i < header.size(); ++i) {
      if (header[i] == "val_loss") {
        r.val_loss = parse_num(f[i]);
      } else if (!f[i].empty()) {
        r.extra.emplace_back(header[i], parse_num(f[i]));
      }
    }
    rows.push_back(r);
  }
  return rows;
}

std::string subspace_svg(const std::vector<MetricRow>& rows, const std::string& title) {
  Panel energy{"energy kept", "step", "share of |G|^2 in the step's subspace", {}};
  Panel overlap{"projector refresh", "step", "overlap |Q_new^T Q_old|^2 / r", {}};
  energy.legend = overlap.legend = "bottom-right";
  auto series_of = [&](Panel& p, const std::string& prefix) {
    for (const auto& r : rows) {
      for (const auto& [name, v] : r.extra) {
        if (name.rfind(prefix, 0) != 0 || !std::isfinite(v)) continue;
        const std::string label = name.substr(prefix.size());
        auto it = std::find_if(p.series.begin(), p.series.end(), [&](const Series& s) { return s.label == label; });
        if (it == p.series.end()) {
          p.series.push_back(Series{label, {}, {}, {}});
          it = p.series.end() - 1;
        }
        it->x.push_back(static_cast<double>(r.step));
        it->y.push_back(v);
      }
    }
  };
  series_of(energy, "energy_kept:");
  series_of(overlap, "overlap:");
  std::vector<Panel> panels{energy};
  if (!overlap.series.empty()) panels.push_back(overlap);
  return svg_chart(panels, title);
}

std::string loss_svg(const std::vector<MetricRow>& rows, const std::string& title, const std::string& base_corpus,
                     const std::string& unit) {
  Series train, held, base;
  train.label = "train loss (fine-tuning corpus)";
  held.label = "held-out loss (fine-tuning corpus)";
  base.label = "held-out loss (" + base_corpus + " corpus)";
  base.dashed = true;
  for (const auto& r : rows) {
    if (std::isfinite(r.train_loss)) {
      train.x.push_back(static_cast<double>(r.step));
      train.y.push_back(r.train_loss);
    }
    held.x.push_back(static_cast<double>(r.step));
    held.y.push_back(r.eval_loss);
    base.x.push_back(static_cast<double>(r.step));
    base.y.push_back(r.base_eval_loss);
  }
  Panel p{"loss", "step", "cross-entropy (nats per " + unit + ")", {train, held}};
  if (!base_corpus.empty()) p.series.push_back(base);
  return svg_chart({p}, title);
}

nlohmann::json summary_json(const RunSummary& s) {
  nlohmann::json j;
  j["method"] = s.method;
  j["seed"] = s.seed;
  j["hash"] = s.hash;
  j["steps_done"] = s.steps_done;
  j["interrupted"] = s.interrupted;
  if (s.diverged) {
    j["diverged"] = true;
    j["error"] = s.error;
  }
  auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  j["eval_before"] = num(s.eval_before);
  j["eval_after"] = num(s.eval_after);
  j["base_before"] = num(s.base_before);
  j["base_after"] = num(s.base_after);
  j["forgetting"] = num(s.forgetting());
  j["val_after"] = num(s.val_after);
  j["total_params"] = s.total_params;
  j["trainable"] = s.trainable;
  j["state_bytes"] = s.state_bytes;
  j["adamw_state_bytes"] = s.adamw_state_bytes;
  j["step_ms"] = s.step_ms;
  j["opt_ms"] = s.opt_ms;
  return j;
}

std::optional<RunSummary> read_summary(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "summary.json");
  if (!in) return std::nullopt;
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    RunSummary s;
    auto num = [&](const char* k) { return j[k].is_number() ? j[k].get<double>() : kNaN; };
    s.method = j["method"].get<std::string>();
    s.seed = j["seed"].get<uint64_t>();
    s.hash = j["hash"].get<std::string>();
    s.steps_done = j["steps_done"].get<int64_t>();
    s.interrupted = j["interrupted"].get<bool>();
    s.diverged = j.value("diverged", false);
    s.error = j.value("error", std::string());
    s.val_after = num("val_after");
    s.eval_before = num("eval_before");
    s.eval_after = num("eval_after");
    s.base_before = num("base_before");
    s.base_after = num("base_after");
    s.total_params = j["total_params"].get<int64_t>();
    s.trainable = j["trainable"].get<int64_t>();
    s.state_bytes = j["state_bytes"].get<int64_t>();
    s.adamw_state_bytes = j["adamw_state_bytes"].get<int64_t>();
    s.step_ms = num("step_ms");
    s.opt_ms = num("opt_ms");
    std::ifstream m(fs::path(dir) / "metrics.csv");
    std::stringstream ss;
    ss << m.rdbuf();
    s.rows = parse_metrics_csv(ss.str());
    return s;
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable: the run is simply done again
  }
}

/// The settings that decide a run's result (logging and stopping knobs removed).
std::string result_hash(const YAML::Node& tree, const Settings& s) {
  YAML::Node t = YAML::Clone(tree);
  t.remove("compare");
  if (t["training"] && t["training"].IsMap()) {
    for (const char* k : {"halt_after", "log_every", "checkpoint_every", "cache_dir"}) t["training"].remove(k);
  }
  std::string text = to_yaml(t);
  if (s.model.torchscript()) text += "\nmodel file checksum " + file_checksum(s.model.path);
  return stable_hash(text);
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_file_atomically(path,
                        [&](const std::function<void(const void*, size_t)>& sink) { sink(text.data(), text.size()); });
}

double forgetting_at(const std::vector<MetricRow>& rows, double level) {
  if (rows.empty()) return kNaN;
  const double a0 = rows.front().base_eval_loss;
  for (size_t i = 1; i < rows.size(); ++i) {
    const double b0 = rows[i - 1].eval_loss, b1 = rows[i].eval_loss;
    if (b0 >= level && level >= b1) {
      const double t = b0 != b1 ? (b0 - level) / (b0 - b1) : 0.0;
      return rows[i - 1].base_eval_loss + t * (rows[i].base_eval_loss - rows[i - 1].base_eval_loss) - a0;
    }
  }
  return kNaN;
}

}  // namespace gradlora::app
