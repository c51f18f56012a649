#pragma once
/// \file method.h
/// The method registry. A method is a projector class in its own file under
/// src/methods/ plus one MethodInfo in the registry: its name, the options it
/// reads from its target, its default on_resample, whether it can train
/// data-parallel, and the factory of its projector. Nothing outside the method's
/// file knows more about it (README, "Adding a method").

#include <gradlora/config.h>
#include <gradlora/projector.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gradlora {

/// One option a method reads from its target (a key of `targets[i]` in YAML,
/// an entry of Target::options in code).
struct OptionSpec {
  std::string key;
  OptionValue default_value;         ///< its alternative is the option's type
  std::string help;                  ///< one line: what it does
  std::vector<std::string> choices;  ///< text options: the allowed values
  std::optional<double> min;         ///< numeric options: the smallest allowed value
  bool min_exclusive = false;        ///< `min` itself is not allowed
};

/// What the library knows of a method; everything else lives in its projector.
struct MethodInfo {
  std::string name;
  /// Takes a matrix (a >= 2-D contiguous parameter, viewed as n×m) and a rank <= min(n, m).
  bool low_rank = true;
  std::vector<OptionSpec> options;
  /// Where weight decay acts, one phrase for the README's method table and the
  /// selection report ("the factors A, B", "the weight P", ...).
  std::string weight_decay_on;
  /// on_resample when the target does not set it.
  OnResample default_on_resample = OnResample::keep;
  /// What the projector of `ctx` will hold, known before it is built: the bytes of
  /// its persistent tensors (Projector::persistent_bytes) and the number of values
  /// its inner rule updates (Projector::trainable). The optimizer checks the sum
  /// with the inner rule's state against the memory there is before allocating.
  /// Empty for `frozen`.
  std::function<std::pair<int64_t, int64_t>(const ProjectorContext&)> footprint;
  /// Builds the projector; empty for `frozen` (nothing is trained).
  std::function<std::unique_ptr<Projector>(ProjectorContext)> make;
  /// Empty when the target can train data-parallel; otherwise why not (a clause:
  /// "its projector is ...").
  std::function<std::string(const Target&)> data_parallel_refusal;
};

/// Every registered method, in the order of the reference config.
const std::vector<MethodInfo>& registered_methods();
/// The method called `name`; throws ConfigError naming `key`, the value and the known names.
const MethodInfo& method_info(const std::string& name, const std::string& key = "method");
const MethodInfo& method_info(const Method& method);

/// Option `key` of `t`: the configured value, else the method's default. Throws
/// std::invalid_argument when the method declares no such option.
const OptionValue& option(const Target& t, const std::string& key);
int64_t option_int(const Target& t, const std::string& key);
double option_double(const Target& t, const std::string& key);
const std::string& option_text(const Target& t, const std::string& key);
/// The on_resample in force for `t`: configured, else the method's default.
OnResample on_resample_of(const Target& t);

/// Checks t.options against the method's declarations (unknown keys, types,
/// choices, ranges); the ConfigError names `key_prefix`.key and the value.
void check_options(const Target& t, const std::string& key_prefix);

/// The option's value as config text ("200", "0.25", "left", "true").
std::string option_text_of(const OptionValue& v);

/// Empty when every target of `config` can train data-parallel; otherwise the
/// reason for the first one that cannot, naming the key.
std::string data_parallel_refusal(const Config& config);

}  // namespace gradlora
