#include <gradlora/config.h>
#include <gradlora/method.h>

#include <fmt/format.h>

#include <cmath>
#include <regex>

namespace gradlora {

namespace {

template <typename E, size_t N>
E parse_enum(const std::string& s, const std::string& key, const char* const (&names)[N], const E (&values)[N]) {
  for (size_t i = 0; i < N; ++i) {
    if (s == names[i]) return values[i];
  }
  std::string allowed;
  for (size_t i = 0; i < N; ++i) {
    allowed += (i ? " | " : "");
    allowed += names[i];
  }
  throw ConfigError(fmt::format("config key '{}': unknown value '{}' (expected {})", key, s, allowed));
}

const char* const kInits[] = {"zero", "symmetric", "gradient"};
const Init kInitValues[] = {Init::zero, Init::symmetric, Init::gradient};
const char* const kWriteBacks[] = {"auto", "incremental", "exact"};
const WriteBack kWriteBackValues[] = {WriteBack::automatic, WriteBack::incremental, WriteBack::exact};
const char* const kInnerTypes[] = {"sgd", "adam", "adamw", "adamw_hf"};
const InnerType kInnerTypeValues[] = {InnerType::sgd, InnerType::adam, InnerType::adamw, InnerType::adamw_hf};
const char* const kOnResample[] = {"keep", "reset", "transfer"};
const OnResample kOnResampleValues[] = {OnResample::keep, OnResample::reset, OnResample::transfer};
const char* const kOnNonFinite[] = {"skip", "error"};
const OnNonFinite kOnNonFiniteValues[] = {OnNonFinite::skip, OnNonFinite::error};

template <typename E, size_t N>
const char* name_of(E e, const char* const (&names)[N], const E (&values)[N]) {
  for (size_t i = 0; i < N; ++i) {
    if (values[i] == e) return names[i];
  }
  return "?";
}

bool glob_match(const char* p, const char* s) {
  // Iterative glob with backtracking on the last '*'.
  const char* star = nullptr;
  const char* ss = nullptr;
  while (*s) {
    if (*p == '?' || *p == *s) {
      ++p;
      ++s;
    } else if (*p == '*') {
      star = p++;
      ss = s;
    } else if (star) {
      p = star + 1;
      s = ++ss;
    } else {
      return false;
    }
  }
  while (*p == '*') ++p;
  return *p == '\0';
}

}  // namespace

const std::string& to_string(const Method& m) { return m.name(); }
const char* to_string(Init i) { return name_of(i, kInits, kInitValues); }
const char* to_string(WriteBack w) { return name_of(w, kWriteBacks, kWriteBackValues); }
const char* to_string(InnerType t) { return name_of(t, kInnerTypes, kInnerTypeValues); }
const char* to_string(OnResample o) { return name_of(o, kOnResample, kOnResampleValues); }
const char* to_string(OnNonFinite o) { return name_of(o, kOnNonFinite, kOnNonFiniteValues); }

Method parse_method(const std::string& s, const std::string& key) { return Method(method_info(s, key).name); }
Init parse_init(const std::string& s, const std::string& key) { return parse_enum(s, key, kInits, kInitValues); }
WriteBack parse_writeback(const std::string& s, const std::string& key) {
  return parse_enum(s, key, kWriteBacks, kWriteBackValues);
}
InnerType parse_inner_type(const std::string& s, const std::string& key) {
  return parse_enum(s, key, kInnerTypes, kInnerTypeValues);
}
OnResample parse_on_resample(const std::string& s, const std::string& key) {
  return parse_enum(s, key, kOnResample, kOnResampleValues);
}
OnNonFinite parse_on_nonfinite(const std::string& s, const std::string& key) {
  return parse_enum(s, key, kOnNonFinite, kOnNonFiniteValues);
}

double InnerConfig::effective_weight_decay() const {
  if (weight_decay) return *weight_decay;
  return type == InnerType::adamw ? 1e-2 : 0.0;
}

bool pattern_matches(const std::string& pattern, const std::string& name) {
  if (pattern.rfind("re:", 0) == 0) {
    try {
      return std::regex_match(name, std::regex(pattern.substr(3), std::regex::ECMAScript));
    } catch (const std::regex_error& e) {
      throw ConfigError(
          fmt::format("config key 'match': regular expression '{}' does not compile: {}", pattern.substr(3), e.what()));
    }
  }
  return glob_match(pattern.c_str(), name.c_str());
}

std::vector<std::pair<std::string, std::string>> describe_target(const Target& t) {
  auto num = [](double d) { return fmt::format("{:.17g}", d); };
  auto opt = [&](const std::optional<double>& o) { return o ? num(*o) : std::string("(unset)"); };
  std::vector<std::pair<std::string, std::string>> v{
      {"match", t.match},
      {"method", to_string(t.method)},
      {"rank", std::to_string(t.rank)},
      {"alpha", opt(t.alpha)},
      {"init", to_string(t.init)},
      {"init_std", opt(t.init_std)},
      {"lr", opt(t.lr)},
      {"weight_decay", opt(t.weight_decay)},
      {"writeback", to_string(t.writeback)},
      {"on_resample", to_string(on_resample_of(t))},
      {"fan_in_fan_out", t.fan_in_fan_out ? "true" : "false"},
  };
  for (const auto& o : method_info(t.method).options) v.emplace_back(o.key, option_text_of(option(t, o.key)));
  return v;
}

namespace {

void check(bool ok, const std::string& key, const std::string& what, double value) {
  if (!ok) throw ConfigError(fmt::format("config key '{}': {}, got {}", key, what, value));
}

}  // namespace

void Config::validate() const {
  const auto& o = optimizer;
  check(std::isfinite(o.lr) && o.lr >= 0, "optimizer.lr", "expected a finite number >= 0", o.lr);
  check(std::isfinite(o.eps) && o.eps >= 0, "optimizer.eps", "expected a finite number >= 0", o.eps);
  check(o.betas[0] >= 0 && o.betas[0] < 1, "optimizer.betas[0]", "expected a value in [0, 1)", o.betas[0]);
  check(o.betas[1] >= 0 && o.betas[1] < 1, "optimizer.betas[1]", "expected a value in [0, 1)", o.betas[1]);
  if (o.weight_decay) {
    check(std::isfinite(*o.weight_decay) && *o.weight_decay >= 0, "optimizer.weight_decay",
          "expected a finite number >= 0", *o.weight_decay);
  }
  check(std::isfinite(o.momentum) && o.momentum >= 0, "optimizer.momentum", "expected a number >= 0", o.momentum);
  check(std::isfinite(o.dampening), "optimizer.dampening", "expected a finite number", o.dampening);
  if (o.type == InnerType::adamw_hf && o.amsgrad) {
    throw ConfigError(
        "config key 'optimizer.amsgrad': optimizer type adamw_hf (the transformers-style AdamW) has no amsgrad "
        "variant, got true (use type adamw for amsgrad)");
  }
  if (o.nesterov && (o.momentum <= 0 || o.dampening != 0)) {
    throw ConfigError(fmt::format(
        "config key 'optimizer.nesterov': nesterov needs momentum > 0 and dampening = 0, got momentum {} and "
        "dampening {}",
        o.momentum, o.dampening));
  }
  if (max_grad_norm) {
    check(std::isfinite(*max_grad_norm) && *max_grad_norm > 0, "max_grad_norm", "expected a finite number > 0",
          *max_grad_norm);
  }
  if (default_method != Method::frozen && default_method != Method::full) {
    throw ConfigError(fmt::format("config key 'default': expected frozen | full, got '{}'", to_string(default_method)));
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    const Target& t = targets[i];
    const std::string k = fmt::format("targets[{}]", i);
    if (t.match.empty()) throw ConfigError(fmt::format("config key '{}.match': the pattern is empty", k));
    if (t.match.rfind("re:", 0) == 0) {
      try {
        std::regex re(t.match.substr(3), std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw ConfigError(fmt::format("config key '{}.match': regular expression '{}' does not compile: {}", k,
                                      t.match.substr(3), e.what()));
      }
    }
    check(t.rank > 0, k + ".rank", "expected a rank > 0", static_cast<double>(t.rank));
    if (t.alpha) check(std::isfinite(*t.alpha) && *t.alpha > 0, k + ".alpha", "expected a number > 0", *t.alpha);
    if (t.init_std) {
      check(std::isfinite(*t.init_std) && *t.init_std > 0, k + ".init_std", "expected a number > 0", *t.init_std);
    }
    if (t.lr) check(std::isfinite(*t.lr) && *t.lr >= 0, k + ".lr", "expected a finite number >= 0", *t.lr);
    if (t.weight_decay) {
      check(std::isfinite(*t.weight_decay) && *t.weight_decay >= 0, k + ".weight_decay",
            "expected a finite number >= 0", *t.weight_decay);
    }
    if (t.init == Init::gradient && t.method != Method::lora) {
      throw ConfigError(fmt::format(
          "config key '{}.init': init gradient (the SVD of the first gradient, LoRA-GA) is an init of method lora, "
          "got it with method '{}' (expected zero | symmetric)",
          k, to_string(t.method)));
    }
    if (t.fan_in_fan_out && !method_info(t.method).low_rank) {
      throw ConfigError(fmt::format(
          "config key '{}.fan_in_fan_out': method '{}' does not view the weight as a matrix (only the low-rank "
          "methods do), got true",
          k, to_string(t.method)));
    }
    check_options(t, k);
  }
}

}  // namespace gradlora
