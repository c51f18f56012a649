// The method registry: every method's MethodInfo, the option accessors, and
// make_projector. A new method adds its file and one line here (README, "Adding a method").
#include "methods.h"

#include <gradlora/method.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <cmath>

namespace gradlora {

// Each method's entry, defined in its file under src/methods/.
namespace methods {
MethodInfo full();
MethodInfo lora();
MethodInfo random();
MethodInfo additive();
MethodInfo galore();
MethodInfo hadamard();
MethodInfo apollo();
}  // namespace methods

namespace {

MethodInfo frozen_method() {
  MethodInfo m;
  m.name = "frozen";
  m.weight_decay_on = "nothing (not trained)";
  m.low_rank = false;
  return m;  // no projector: the parameter is never touched
}

}  // namespace

const std::vector<MethodInfo>& registered_methods() {
  static const std::vector<MethodInfo> all = {
      methods::lora(),     methods::random(), methods::additive(), methods::galore(),
      methods::hadamard(), methods::apollo(), methods::full(),     frozen_method(),
  };
  return all;
}

const MethodInfo& method_info(const std::string& name, const std::string& key) {
  for (const auto& m : registered_methods()) {
    if (m.name == name) return m;
  }
  std::vector<std::string> names;
  for (const auto& m : registered_methods()) names.push_back(m.name);
  throw ConfigError(
      fmt::format("config key '{}': unknown value '{}' (expected {})", key, name, fmt::join(names, " | ")));
}

const MethodInfo& method_info(const Method& method) { return method_info(method.name()); }

namespace {

const OptionSpec* find_option(const MethodInfo& m, const std::string& key) {
  for (const auto& o : m.options) {
    if (o.key == key) return &o;
  }
  return nullptr;
}

const char* kind_name(const OptionValue& v) {
  switch (v.index()) {
    case 0:
      return "true or false";
    case 1:
      return "an integer";
    case 2:
      return "a number";
    default:
      return "a string";
  }
}

}  // namespace

std::string option_text_of(const OptionValue& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool>) {
          return x ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          return fmt::format("{:.17g}", x);
        } else if constexpr (std::is_same_v<T, std::string>) {
          return x;
        } else {
          return std::to_string(x);
        }
      },
      v);
}

const OptionValue& option(const Target& t, const std::string& key) {
  const MethodInfo& m = method_info(t.method);
  const OptionSpec* spec = find_option(m, key);
  if (!spec) throw std::invalid_argument(fmt::format("method '{}' has no option '{}'", m.name, key));
  auto it = t.options.find(key);
  return it == t.options.end() ? spec->default_value : it->second;
}

int64_t option_int(const Target& t, const std::string& key) { return std::get<int64_t>(option(t, key)); }
double option_double(const Target& t, const std::string& key) {
  const OptionValue& v = option(t, key);
  return v.index() == 1 ? static_cast<double>(std::get<int64_t>(v)) : std::get<double>(v);
}
const std::string& option_text(const Target& t, const std::string& key) {
  return std::get<std::string>(option(t, key));
}

OnResample on_resample_of(const Target& t) { return t.on_resample.value_or(method_info(t.method).default_on_resample); }

void check_options(const Target& t, const std::string& key_prefix) {
  const std::string method_key = key_prefix + ".method";
  const MethodInfo& m = method_info(t.method.name(), method_key);
  for (const auto& [key, value] : t.options) {
    const std::string k = key_prefix + "." + key;
    const OptionSpec* spec = find_option(m, key);
    if (!spec) {
      std::vector<std::string> known;
      for (const auto& o : m.options) known.push_back(o.key);
      throw ConfigError(fmt::format("config key '{}': method '{}' has no option '{}' (its options: {})", k, m.name, key,
                                    known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", "))));
    }
    const bool int_as_number = spec->default_value.index() == 2 && value.index() == 1;
    if (value.index() != spec->default_value.index() && !int_as_number) {
      throw ConfigError(fmt::format("config key '{}': expected {}, got '{}'", k, kind_name(spec->default_value),
                                    option_text_of(value)));
    }
    if (!spec->choices.empty()) {
      const std::string& v = std::get<std::string>(value);
      if (std::find(spec->choices.begin(), spec->choices.end(), v) == spec->choices.end()) {
        throw ConfigError(
            fmt::format("config key '{}': unknown value '{}' (expected {})", k, v, fmt::join(spec->choices, " | ")));
      }
    }
    if (spec->min && (value.index() == 1 || value.index() == 2)) {
      const double x = value.index() == 1 ? static_cast<double>(std::get<int64_t>(value)) : std::get<double>(value);
      const bool ok = std::isfinite(x) && (spec->min_exclusive ? x > *spec->min : x >= *spec->min);
      if (!ok) {
        throw ConfigError(fmt::format("config key '{}': expected {} {} {:g} ({}), got {}", k,
                                      kind_name(spec->default_value), spec->min_exclusive ? ">" : ">=", *spec->min,
                                      spec->help, option_text_of(value)));
      }
    }
  }
}

std::string data_parallel_refusal(const Config& config) {
  for (size_t i = 0; i < config.targets.size(); ++i) {
    const Target& t = config.targets[i];
    const MethodInfo& m = method_info(t.method);
    if (!m.data_parallel_refusal) continue;
    const std::string why = m.data_parallel_refusal(t);
    if (!why.empty()) {
      return fmt::format("targets[{}].method: {} cannot train data-parallel: {}", i, m.name, why);
    }
  }
  return {};
}

std::unique_ptr<Projector> make_projector(ProjectorContext ctx) {
  const Target& t = ctx.target;
  const torch::Tensor& P = ctx.param;
  const MethodInfo& info = method_info(t.method);
  if (!info.make) return nullptr;
  const std::string& method = info.name;
  if (!P.is_floating_point()) {
    throw ConfigError(fmt::format("parameter '{}': method '{}' needs a floating-point parameter, got dtype {}",
                                  ctx.name, method, c10::toString(P.scalar_type())));
  }
  if (t.fan_in_fan_out && P.dim() != 2) {
    throw ConfigError(fmt::format(
        "config key 'fan_in_fan_out': parameter '{}' has {} dimension(s) (shape [{}]); fan_in_fan_out: true needs a "
        "2-D weight stored (in, out), got true",
        ctx.name, P.dim(), fmt::join(P.sizes(), ", ")));
  }
  if (info.low_rank) {
    if (P.dim() < 2) {
      throw ConfigError(fmt::format(
          "config key 'method': parameter '{}' has {} dimension(s) (shape [{}]); method '{}' needs >= 2 (use full "
          "or frozen)",
          ctx.name, P.dim(), fmt::join(P.sizes(), ", "), method));
    }
    if (!P.is_contiguous()) {
      throw ConfigError(fmt::format("parameter '{}': method '{}' needs a contiguous parameter", ctx.name, method));
    }
    const int64_t rows = P.size(0), cols = P.numel() / rows;  // the n×m view: transposed under fan_in_fan_out
    const int64_t n = t.fan_in_fan_out ? cols : rows, m = t.fan_in_fan_out ? rows : cols;
    if (t.rank > std::min(n, m)) {
      throw ConfigError(fmt::format("config key 'rank': parameter '{}' is {}x{}, rank must be <= {}, got {}", ctx.name,
                                    n, m, std::min(n, m), t.rank));
    }
  }
  return info.make(std::move(ctx));
}

}  // namespace gradlora
