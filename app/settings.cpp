// The trainer's YAML sections: parsing, validation, --set overrides.
#include "settings.h"

#include "yaml_text.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace gradlora::app {

namespace {

using yaml_text::show;
using yaml_text::where;

[[noreturn]] void fail(const std::string& key, const std::string& what) {
  throw SettingsError(fmt::format("config key '{}': {}", key, what));
}

[[noreturn]] void type_error(const std::string& key, const char* expected, const YAML::Node& n) {
  fail(key, fmt::format("expected {}, got {}{}", expected, show(n), where(n)));
}

int64_t as_int(const YAML::Node& n, const std::string& key) {
  long long v = 0;
  if (!n.IsScalar() || !YAML::convert<long long>::decode(n, v)) type_error(key, "an integer", n);
  return static_cast<int64_t>(v);
}

uint64_t as_uint(const YAML::Node& n, const std::string& key) {
  unsigned long long v = 0;
  if (!n.IsScalar() || n.Scalar().empty() || n.Scalar()[0] == '-' || !YAML::convert<unsigned long long>::decode(n, v)) {
    type_error(key, "a non-negative integer", n);
  }
  return static_cast<uint64_t>(v);
}

double as_double(const YAML::Node& n, const std::string& key) {
  double v = 0;
  if (!n.IsScalar() || !YAML::convert<double>::decode(n, v)) type_error(key, "a number", n);
  return v;
}

std::string as_string(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "a string", n);
  return n.Scalar();
}

void check_keys(const YAML::Node& map, const std::string& prefix, const std::set<std::string>& allowed) {
  if (!map.IsMap()) type_error(prefix, "a mapping", map);
  for (const auto& kv : map) {
    const std::string k = kv.first.Scalar();
    if (allowed.count(k)) continue;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    fail(prefix + "." + k, fmt::format("unknown key{} (known keys: {})", where(kv.first), list));
  }
}

int64_t positive(const YAML::Node& n, const std::string& key, int64_t fallback, int64_t min = 1) {
  if (!n) return fallback;
  const int64_t v = as_int(n, key);
  if (v < min) fail(key, fmt::format("must be at least {}, got {}", min, v));
  return v;
}

ModelSettings parse_model(const YAML::Node& n, const std::string& base_dir) {
  ModelSettings m;
  if (!n) return m;
  if (!n.IsMap()) type_error("model", "a mapping", n);
  if (n["type"]) m.type = as_string(n["type"], "model.type");
  if (m.type == "torchscript") {
    check_keys(n, "model", {"type", "path", "context"});
    if (!n["path"]) fail("model.path", "missing: the TorchScript file to fine-tune (torch.jit.save in Python)");
    m.path = as_string(n["path"], "model.path");
    if (m.path.empty()) fail("model.path", "is empty");
    if (std::filesystem::path(m.path).is_relative()) m.path = (std::filesystem::path(base_dir) / m.path).string();
    m.context = positive(n["context"], "model.context", m.context, 2);
    return m;
  }
  if (m.type != "char_transformer") {
    fail("model.type", fmt::format("unknown model type '{}' (known: char_transformer, torchscript)", m.type));
  }
  check_keys(n, "model", {"type", "layers", "d_model", "heads", "context", "mlp_ratio"});
  m.layers = positive(n["layers"], "model.layers", m.layers);
  m.d_model = positive(n["d_model"], "model.d_model", m.d_model);
  m.heads = positive(n["heads"], "model.heads", m.heads);
  m.context = positive(n["context"], "model.context", m.context, 2);
  m.mlp_ratio = positive(n["mlp_ratio"], "model.mlp_ratio", m.mlp_ratio);
  if (m.d_model % m.heads != 0) {
    fail("model.heads", fmt::format("{} heads do not divide model.d_model = {}", m.heads, m.d_model));
  }
  return m;
}

