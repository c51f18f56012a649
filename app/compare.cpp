// `gradlora compare`: every method of compare.methods for every seed, one table;
// methods with `lrs` first have their learning rate chosen on the validation
// split; the forgetting of every method at matched learning (the frontier).
#include "trainer.h"

#include "data.h"
#include "pretrain_cache.h"
#include "run_files.h"
#include "run_loop.h"
#include "svg.h"

#include <gradlora/gradlora.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace gradlora::app {

namespace fs = std::filesystem;

namespace {

struct Stat {
  double mean = kNaN, sd = kNaN;
  size_t n = 0;
};

Stat stat(const std::vector<double>& v) {
  Stat s;  // sd stays NaN for a single value
  s.n = v.size();
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

std::string lr_text(double lr) { return fmt::format("{:g}", lr); }

// ------------------------------------------------------------------ runs

/// One training run of the comparison.
struct Job {
  std::string method;
  bool sweep = false;  ///< a learning-rate sweep run (chooses the lr), else a reported one
  double lr = kNaN;    ///< optimizer.lr set by compare; NaN: the method's own
  uint64_t seed = 0;
  YAML::Node tree;
  Settings settings;
  std::string hash;
  RunOptions o;
  RunSummary result;
};

std::string job_label(const Job& j) {
  return fmt::format("{}{} seed {}", j.method, std::isfinite(j.lr) ? " lr " + lr_text(j.lr) : "", j.seed);
}

Job make_job(const Settings& s, const MethodSpec& m, uint64_t seed, double lr, bool sweep, const std::string& out_dir) {
  Job j;
  j.method = m.name;
  j.sweep = sweep;
  j.lr = lr;
  j.seed = seed;
  j.tree = method_tree(s, m, seed);
  if (std::isfinite(lr)) apply_override(j.tree, "optimizer.lr", fmt::format("{}", lr));
  // Every run shares one pre-trained model.
  const Settings rs = parse_settings(j.tree, s.base_dir, s.source);
  if (rs.training.cache_dir.empty()) {
    apply_override(j.tree, "training.cache_dir", (fs::path(out_dir) / "cache").string());
  }
  j.settings = parse_settings(j.tree, s.base_dir, s.source);
  j.hash = result_hash(j.tree, j.settings);
  j.o.method = m.name;
  j.o.out_dir =
      sweep ? (fs::path(out_dir) / "sweep" / m.name / ("lr" + lr_text(lr)) / fmt::format("seed{}", seed)).string()
            : (fs::path(out_dir) / m.name / fmt::format("seed{}", seed)).string();
  return j;
}

std::string self_exe() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error(fmt::format("compare --jobs: cannot find this executable: {}", ec.message()));
  return p.string();
}

std::string last_line(const std::string& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  return last;
}

/// A run in a child process: `gradlora train` on the run's own config, its log in <out>/train.log.
pid_t spawn(const Job& j, const std::string& exe, const std::string& base_dir, bool resume) {
  fs::create_directories(j.o.out_dir);
  const std::string cfg = (fs::path(j.o.out_dir) / "run.yaml").string();
  write_file_atomic(cfg, to_yaml(j.tree) + "\n");
  const std::string log = (fs::path(j.o.out_dir) / "train.log").string();
  std::vector<std::string> args{exe,         "train",   "--config", cfg,          "--out",
                                j.o.out_dir, "--label", j.method,   "--base-dir", base_dir};
  if (resume) args.emplace_back("--resume");
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(fmt::format("compare --jobs: fork failed: {}", std::strerror(errno)));
  if (pid == 0) {
    ::setpgid(0, 0);  // Ctrl-C reaches the children through the parent, once each
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(exe.c_str(), argv.data());
    std::fprintf(stderr, "gradlora: error: cannot run %s: %s\n", exe.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

/// Runs `jobs` (reusing finished ones unless `fresh`), `parallel` at a time in
/// child processes, or in this process when `parallel` is 1. Returns false when
/// interrupted.
bool run_jobs(std::vector<Job>& jobs, const Settings& s, int parallel, bool fresh, const std::string& what) {
  std::vector<size_t> todo;
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = jobs[i];
    auto done = read_summary(j.o.out_dir);
    if (!fresh && done && done->hash == j.hash && !done->interrupted) {
      j.result = *done;
    } else {
      if (fresh) fs::remove(fs::path(j.o.out_dir) / "checkpoint.pt");
      todo.push_back(i);
    }
  }
  spdlog::info("{}: {} run(s), {} already complete, {} to train{}", what, jobs.size(), jobs.size() - todo.size(),
               todo.size(), parallel > 1 && !todo.empty() ? fmt::format(", {} at a time", parallel) : "");
  const auto t0 = Clock::now();
  size_t finished = 0;
  auto report = [&](const Job& j) {
    ++finished;
    const RunSummary& r = j.result;
    const double per = seconds_since(t0) / static_cast<double>(finished);
    const double eta = per * static_cast<double>(todo.size() - finished);
    const std::string what_happened = r.diverged
                                          ? "diverged"
                                          : fmt::format("validation {} held-out {} forgetting {}", fmt_num(r.val_after),
                                                        fmt_num(r.eval_after), fmt_num(r.forgetting()));
    spdlog::info("[{}/{}] {}: {}; ETA {}:{:02d}", finished, todo.size(), job_label(j), what_happened,
                 static_cast<int64_t>(eta) / 60, static_cast<int64_t>(eta) % 60);
  };
  auto resume_of = [&](const Job& j) { return !fresh && fs::exists(fs::path(j.o.out_dir) / "checkpoint.pt"); };

  if (parallel <= 1) {
    for (size_t i : todo) {
      Job& j = jobs[i];
      j.o.resume = resume_of(j);
      try {
        j.result = train_run(j.settings, j.tree, j.o);
      } catch (const SettingsError&) {
        if (!j.o.resume) throw;
        spdlog::warn("{}: the checkpoint does not fit the current settings; starting afresh", j.o.out_dir);
        j.o.resume = false;
        j.result = train_run(j.settings, j.tree, j.o);
      }
      if (j.result.interrupted) return false;
      report(j);
    }
    return true;
  }

  const std::string exe = self_exe();
  std::map<pid_t, std::pair<size_t, bool>> running;  // pid -> (job, resumed)
  size_t next = 0;
  bool stopping = false;
  std::string failure;
  auto stop_all = [&] {
    if (stopping) return;
    stopping = true;
    for (const auto& [pid, _] : running) ::kill(pid, SIGINT);  // each writes its checkpoint
  };
  while ((!stopping && next < todo.size()) || !running.empty()) {
    while (!stopping && running.size() < static_cast<size_t>(parallel) && next < todo.size()) {
      const size_t i = todo[next++];
      const bool resume = resume_of(jobs[i]);
      running[spawn(jobs[i], exe, s.base_dir, resume)] = {i, resume};
    }
    if (stop_requested()) stop_all();
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    auto it = running.find(pid);
    if (it == running.end()) continue;
    const auto [i, resumed] = it->second;
    running.erase(it);
    Job& j = jobs[i];
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    const std::string log = (fs::path(j.o.out_dir) / "train.log").string();
    auto done = read_summary(j.o.out_dir);
    if (done && done->hash == j.hash && !done->interrupted) {  // finished, or diverged (exit status 1)
      j.result = *done;
      report(j);
      continue;
    }
    if (stopping || code == 130) {
      stop_all();
      continue;
    }
    if (resumed && code == 2 && failure.empty()) {
      spdlog::warn("{}: the checkpoint does not fit the current settings; starting afresh", j.o.out_dir);
      fs::remove(fs::path(j.o.out_dir) / "checkpoint.pt");
      running[spawn(j, exe, s.base_dir, false)] = {i, false};
      continue;
    }
    if (failure.empty()) {
      failure = fmt::format("{} ({}) failed with exit status {}: {} (log: {})", job_label(j), j.o.out_dir, code,
                            last_line(log), log);
    }
    stop_all();
  }
  if (!failure.empty()) throw std::runtime_error(failure);
  return !stopping;
}

// --------------------------------------------------------------- frontier

/// Mean over `runs` of forgetting_at(level); NaN unless every run reaches it.
Stat matched(const std::vector<const RunSummary*>& runs, double level) {
  std::vector<double> v;
  for (const RunSummary* r : runs) {
    const double f = r->diverged ? kNaN : forgetting_at(r->rows, level);
    if (!std::isfinite(f)) return Stat{};
    v.push_back(f);
  }
  return stat(v);
}

struct Swept {
  std::vector<double> lrs;                                ///< as listed
  std::map<double, std::vector<const RunSummary*>> runs;  ///< per lr, over the sweep seeds
  std::map<double, Stat> val;                             ///< validation B at the end, per lr
  double chosen = kNaN;
};

/// The lowest forgetting at `level` over the swept learning rates, and the rate.
std::pair<Stat, double> envelope(const Swept& sw, double level) {
  Stat best;
  double at = kNaN;
  for (double lr : sw.lrs) {
    const Stat st = matched(sw.runs.at(lr), level);
    if (std::isfinite(st.mean) && !(best.mean <= st.mean)) {
      best = st;
      at = lr;
    }
  }
  return {best, at};
}

/// The pre-training curve of the cached model `pretrained` next to the results:
/// pretrain.csv (a copy) and pretrain.svg.
void write_pretrain_curve(const std::string& pretrained, const std::string& out_dir) {
  if (pretrained.empty() || !fs::exists(pretrain_curve_path(pretrained))) return;
  std::ifstream in(pretrain_curve_path(pretrained));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string curve = ss.str();
  write_file_atomic((fs::path(out_dir) / "pretrain.csv").string(), curve);
  Series val{"validation split of A", {}, {}, {}}, test{"held-out (test) split of A", {}, {}, {}};
  Series train{"training loss (mean since the previous point)", {}, {}, {}};
  std::istringstream lines(curve);
  std::string line;
  std::getline(lines, line);
  while (std::getline(lines, line)) {
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string c; std::getline(ls, c, ',');) f.push_back(c);
    while (f.size() < 5) f.emplace_back();
    const double step = std::stod(f[0]);
    auto add = [&](Series& se, const std::string& v) {
      if (v.empty()) return;
      se.x.push_back(step);
      se.y.push_back(std::stod(v));
    };
    add(train, f[2]);
    add(val, f[3]);
    add(test, f[4]);
  }
  Panel p{"pre-training on corpus A", "step", "nats per byte", {train, val, test}};
  write_file_atomic((fs::path(out_dir) / "pretrain.svg").string(), svg_chart({p}, "pre-training"));
}

}  // namespace

int run_compare(const Settings& s, const std::string& out_dir, bool fresh, int parallel) {
  if (!s.has_compare) throw SettingsError("config key 'compare': missing (compare needs compare.methods)");
  // Every run's settings are checked before anything is trained.
  std::vector<Job> sweep;
  std::map<std::string, Swept> swept;
  std::vector<std::string> edges;  // methods whose chosen rate is at an end of their lrs
  for (const MethodSpec& m : s.compare.methods) {
    for (double lr : m.lrs) {
      for (uint64_t seed : s.compare.sweep_seeds) sweep.push_back(make_job(s, m, seed, lr, true, out_dir));
    }
  }
  // The reported runs' settings too (the chosen rate only changes optimizer.lr).
  std::vector<Job> checked;
  for (const MethodSpec& m : s.compare.methods) {
    checked.push_back(make_job(s, m, s.compare.seeds.front(), kNaN, false, out_dir));
  }
  fs::create_directories(out_dir);

  // The pre-trained model, once, before runs in parallel would each train it.
  const Settings& first = checked.front().settings;
  std::string pretrained;
  if (first.data.has_pretrain) {
    set_threads(first.training.threads);  // as a run would: the cached model must not depend on who made it
    const Corpus pre = load_corpus(first.data.pretrain, first.base_dir, first.model.context);
    pretrained = ensure_pretrained(first, pre, first.training.cache_dir);
    if (pretrained.empty()) return 130;
  }

  if (!sweep.empty() && !run_jobs(sweep, s, parallel, fresh, "learning-rate sweep")) return 130;
  for (const Job& j : sweep) {
    Swept& sw = swept[j.method];
    if (std::find(sw.lrs.begin(), sw.lrs.end(), j.lr) == sw.lrs.end()) sw.lrs.push_back(j.lr);
    sw.runs[j.lr].push_back(&j.result);
  }
  for (auto& [name, sw] : swept) {
    for (double lr : sw.lrs) {
      std::vector<double> v;
      bool ok = true;
      for (const RunSummary* r : sw.runs[lr]) {
        ok = ok && !r->diverged && std::isfinite(r->val_after);
        v.push_back(r->val_after);
      }
      sw.val[lr] = ok ? stat(v) : Stat{};
      // The lowest mean validation loss; the rate listed first on a tie.
      if (ok && (!std::isfinite(sw.chosen) || sw.val[lr].mean < sw.val[sw.chosen].mean)) sw.chosen = lr;
    }
    if (!std::isfinite(sw.chosen)) {
      throw std::runtime_error(
          fmt::format("compare: every learning rate of '{}' diverged ({}): add smaller ones to its lrs", name,
                      fmt::join(sw.lrs, ", ")));
    }
    spdlog::info("{}: learning rate {} (validation loss {:.4f}, the lowest of {})", name, lr_text(sw.chosen),
                 sw.val[sw.chosen].mean, sw.lrs.size());
    const auto [lo_lr, hi_lr] = std::minmax_element(sw.lrs.begin(), sw.lrs.end());
    if (sw.lrs.size() > 1 && (sw.chosen == *lo_lr || sw.chosen == *hi_lr)) {
      spdlog::warn("{}: the chosen learning rate {} is the {} of its lrs: the best may lie beyond them", name,
                   lr_text(sw.chosen), sw.chosen == *lo_lr ? "smallest" : "largest");
      edges.push_back(name);
    }
  }

  std::vector<Job> main;
  for (const MethodSpec& m : s.compare.methods) {
    const double lr = swept.count(m.name) ? swept[m.name].chosen : kNaN;
    for (uint64_t seed : s.compare.seeds) main.push_back(make_job(s, m, seed, lr, false, out_dir));
  }
  if (!run_jobs(main, s, parallel, fresh, "reported runs")) return 130;
  std::map<std::string, std::vector<const RunSummary*>> by_method;
  for (const Job& j : main) by_method[j.method].push_back(&j.result);
  auto method_lr = [&](const MethodSpec& m) {
    if (swept.count(m.name)) return swept[m.name].chosen;
    const YAML::Node tree = method_tree(s, m, 0);
    return tree["optimizer"] && tree["optimizer"]["lr"] ? tree["optimizer"]["lr"].as<double>() : kNaN;
  };

  // The table.
  const bool has_val = s.data.finetune.validation > 0;
  std::string md = fmt::format(
      "| method | lr | trainable | optimizer state |{} held-out loss B (after) ↓ | forgetting: Δ held-out loss A ↓ | "
      "step (ms) | opt.step (ms) |\n|---|---:|---:|---:|{}---:|---:|---:|---:|\n",
      has_val ? " validation loss B |" : "", has_val ? "---:|" : "");
  std::string csv =
      "method,lr,lr_chosen,seeds,diverged,trainable,state_bytes,adamw_state_bytes,val_after_mean,val_after_sd,"
      "eval_after_mean,eval_after_sd,forgetting_mean,forgetting_sd,step_ms_mean,step_ms_sd,opt_ms_mean,opt_ms_sd\n";
  std::string txt = fmt::format("{:<12} {:>8} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}\n", "method", "lr", "trainable",
                                "opt. state", "held-out B", "forgetting (A)", "step ms", "opt ms");
  std::vector<Panel> panels(3);
  panels[0] = Panel{"learning: held-out loss on B", "fine-tuning step", "nats per byte", {}};
  panels[1] = Panel{"forgetting: held-out loss on A", "fine-tuning step", "nats per byte", {}};
  panels[2] = Panel{"trade-off (curves run right to left)", "held-out loss on B", "held-out loss on A", {}};
  panels[0].legend = "bottom-left";
  panels[1].legend = "top-left";
  Panel chosen_frontier{"at the chosen learning rate (mean ± sd over seeds)",
                        "held-out loss on B",
                        "forgetting: Δ held-out loss on A",
                        {}};
  Panel env_frontier{
      "lower envelope over the swept learning rates", "held-out loss on B", "forgetting: Δ held-out loss on A", {}};
  chosen_frontier.legend = env_frontier.legend = "top-right";
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;  // held-out B range of the swept curves
  for (const auto& [_, sw] : swept) {
    for (const auto& [lr, runs] : sw.runs) {
      for (const RunSummary* r : runs) {
        for (const MetricRow& row : r->rows) {
          if (std::isfinite(row.eval_loss)) lo = std::min(lo, row.eval_loss), hi = std::max(hi, row.eval_loss);
        }
      }
    }
  }
  int color = 0;
  for (const MethodSpec& m : s.compare.methods) {
    const auto& runs = by_method[m.name];
    if (runs.empty()) continue;
    std::vector<double> ev, fg, st, op, va;
    size_t diverged = 0;
    for (const RunSummary* r : runs) {
      if (r->diverged) {
        ++diverged;
        continue;
      }
      ev.push_back(r->eval_after);
      fg.push_back(r->forgetting());
      st.push_back(r->step_ms);
      op.push_back(r->opt_ms);
      if (std::isfinite(r->val_after)) va.push_back(r->val_after);
    }
    const Stat e = stat(ev), f = stat(fg), sp = stat(st), o = stat(op), v = stat(va);
    const RunSummary& r0 = *runs.front();
    const double lr = method_lr(m);
    const bool chosen = swept.count(m.name) > 0;
    const std::string lrs = std::isfinite(lr) ? lr_text(lr) : "-";
    const std::string dv = diverged ? fmt::format(" ({} of {} diverged)", diverged, runs.size()) : "";
    txt += fmt::format("{:<12} {:>8} {:>10} {:>11} {:>17} {:>17} {:>14} {:>13}{}\n", m.name, lrs + (chosen ? "*" : ""),
                       r0.trainable, human_bytes(r0.state_bytes), pm(e, 4), pm(f, 4), pm(sp, 1), pm(o, 2), dv);
    md += fmt::format("| {}{} | {}{} | {} | {} |{} {} | {} | {} | {} |\n", m.name, dv, lrs, chosen ? "*" : "",
                      r0.trainable, human_bytes(r0.state_bytes), has_val ? " " + pm(v, 4) + " |" : "", pm(e, 4),
                      pm(f, 4), pm(sp, 1), pm(o, 2));
    csv += fmt::format(
        "{},{},{},{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g}\n", m.name,
        std::isfinite(lr) ? lr_text(lr) : "", chosen ? 1 : 0, runs.size(), diverged, r0.trainable, r0.state_bytes,
        r0.adamw_state_bytes, v.mean, v.sd, e.mean, e.sd, f.mean, f.sd, sp.mean, sp.sd, o.mean, o.sd);
    // Curves: mean ± sd over seeds at each evaluated step (runs share the schedule).
    Series sb, sa, fr;
    sb.label = sa.label = fr.label = m.name;
    sb.color = sa.color = fr.color = color++;
    const size_t n = runs.front()->rows.size();
    for (size_t i = 0; i < n; ++i) {
      std::vector<double> b, a, d;
      for (const RunSummary* r : runs) {
        if (i < r->rows.size() && !r->diverged) {
          b.push_back(r->rows[i].eval_loss);
          a.push_back(r->rows[i].base_eval_loss);
          d.push_back(r->rows[i].base_eval_loss - r->rows.front().base_eval_loss);
        }
      }
      if (b.empty()) continue;
      const Stat bs = stat(b), as = stat(a), ds = stat(d);
      const double x = static_cast<double>(runs.front()->rows[i].step);
      sb.x.push_back(x);
      sb.y.push_back(bs.mean);
      sb.band.push_back(bs.sd);
      sa.x.push_back(x);
      sa.y.push_back(as.mean);
      sa.band.push_back(as.sd);
      fr.x.push_back(bs.mean);
      fr.y.push_back(ds.mean);
      fr.band.push_back(ds.sd);
    }
    Series trade;
    trade.label = m.name;
    trade.color = sb.color;
    trade.x = sb.y;
    trade.y = sa.y;
    panels[0].series.push_back(sb);
    panels[1].series.push_back(sa);
    panels[2].series.push_back(trade);
    chosen_frontier.series.push_back(fr);
    if (swept.count(m.name) && std::isfinite(lo)) {
      Series env;
      env.label = m.name;
      env.color = sb.color;
      const int points = 60;
      for (int k = 0; k <= points; ++k) {
        const double level = hi - (hi - lo) * k / points;
        const auto [st2, at] = envelope(swept[m.name], level);
        if (!std::isfinite(st2.mean)) continue;
        env.x.push_back(level);
        env.y.push_back(st2.mean);
      }
      if (!env.x.empty()) env_frontier.series.push_back(env);
    }
  }
  const bool has_base = s.data.has_pretrain || s.data.has_reference;
  if (!has_base) panels.resize(1);
  std::string seeds;
  for (uint64_t sd : s.compare.seeds) seeds += (seeds.empty() ? "" : ", ") + std::to_string(sd);
  std::string note = fmt::format(
      "mean ± sample std over seeds {}; losses in nats per byte; forgetting = held-out loss on the pre-training "
      "corpus after fine-tuning minus before; step = forward + backward + clip + opt.step ({} thread(s){})",
      seeds, s.training.threads, parallel > 1 ? fmt::format(", {} runs in parallel", parallel) : "");
  if (!swept.empty()) {
    note += fmt::format("; lr*: chosen by the lowest final validation loss on B over the swept rates (seed(s) {})",
                        fmt::join(s.compare.sweep_seeds, ", "));
  }
  std::fputs(txt.c_str(), stdout);
  std::fputs((note + "\n").c_str(), stdout);

  // The sweep: validation loss per (method, lr), and test numbers of the same runs.
  if (!swept.empty()) {
    std::set<double> all;
    for (const auto& [_, sw] : swept) all.insert(sw.lrs.begin(), sw.lrs.end());
    std::string head = "| method |", rule = "|---|";
    for (double lr : all) head += " " + lr_text(lr) + " |", rule += "---:|";
    std::string smd;
    std::string scsv = "method,lr,seed,diverged,val_after,eval_after,forgetting\n";
    const char* titles[] = {"validation loss on B after fine-tuning (bold: the chosen learning rate)",
                            "held-out (test) loss on B of the same runs",
                            "forgetting (Δ held-out loss A) of the same runs"};
    for (int table = 0; table < 3; ++table) {
      smd += fmt::format("{}:\n\n{}\n{}\n", titles[table], head, rule);
      for (const MethodSpec& m : s.compare.methods) {
        if (!swept.count(m.name)) continue;
        const Swept& sw = swept[m.name];
        std::string row = "| " + m.name + " |";
        for (double lr : all) {
          if (!sw.runs.count(lr)) {
            row += " |";
            continue;
          }
          std::vector<double> v;
          bool div = false;
          for (const RunSummary* r : sw.runs.at(lr)) {
            div = div || r->diverged;
            v.push_back(table == 0 ? r->val_after : table == 1 ? r->eval_after : r->forgetting());
          }
          const std::string cell = div ? "diverged" : pm(stat(v), 4);
          row += lr == sw.chosen && table == 0 ? " **" + cell + "** |" : " " + cell + " |";
        }
        smd += row + "\n";
      }
      smd += "\n";
    }
    if (!edges.empty()) {
      smd += fmt::format("chosen at an end of the swept rates (the best may lie beyond): {}\n", fmt::join(edges, ", "));
    }
    for (const Job& j : sweep) {
      scsv += fmt::format("{},{},{},{},{},{},{}\n", j.method, lr_text(j.lr), j.seed, j.result.diverged ? 1 : 0,
                          fmt_num(j.result.val_after), fmt_num(j.result.eval_after), fmt_num(j.result.forgetting()));
    }
    write_file_atomic((fs::path(out_dir) / "sweep.md").string(), smd);
    write_file_atomic((fs::path(out_dir) / "sweep.csv").string(), scsv);
  }

  // The frontier: forgetting at matched held-out B levels.
  if (!s.compare.levels.empty() && has_base) {
    std::string head = "| held-out B reached |", rule = "|---|";
    for (const MethodSpec& m : s.compare.methods) head += " " + m.name + " |", rule += "---:|";
    std::string fmd = fmt::format(
        "forgetting at matched learning, at the chosen learning rates (mean ± sd over seeds {}; —: not every seed "
        "got there):\n\n{}\n{}\n",
        seeds, head, rule);
    std::string fcsv = "level,method,kind,lr,mean,sd,n\n";
    for (double level : s.compare.levels) {
      std::string row = fmt::format("| {:g} |", level);
      for (const MethodSpec& m : s.compare.methods) {
        const Stat st = matched(by_method[m.name], level);
        row += std::isfinite(st.mean) ? " " + pm(st, 3) + " |" : " — |";
        const double lr = method_lr(m);
        fcsv += fmt::format("{:g},{},chosen,{},{},{},{}\n", level, m.name, std::isfinite(lr) ? lr_text(lr) : "",
                            fmt_num(st.mean), fmt_num(st.sd), std::isfinite(st.mean) ? st.n : 0);
      }
      fmd += row + "\n";
    }
    if (!swept.empty()) {
      std::string h2 = "| held-out B reached |", r2 = "|---|";
      for (const MethodSpec& m : s.compare.methods) {
        if (swept.count(m.name)) h2 += " " + m.name + " |", r2 += "---:|";
      }
      fmd += fmt::format(
          "\nthe least forgetting over the swept learning rates (the lower envelope; seed(s) {}), and the "
          "rate:\n\n{}\n{}\n",
          fmt::join(s.compare.sweep_seeds, ", "), h2, r2);
      for (double level : s.compare.levels) {
        std::string row = fmt::format("| {:g} |", level);
        for (const MethodSpec& m : s.compare.methods) {
          if (!swept.count(m.name)) continue;
          const auto [st, at] = envelope(swept[m.name], level);
          row += std::isfinite(st.mean) ? fmt::format(" {} (lr {}) |", pm(st, 3), lr_text(at)) : " — |";
          fcsv += fmt::format("{:g},{},envelope,{},{},{},{}\n", level, m.name, std::isfinite(at) ? lr_text(at) : "",
                              fmt_num(st.mean), fmt_num(st.sd), std::isfinite(st.mean) ? st.n : 0);
        }
        fmd += row + "\n";
      }
    }
    write_file_atomic((fs::path(out_dir) / "frontier.md").string(), fmd);
    write_file_atomic((fs::path(out_dir) / "frontier.csv").string(), fcsv);
    std::fputs(("\n" + fmd).c_str(), stdout);
  }
  if (has_base) {
    std::vector<Panel> fp{chosen_frontier};
    if (!env_frontier.series.empty()) fp.push_back(env_frontier);
    write_file_atomic((fs::path(out_dir) / "frontier.svg").string(),
                      svg_chart(fp, "forgetting against learning (curves run right to left as training goes on)"));
  }

  write_pretrain_curve(pretrained, out_dir);
  std::fflush(stdout);
  write_file_atomic((fs::path(out_dir) / "results.md").string(), md + "\n" + note + "\n");
  write_file_atomic((fs::path(out_dir) / "results.csv").string(), csv);
  write_file_atomic(
      (fs::path(out_dir) / "compare.svg").string(),
      svg_chart(panels, fmt::format("continual fine-tuning, mean ± sd over {} seed(s)", s.compare.seeds.size())));
  spdlog::info("wrote {}/results.md, results.csv, compare.svg{}", out_dir,
               swept.empty() ? "" : ", sweep.md, sweep.csv, frontier.md, frontier.csv, frontier.svg");
  return 0;
}

}  // namespace gradlora::app
