// `gradlora compare`: every method of compare.methods for every seed, one table.
#include "trainer.h"

#include "run_files.h"
#include "run_loop.h"
#include "svg.h"

#include <gradlora/gradlora.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <map>

namespace gradlora::app {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- compare

namespace {

struct Stat {
  double mean = kNaN, sd = kNaN;
};

Stat stat(const std::vector<double>& v) {
  Stat s;  // sd stays NaN for a single value
  if (v.empty()) return s;
  double m = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  s.mean = m;
  if (v.size() > 1) {
    double q = 0;
    for (double x : v) q += (x - m) * (x - m);
    s.sd = std::sqrt(q / static_cast<double>(v.size() - 1));
  }
  return s;
}

std::string pm(const Stat& s, int digits) {
  if (!std::isfinite(s.mean)) return "-";
  if (!std::isfinite(s.sd)) return fmt::format("{:.{}f}", s.mean, digits);
  return fmt::format("{:.{}f} ± {:.{}f}", s.mean, digits, s.sd, digits);
}

}  // namespace

int run_compare(const Settings& s, const std::string& out_dir, bool fresh) {
  if (!s.has_compare) throw SettingsError("config key 'compare': missing (compare needs compare.methods)");
  fs::create_directories(out_dir);
  std::map<std::string, std::vector<RunSummary>> by_method;
  for (const MethodSpec& m : s.compare.methods) {
    for (uint64_t seed : s.compare.seeds) {
      const YAML::Node tree = method_tree(s, m, seed);
      const Settings rs = parse_settings(tree, s.base_dir, s.source);
      RunOptions o;
      o.method = m.name;
      o.out_dir = (fs::path(out_dir) / m.name / fmt::format("seed{}", seed)).string();
      YAML::Node tt = YAML::Clone(tree);
      // Every run shares one pre-trained model.
      if (rs.training.cache_dir.empty()) {
        apply_override(tt, "training.cache_dir", (fs::path(out_dir) / "cache").string());
      }
      const Settings rs2 = parse_settings(tt, s.base_dir, s.source);
      const std::string hash = result_hash(tt, rs2);
      auto done = read_summary(o.out_dir);
      o.resume = !fresh && ((done && done->hash == hash && !done->interrupted) ||
                            fs::exists(fs::path(o.out_dir) / "checkpoint.pt"));
      RunSummary r;
      try {
        r = train_run(rs2, tt, o);
      } catch (const SettingsError&) {
        if (!o.resume) throw;
        spdlog::warn("{}: the checkpoint does not fit the current settings; starting afresh", o.out_dir);
        o.resume = false;
        r = train_run(rs2, tt, o);
      }
      if (r.interrupted) return 130;
      by_method[m.name].push_back(r);
    }
  }

  // The table.
  std::string md =
      "| method | trainable | optimizer state | held-out loss B (after) | forgetting: Δ held-out loss A | step (ms) | "
      "opt.step (ms) |\n|---|---:|---:|---:|---:|---:|---:|\n";
  std::string csv =
      "method,seeds,trainable,state_bytes,adamw_state_bytes,eval_after_mean,eval_after_sd,forgetting_mean,"
      "forgetting_sd,step_ms_mean,step_ms_sd,opt_ms_mean,opt_ms_sd\n";
  std::string txt = fmt::format("{:<12} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}\n", "method", "trainable",
                                "opt. state", "held-out B", "forgetting (A)", "step ms", "opt ms");
  std::vector<Panel> panels(3);
  panels[0] = Panel{"learning: held-out loss on B", "fine-tuning step", "nats per byte", {}};
  panels[1] = Panel{"forgetting: held-out loss on A", "fine-tuning step", "nats per byte", {}};
  panels[2] = Panel{"trade-off (curves run right to left)", "held-out loss on B", "held-out loss on A", {}};
  panels[0].legend = "bottom-left";
  panels[1].legend = "top-left";
  int color = 0;
  for (const MethodSpec& m : s.compare.methods) {
    const auto& runs = by_method[m.name];
    if (runs.empty()) continue;
    std::vector<double> ev, fg, st, op;
    for (const auto& r : runs) {
      ev.push_back(r.eval_after);
      fg.push_back(r.forgetting());
      st.push_back(r.step_ms);
      op.push_back(r.opt_ms);
    }
    const Stat e = stat(ev), f = stat(fg), sp = stat(st), o = stat(op);
    const RunSummary& r0 = runs.front();
    txt += fmt::format("{:<12} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}\n", m.name, r0.trainable,
                       human_bytes(r0.state_bytes), pm(e, 4), pm(f, 4), pm(sp, 1), pm(o, 2));
    md += fmt::format("| {} | {} | {} | {} | {} | {} | {} |\n", m.name, r0.trainable, human_bytes(r0.state_bytes),
                      pm(e, 4), pm(f, 4), pm(sp, 1), pm(o, 2));
    csv += fmt::format("{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g}\n", m.name, runs.size(),
                       r0.trainable, r0.state_bytes, r0.adamw_state_bytes, e.mean, e.sd, f.mean, f.sd, sp.mean, sp.sd,
                       o.mean, o.sd);
    // Curves: mean ± sd over seeds at each evaluated step (runs share the schedule).
    Series sb, sa;
    sb.label = sa.label = m.name;
    sb.color = sa.color = color++;
    const size_t n = runs.front().rows.size();
    for (size_t i = 0; i < n; ++i) {
      std::vector<double> b, a;
      for (const auto& r : runs) {
        if (i < r.rows.size()) {
          b.push_back(r.rows[i].eval_loss);
          a.push_back(r.rows[i].base_eval_loss);
        }
      }
      const Stat bs = stat(b), as = stat(a);
      const double x = static_cast<double>(runs.front().rows[i].step);
      sb.x.push_back(x);
      sb.y.push_back(bs.mean);
      sb.band.push_back(bs.sd);
      sa.x.push_back(x);
      sa.y.push_back(as.mean);
      sa.band.push_back(as.sd);
    }
    Series trade;
    trade.label = m.name;
    trade.color = sb.color;
    trade.x = sb.y;
    trade.y = sa.y;
    panels[0].series.push_back(sb);
    panels[1].series.push_back(sa);
    panels[2].series.push_back(trade);
  }
  const bool has_base = s.data.has_pretrain;
  if (!has_base) panels.resize(1);
  std::string seeds;
  for (uint64_t sd : s.compare.seeds) seeds += (seeds.empty() ? "" : ", ") + std::to_string(sd);
  const std::string note = fmt::format(
      "mean ± sample std over seeds {}; losses in nats per byte; forgetting = held-out loss on the pre-training "
      "corpus after fine-tuning minus before; step = forward + backward + clip + opt.step ({} thread(s))",
      seeds, s.training.threads);
  std::fputs(txt.c_str(), stdout);
  std::fputs((note + "\n").c_str(), stdout);
  std::fflush(stdout);
  write_file_atomic((fs::path(out_dir) / "results.md").string(), md + "\n" + note + "\n");
  write_file_atomic((fs::path(out_dir) / "results.csv").string(), csv);
  write_file_atomic(
      (fs::path(out_dir) / "compare.svg").string(),
      svg_chart(panels, fmt::format("continual fine-tuning, mean ± sd over {} seed(s)", s.compare.seeds.size())));
  spdlog::info("wrote {}/results.md, results.csv, compare.svg", out_dir);
  return 0;
}

}  // namespace gradlora::app