CorpusSettings parse_corpus(const YAML::Node& n, const std::string& key, bool evaluation_only = false) {
  CorpusSettings c;
  c.key = key;
  c.evaluation_only = evaluation_only;
  if (!n.IsMap()) type_error(key, "a mapping with 'files'", n);
  if (evaluation_only) {
    check_keys(n, key, {"files", "format"});
  } else {
    check_keys(n, key, {"files", "format", "holdout", "validation"});
  }
  const YAML::Node f = n["files"];
  if (!f) fail(key + ".files", "missing (a file, a directory, or a list of them)");
  if (f.IsScalar()) {
    c.files.push_back(f.Scalar());
  } else if (f.IsSequence()) {
    for (size_t i = 0; i < f.size(); ++i) c.files.push_back(as_string(f[i], fmt::format("{}.files[{}]", key, i)));
  } else {
    type_error(key + ".files", "a path or a list of paths", f);
  }
  if (c.files.empty()) fail(key + ".files", "the list is empty");
  if (n["format"]) c.format = as_string(n["format"], key + ".format");
  if (c.format != "bytes" && c.format != "u16" && c.format != "u32") {
    fail(key + ".format",
         fmt::format("unknown format '{}' (known: bytes, u16, u32: flat little-endian token ids)", c.format));
  }
  if (n["holdout"]) c.holdout = as_double(n["holdout"], key + ".holdout");
  if (!(c.holdout > 0.0 && c.holdout < 1.0)) {
    fail(key + ".holdout", fmt::format("must lie strictly between 0 and 1, got {}", c.holdout));
  }
  if (n["validation"]) c.validation = as_double(n["validation"], key + ".validation");
  if (!(c.validation >= 0.0 && c.validation + c.holdout < 1.0)) {
    fail(key + ".validation",
         fmt::format("must be >= 0 and leave training data (validation + holdout < 1), got {} with holdout {}",
                     c.validation, c.holdout));
  }
  return c;
}

DataSettings parse_data(const YAML::Node& n) {
  if (!n) fail("data", "missing (needs at least data.finetune.files)");
  check_keys(n, "data", {"finetune", "pretrain", "reference"});
  DataSettings d;
  if (!n["finetune"]) fail("data.finetune", "missing");
  d.finetune = parse_corpus(n["finetune"], "data.finetune");
  if (n["pretrain"] && !n["pretrain"].IsNull()) {  // `pretrain: null` (or --set data.pretrain=null) turns it off
    d.has_pretrain = true;
    d.pretrain = parse_corpus(n["pretrain"], "data.pretrain");
  }
  if (n["reference"] && !n["reference"].IsNull()) {
    d.has_reference = true;
    d.reference = parse_corpus(n["reference"], "data.reference", /*evaluation_only=*/true);
  }
  return d;
}

