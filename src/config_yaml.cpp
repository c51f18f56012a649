// YAML → Config. The only translation unit that knows yaml-cpp.
#include <gradlora/config.h>
#include <gradlora/method.h>

#include "yaml_text.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>
#include <sstream>

namespace gradlora {

namespace {

using yaml_text::show;
using yaml_text::where;

[[noreturn]] void type_error(const std::string& key, const char* expected, const YAML::Node& n) {
  throw ConfigError(fmt::format("config key '{}': expected {}, got {}{}", key, expected, show(n), where(n)));
}

double as_double(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "a number", n);
  double v = 0;
  if (!YAML::convert<double>::decode(n, v)) type_error(key, "a number", n);
  return v;
}

int64_t as_int(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "an integer", n);
  long long v = 0;
  if (!YAML::convert<long long>::decode(n, v)) type_error(key, "an integer", n);
  return static_cast<int64_t>(v);
}

uint64_t as_uint(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "a non-negative integer", n);
  unsigned long long v = 0;
  const std::string& s = n.Scalar();
  if (s.empty() || s[0] == '-' || !YAML::convert<unsigned long long>::decode(n, v)) {
    type_error(key, "a non-negative integer", n);
  }
  return static_cast<uint64_t>(v);
}

bool as_bool(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "true or false", n);
  bool v = false;
  if (!YAML::convert<bool>::decode(n, v)) type_error(key, "true or false", n);
  return v;
}

std::string as_string(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) type_error(key, "a string", n);
  return n.Scalar();
}

void check_keys(const YAML::Node& map, const std::string& prefix, const std::set<std::string>& allowed,
                const std::set<std::string>& ignored = {}) {
  for (const auto& kv : map) {
    if (!kv.first.IsScalar()) type_error(prefix.empty() ? "(top level)" : prefix, "string keys", kv.first);
    const std::string k = kv.first.Scalar();
    if (allowed.count(k) || ignored.count(k)) continue;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    throw ConfigError(fmt::format("config key '{}{}': unknown key{} (known keys: {})",
                                  prefix.empty() ? "" : prefix + ".", k, where(kv.first), list));
  }
}

InnerConfig parse_optimizer(const YAML::Node& n) {
  const std::string p = "optimizer";
  if (!n.IsMap()) type_error(p, "a mapping", n);
  check_keys(n, p, {"type", "lr", "betas", "eps", "weight_decay", "amsgrad", "momentum", "dampening", "nesterov"});
  InnerConfig c;
  if (n["type"]) c.type = parse_inner_type(as_string(n["type"], p + ".type"), p + ".type");
  if (n["lr"]) c.lr = as_double(n["lr"], p + ".lr");
  if (n["betas"]) {
    const YAML::Node b = n["betas"];
    if (!b.IsSequence() || b.size() != 2) type_error(p + ".betas", "a list of two numbers", b);
    c.betas[0] = as_double(b[0], p + ".betas[0]");
    c.betas[1] = as_double(b[1], p + ".betas[1]");
  }
  if (n["eps"]) c.eps = as_double(n["eps"], p + ".eps");
  if (n["weight_decay"]) c.weight_decay = as_double(n["weight_decay"], p + ".weight_decay");
  if (n["amsgrad"]) c.amsgrad = as_bool(n["amsgrad"], p + ".amsgrad");
  if (n["momentum"]) c.momentum = as_double(n["momentum"], p + ".momentum");
  if (n["dampening"]) c.dampening = as_double(n["dampening"], p + ".dampening");
  if (n["nesterov"]) c.nesterov = as_bool(n["nesterov"], p + ".nesterov");
  return c;
}

// A method's own option, read as the type its declaration gives.
OptionValue parse_option(const YAML::Node& n, const OptionSpec& spec, const std::string& key) {
  switch (spec.default_value.index()) {
    case 0:
      return as_bool(n, key);
    case 1:
      return as_int(n, key);
    case 2:
      return as_double(n, key);
    default:
      return as_string(n, key);
  }
}