TrainingSettings parse_training(const YAML::Node& n) {
  TrainingSettings t;
  if (!n) return t;
  const std::string p = "training";
  check_keys(n, p,
             {"steps", "batch", "threads", "device", "warmup", "schedule", "min_lr_ratio", "grad_clip", "eval_every",
              "eval_windows", "log_every", "checkpoint_every", "halt_after", "cache_dir", "pretrain"});
  t.steps = positive(n["steps"], p + ".steps", t.steps);
  t.batch = positive(n["batch"], p + ".batch", t.batch);
  t.threads = positive(n["threads"], p + ".threads", t.threads);
  if (n["device"]) t.device = as_string(n["device"], p + ".device");
  {
    const std::string& d = t.device;
    const bool cuda_index =
        d.rfind("cuda:", 0) == 0 && d.size() > 5 && d.find_first_not_of("0123456789", 5) == std::string::npos;
    if (d != "cpu" && d != "cuda" && !cuda_index) {
      fail(p + ".device", fmt::format("must be cpu, cuda or cuda:N, got '{}'", d));
    }
  }
  t.warmup = positive(n["warmup"], p + ".warmup", t.warmup, 0);
  if (n["schedule"]) t.schedule = as_string(n["schedule"], p + ".schedule");
  if (t.schedule != "cosine" && t.schedule != "constant") {
    fail(p + ".schedule", fmt::format("unknown schedule '{}' (known: cosine, constant)", t.schedule));
  }
  if (n["min_lr_ratio"]) t.min_lr_ratio = as_double(n["min_lr_ratio"], p + ".min_lr_ratio");
  if (!(t.min_lr_ratio >= 0.0 && t.min_lr_ratio <= 1.0)) {
    fail(p + ".min_lr_ratio", fmt::format("must lie in [0, 1], got {}", t.min_lr_ratio));
  }
  if (n["grad_clip"]) t.grad_clip = as_double(n["grad_clip"], p + ".grad_clip");
  if (!(t.grad_clip >= 0.0)) fail(p + ".grad_clip", fmt::format("must be >= 0, got {}", t.grad_clip));
  t.eval_every = positive(n["eval_every"], p + ".eval_every", t.eval_every);
  t.eval_windows = positive(n["eval_windows"], p + ".eval_windows", t.eval_windows);
  t.log_every = positive(n["log_every"], p + ".log_every", t.log_every);
  t.checkpoint_every = positive(n["checkpoint_every"], p + ".checkpoint_every", t.checkpoint_every);
  t.halt_after = positive(n["halt_after"], p + ".halt_after", t.halt_after, 0);
  if (n["cache_dir"]) t.cache_dir = as_string(n["cache_dir"], p + ".cache_dir");
  if (const YAML::Node q = n["pretrain"]) {
    const std::string pp = p + ".pretrain";
    check_keys(q, pp, {"steps", "lr", "weight_decay", "warmup", "seed", "plateau"});
    t.pretrain.steps = positive(q["steps"], pp + ".steps", t.pretrain.steps);
    if (q["lr"]) t.pretrain.lr = as_double(q["lr"], pp + ".lr");
    if (!(t.pretrain.lr > 0.0)) fail(pp + ".lr", fmt::format("must be > 0, got {}", t.pretrain.lr));
    if (q["weight_decay"]) t.pretrain.weight_decay = as_double(q["weight_decay"], pp + ".weight_decay");
    t.pretrain.warmup = positive(q["warmup"], pp + ".warmup", t.pretrain.warmup, 0);
    if (q["seed"]) t.pretrain.seed = as_uint(q["seed"], pp + ".seed");
    if (const YAML::Node pl = q["plateau"]; pl && !pl.IsNull()) {
      const std::string k = pp + ".plateau";
      if (!pl.IsMap()) type_error(k, "a mapping (eval_every, window, min_delta, cooldown)", pl);
      check_keys(pl, k, {"eval_every", "window", "min_delta", "cooldown"});
      auto& P = t.pretrain.plateau;
      t.pretrain.has_plateau = true;
      P.eval_every = positive(pl["eval_every"], k + ".eval_every", P.eval_every);
      P.window = positive(pl["window"], k + ".window", P.window);
      P.cooldown = positive(pl["cooldown"], k + ".cooldown", P.cooldown, 0);
      if (pl["min_delta"]) P.min_delta = as_double(pl["min_delta"], k + ".min_delta");
      if (!(P.min_delta >= 0.0)) fail(k + ".min_delta", fmt::format("must be >= 0, got {}", P.min_delta));
      if (P.window % P.eval_every != 0) {
        fail(k + ".window", fmt::format("must be a multiple of eval_every ({}), got {}", P.eval_every, P.window));
      }
    }
  }
  return t;
}

bool safe_name(const std::string& s) {
  if (s.empty() || s[0] == '.') return false;
  for (char c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-' && c != '.') return false;
  }
  return true;
}

const std::set<std::string> kMethodKeys = {"name",    "set",          "optimizer",          "targets",
                                           "default", "on_nonfinite", "fuse_into_backward", "allow_unmatched_targets",
                                           "lrs"};

std::vector<uint64_t> seed_list(const YAML::Node& s, const std::string& key) {
  if (!s.IsSequence() || s.size() == 0) type_error(key, "a non-empty list of seeds", s);
  std::vector<uint64_t> out;
  for (size_t i = 0; i < s.size(); ++i) out.push_back(as_uint(s[i], fmt::format("{}[{}]", key, i)));
  return out;
}

CompareSettings parse_compare(const YAML::Node& n) {
  CompareSettings c;
  check_keys(n, "compare", {"seeds", "sweep_seeds", "levels", "methods", "quick"});
  if (const YAML::Node s = n["seeds"]) c.seeds = seed_list(s, "compare.seeds");
  if (const YAML::Node s = n["sweep_seeds"]) c.sweep_seeds = seed_list(s, "compare.sweep_seeds");
  if (const YAML::Node l = n["levels"]) {
    if (!l.IsSequence()) type_error("compare.levels", "a list of held-out losses", l);
    for (size_t i = 0; i < l.size(); ++i) {
      const std::string k = fmt::format("compare.levels[{}]", i);
      c.levels.push_back(as_double(l[i], k));
      if (!(c.levels.back() > 0.0)) fail(k, fmt::format("must be a loss > 0, got {}", c.levels.back()));
    }
  }
  const YAML::Node ms = n["methods"];
  if (!ms) fail("compare.methods", "missing (a list of methods to compare)");
  if (!ms.IsSequence() || ms.size() == 0) type_error("compare.methods", "a non-empty list of methods", ms);
  std::set<std::string> names;
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string p = fmt::format("compare.methods[{}]", i);
    check_keys(ms[i], p, kMethodKeys);
    if (!ms[i]["name"]) fail(p + ".name", "missing");
    MethodSpec m{as_string(ms[i]["name"], p + ".name"), ms[i], {}};
    if (!safe_name(m.name)) {
      fail(p + ".name", fmt::format("'{}' is not a usable folder name (letters, digits, _ - .)", m.name));
    }
    if (!names.insert(m.name).second) fail(p + ".name", fmt::format("method '{}' is listed twice", m.name));
    const YAML::Node set = ms[i]["set"];
    if (set && !set.IsMap()) type_error(p + ".set", "a mapping of key: value", set);
    if (const YAML::Node l = ms[i]["lrs"]) {
      if (!l.IsSequence() || l.size() == 0) type_error(p + ".lrs", "a non-empty list of learning rates", l);
      for (size_t j = 0; j < l.size(); ++j) {
        const std::string k = fmt::format("{}.lrs[{}]", p, j);
        const double lr = as_double(l[j], k);
        if (!(lr > 0.0)) fail(k, fmt::format("must be > 0, got {}", lr));
        if (std::find(m.lrs.begin(), m.lrs.end(), lr) != m.lrs.end()) {
          fail(k, fmt::format("{} is listed twice", lr));
        }
        m.lrs.push_back(lr);
      }
    }
    c.methods.push_back(std::move(m));
  }
  if (const YAML::Node q = n["quick"]) {
    if (!q.IsMap()) type_error("compare.quick", "a mapping of key: value overrides", q);
    for (const auto& kv : q) c.quick.emplace_back(kv.first.Scalar(), to_yaml(kv.second));
  }
  return c;
}

// One path segment: a key, optionally followed by [index].
struct Segment {
  std::string key;
  int64_t index = -1;
};

std::vector<Segment> split_key(const std::string& key) {
  std::vector<Segment> out;
  std::stringstream ss(key);
  std::string part;
  while (std::getline(ss, part, '.')) {
    Segment s;
    const auto lb = part.find('[');
    if (lb != std::string::npos) {
      if (part.back() != ']') throw SettingsError(fmt::format("--set '{}': malformed index in '{}'", key, part));
      try {
        s.index = std::stoll(part.substr(lb + 1, part.size() - lb - 2));
      } catch (const std::exception&) {
        throw SettingsError(fmt::format("--set '{}': malformed index in '{}'", key, part));
      }
      part = part.substr(0, lb);
    }
    if (part.empty()) throw SettingsError(fmt::format("--set '{}': empty key segment", key));
    s.key = part;
    out.push_back(s);
  }
  if (out.empty()) throw SettingsError("--set: empty key");
  return out;
}

}  // namespace

std::pair<std::string, std::string> split_override(const std::string& s) {
  const auto eq = s.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw SettingsError(fmt::format("--set '{}': expected key=value, e.g. training.steps=10", s));
  }
  return {s.substr(0, eq), s.substr(eq + 1)};
}

void apply_override(YAML::Node& root, const std::string& key, const std::string& value) {
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    throw SettingsError(fmt::format("--set '{}={}': the value is not valid YAML ({})", key, value, e.what()));
  }
  if (const std::string dup = yaml_text::duplicate_key(parsed, key); !dup.empty()) {
    throw SettingsError(fmt::format("--set '{}={}': {}", key, value, dup));
  }
  const auto segs = split_key(key);
  // yaml-cpp nodes are handles: walk with reset() so that assignment writes into the tree.
  YAML::Node cur;
  cur.reset(root);
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    const bool last = i + 1 == segs.size();
    if (!cur.IsMap() && !cur.IsNull()) {
      throw SettingsError(fmt::format("--set '{}': '{}' is inside {}, not a mapping", key, s.key, show(cur)));
    }
    if (s.index < 0) {
      if (last) {
        cur[s.key] = parsed;
        return;
      }
      YAML::Node next = cur[s.key];
      if (!next.IsDefined() || next.IsNull()) cur[s.key] = YAML::Node(YAML::NodeType::Map);
      YAML::Node child = cur[s.key];
      cur.reset(child);
    } else {
      YAML::Node list = cur[s.key];
      if (!list.IsSequence() || s.index >= static_cast<int64_t>(list.size())) {
        throw SettingsError(fmt::format("--set '{}': '{}' has no element [{}]", key, s.key, s.index));
      }
      if (last) {
        list[static_cast<size_t>(s.index)] = parsed;
        return;
      }
      YAML::Node child = list[static_cast<size_t>(s.index)];
      cur.reset(child);
    }
  }
}