Target parse_target(const YAML::Node& n, size_t i) {
  const std::string p = fmt::format("targets[{}]", i);
  if (!n.IsMap()) type_error(p, "a mapping", n);
  Target t;
  if (!n["match"]) throw ConfigError(fmt::format("config key '{}.match': missing{}", p, where(n)));
  t.match = as_string(n["match"], p + ".match");
  if (n["method"]) t.method = parse_method(as_string(n["method"], p + ".method"), p + ".method");
  // The keys every method shares, then the method's own options.
  std::set<std::string> keys{"match", "method",       "rank",      "alpha",       "init",          "init_std",
                             "lr",    "weight_decay", "writeback", "on_resample", "fan_in_fan_out"};
  const MethodInfo& info = method_info(t.method);
  for (const auto& o : info.options) keys.insert(o.key);
  check_keys(n, p, keys);
  if (n["rank"]) t.rank = as_int(n["rank"], p + ".rank");
  if (n["alpha"]) t.alpha = as_double(n["alpha"], p + ".alpha");
  if (n["init"]) t.init = parse_init(as_string(n["init"], p + ".init"), p + ".init");
  if (n["init_std"]) t.init_std = as_double(n["init_std"], p + ".init_std");
  if (n["lr"]) t.lr = as_double(n["lr"], p + ".lr");
  if (n["weight_decay"]) t.weight_decay = as_double(n["weight_decay"], p + ".weight_decay");
  if (n["writeback"]) t.writeback = parse_writeback(as_string(n["writeback"], p + ".writeback"), p + ".writeback");
  if (n["on_resample"]) {
    t.on_resample = parse_on_resample(as_string(n["on_resample"], p + ".on_resample"), p + ".on_resample");
  }
  if (n["fan_in_fan_out"]) t.fan_in_fan_out = as_bool(n["fan_in_fan_out"], p + ".fan_in_fan_out");
  for (const auto& o : info.options) {
    if (n[o.key]) t.options[o.key] = parse_option(n[o.key], o, p + "." + o.key);
  }
  return t;
}

}  // namespace

Config Config::from_yaml_string(const std::string& text) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(fmt::format("config: not valid YAML: {}", e.what()));
  }
  // Before anything reads a key: a lookup would silently take the first of two.
  if (const std::string dup = yaml_text::duplicate_key(root); !dup.empty()) throw ConfigError(dup);
  Config c;
  if (root.IsNull()) {
    c.validate();
    return c;
  }
  if (!root.IsMap()) type_error("(top level)", "a mapping", root);
  try {
    // Sections the optimizer does not read: the trainer's (model, data, training, …).
    check_keys(root, "",
               {"seed", "optimizer", "targets", "default", "allow_unmatched_targets", "on_nonfinite",
                "fuse_into_backward", "log_report", "max_grad_norm", "diagnostics"},
               {"model", "data", "training", "compare", "experiment", "distributed"});
    if (root["seed"]) c.seed = as_uint(root["seed"], "seed");
    if (root["optimizer"]) c.optimizer = parse_optimizer(root["optimizer"]);
    if (root["targets"]) {
      const YAML::Node ts = root["targets"];
      if (!ts.IsSequence()) type_error("targets", "a list of targets", ts);
      for (size_t i = 0; i < ts.size(); ++i) c.targets.push_back(parse_target(ts[i], i));
    }
    if (root["default"]) c.default_method = parse_method(as_string(root["default"], "default"), "default");
    if (root["allow_unmatched_targets"]) {
      c.allow_unmatched_targets = as_bool(root["allow_unmatched_targets"], "allow_unmatched_targets");
    }
    if (root["on_nonfinite"]) {
      c.on_nonfinite = parse_on_nonfinite(as_string(root["on_nonfinite"], "on_nonfinite"), "on_nonfinite");
    }
    if (root["fuse_into_backward"]) c.fuse_into_backward = as_bool(root["fuse_into_backward"], "fuse_into_backward");
    if (root["log_report"]) c.log_report = as_bool(root["log_report"], "log_report");
    if (root["max_grad_norm"]) c.max_grad_norm = as_double(root["max_grad_norm"], "max_grad_norm");
    if (root["diagnostics"]) c.diagnostics = as_bool(root["diagnostics"], "diagnostics");
  } catch (const YAML::Exception& e) {
    throw ConfigError(fmt::format("config: malformed YAML: {}", e.what()));
  }
  c.validate();
  return c;
}

Config Config::from_yaml_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(fmt::format("config file '{}': cannot be opened", path));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return from_yaml_string(ss.str());
  } catch (const ConfigError& e) {
    throw ConfigError(fmt::format("config file '{}': {}", path, e.what()));
  }
}

}  // namespace gradlora