Settings parse_settings(const YAML::Node& root, const std::string& base_dir, const std::string& source) {
  if (!root.IsMap()) throw SettingsError(fmt::format("config '{}': expected a mapping at the top level", source));
  Settings s;
  s.root = root;
  s.base_dir = base_dir;
  s.source = source;
  if (root["seed"]) s.seed = as_uint(root["seed"], "seed");
  s.model = parse_model(root["model"], base_dir);
  s.data = parse_data(root["data"]);
  if (s.model.torchscript() && s.data.has_pretrain) {
    fail("data.pretrain",
         "pre-training is for the built-in model (model.type char_transformer); a TorchScript model comes trained: "
         "give held-out data of what it knew as data.reference to measure forgetting");
  }
  s.training = parse_training(root["training"]);
  if (s.training.pretrain.has_plateau && s.data.has_pretrain && !(s.data.pretrain.validation > 0.0)) {
    fail("training.pretrain.plateau",
         "detecting the plateau needs a validation split of the pre-training corpus: set data.pretrain.validation "
         "(e.g. 0.1)");
  }
  if (root["compare"]) {
    s.has_compare = true;
    s.compare = parse_compare(root["compare"]);
    for (size_t i = 0; i < s.compare.methods.size(); ++i) {
      if (!s.compare.methods[i].lrs.empty() && !(s.data.finetune.validation > 0.0)) {
        fail(fmt::format("compare.methods[{}].lrs", i),
             fmt::format("choosing the learning rate of '{}' needs a validation split of the fine-tuning corpus: set "
                         "data.finetune.validation (e.g. 0.1)",
                         s.compare.methods[i].name));
      }
    }
  }
  return s;
}

Settings load_settings(const std::string& path, const std::vector<std::pair<std::string, std::string>>& overrides,
                       bool quick) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw SettingsError(fmt::format("config file '{}': cannot be opened", path));
  std::stringstream ss;
  ss << in.rdbuf();
  YAML::Node root;
  try {
    root = YAML::Load(ss.str());
  } catch (const YAML::Exception& e) {
    throw SettingsError(fmt::format("config file '{}': not valid YAML: {}", path, e.what()));
  }
  // As written in the file, before --set replaces keys: a lookup would silently take the first of two.
  if (const std::string dup = yaml_text::duplicate_key(root); !dup.empty()) {
    throw SettingsError(fmt::format("config file '{}': {}", path, dup));
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (quick) {
    const YAML::Node croot = root;
    const YAML::Node q = croot["compare"] ? croot["compare"]["quick"] : YAML::Node();
    if (!q) throw SettingsError(fmt::format("config file '{}': --quick needs a compare.quick section", path));
    if (!q.IsMap()) type_error("compare.quick", "a mapping of key: value overrides", q);
    std::vector<std::pair<std::string, std::string>> qs;
    for (const auto& kv : q) qs.emplace_back(kv.first.Scalar(), to_yaml(kv.second));
    for (const auto& [k, v] : qs) apply_override(root, k, v);
  }
  for (const auto& [k, v] : overrides) apply_override(root, k, v);
  const std::string base = std::filesystem::absolute(path).parent_path().string();
  try {
    return parse_settings(root, base, path);
  } catch (const YAML::Exception& e) {
    throw SettingsError(fmt::format("config file '{}': malformed YAML: {}", path, e.what()));
  }
}

YAML::Node method_tree(const Settings& s, const MethodSpec& m, uint64_t seed) {
  YAML::Node root = YAML::Clone(s.root);
  root.remove("compare");
  for (const auto& kv : m.node) {
    const std::string k = kv.first.Scalar();
    if (k == "name" || k == "set" || k == "lrs") continue;
    if (k == "optimizer" && kv.second.IsMap() && root["optimizer"] && root["optimizer"].IsMap()) {
      for (const auto& o : kv.second) root["optimizer"][o.first.Scalar()] = YAML::Clone(o.second);
    } else {
      root[k] = YAML::Clone(kv.second);
    }
  }
  if (const YAML::Node set = m.node["set"]) {
    for (const auto& kv : set) apply_override(root, kv.first.Scalar(), to_yaml(kv.second));
  }
  root["seed"] = seed;
  return root;
}

std::string to_yaml(const YAML::Node& root) {
  YAML::Emitter e;
  e << root;
  return e.c_str();
}

std::string stable_hash(const std::string& text) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return fmt::format("{:016x}", h);
}

}  // namespace gradlora::app
