#pragma once
/// \file config.h
/// Plain-data configuration of a LowRankOptimizer. Built in code or loaded from
/// YAML (config_yaml.cpp); the optimizer itself knows nothing of YAML.

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace gradlora {

/// Thrown for every invalid user input (config keys, values, parameter
/// selection). The message names the config key, the parameter (where there is
/// one) and the value received.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// How a selected parameter is trained (the `method:` of a target): the name of
/// a registered method (<gradlora/method.h>). The built-in ones have constants.
class Method {
 public:
  Method() = default;  ///< frozen
  explicit Method(std::string name) : name_(std::move(name)) {}
  const std::string& name() const { return name_; }
  bool operator==(const Method& o) const { return name_ == o.name_; }
  bool operator!=(const Method& o) const { return name_ != o.name_; }
  bool operator<(const Method& o) const { return name_ < o.name_; }

  static const Method lora, random, additive, galore, hadamard, full, frozen;

 private:
  std::string name_ = "frozen";
};
inline const Method Method::lora{"lora"};
inline const Method Method::random{"random"};
inline const Method Method::additive{"additive"};
inline const Method Method::galore{"galore"};
inline const Method Method::hadamard{"hadamard"};
inline const Method Method::full{"full"};
inline const Method Method::frozen{"frozen"};
inline std::ostream& operator<<(std::ostream& os, const Method& m) { return os << m.name(); }

/// The value of a method's own option (a target key only that method reads).
using OptionValue = std::variant<bool, int64_t, double, std::string>;
/// Initial factors of `lora`: one factor zero, both random, or (`gradient`, lora only) from the
/// SVD of the first step's gradient (LoRA-GA).
enum class Init { zero, symmetric, gradient };
/// How factor updates reach the weight: rank-r increments, or P = P0 + s·A·B.
/// `automatic` picks `exact` for bf16/fp16 weights and `incremental` otherwise.
enum class WriteBack { automatic, incremental, exact };
/// The inner update rule applied to factors (and to `full` parameters): LibTorch's
/// SGD, Adam, AdamW, or `adamw_hf`, the AdamW of transformers and galore_torch
/// (eps added to √v before the bias correction, decoupled decay after the update).
enum class InnerType { sgd, adam, adamw, adamw_hf };
/// What happens to the inner rule's moments when the projection changes.
enum class OnResample { keep, reset, transfer };
/// What a step does when a selected gradient holds NaN or Inf.
enum class OnNonFinite { skip, error };

const std::string& to_string(const Method& m);
const char* to_string(Init i);
const char* to_string(WriteBack w);
const char* to_string(InnerType t);
const char* to_string(OnResample o);
const char* to_string(OnNonFinite o);

/// Inverse of to_string; throws ConfigError naming `key` and the value.
/// parse_method accepts the name of any registered method.
Method parse_method(const std::string& s, const std::string& key);
Init parse_init(const std::string& s, const std::string& key);
WriteBack parse_writeback(const std::string& s, const std::string& key);
InnerType parse_inner_type(const std::string& s, const std::string& key);
OnResample parse_on_resample(const std::string& s, const std::string& key);
OnNonFinite parse_on_nonfinite(const std::string& s, const std::string& key);

/// Hyper-parameters of the inner rule, with LibTorch's defaults.
struct InnerConfig {
  InnerType type = InnerType::adamw;
  double lr = 1e-3;
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  /// Unset: the rule's own default (AdamW 1e-2; Adam, SGD and adamw_hf 0).
  std::optional<double> weight_decay;
  bool amsgrad = false;
  double momentum = 0.0;   ///< sgd
  double dampening = 0.0;  ///< sgd
  bool nesterov = false;   ///< sgd

  /// The weight decay in force: the configured one, or the rule's default.
  double effective_weight_decay() const;
};

/// One entry of `targets:`. The first target whose pattern matches a
/// parameter name decides how that parameter is trained.
struct Target {
  /// Glob on the dotted parameter name (`*` and `?`; `*` also crosses dots),
  /// or a regular expression (ECMAScript, whole-name match) after `re:`.
  std::string match;
  Method method = Method::lora;
  int64_t rank = 8;
  /// Scale s = alpha / rank. Unset: alpha = rank (s = 1).
  std::optional<double> alpha;
  Init init = Init::zero;
  /// Standard deviation of Gaussian factors (`symmetric` init, `random`).
  /// Unset: 1 / (s·sqrt(2r)), which makes the expected plain-SGD update of
  /// `random` equal the full-rank one (docs/methods.md).
  std::optional<double> init_std;
  std::optional<double> lr;            ///< overrides optimizer.lr
  std::optional<double> weight_decay;  ///< overrides optimizer.weight_decay
  WriteBack writeback = WriteBack::automatic;
  /// Moments when the method changes its projection (random, galore). Unset: the
  /// method's default (MethodInfo::default_on_resample).
  std::optional<OnResample> on_resample;
  /// The weight is stored transposed, (in, out) as GPT-2's Conv1D, where a
  /// Linear stores (out, in): the methods see its transpose (out×in), so A is
  /// out×r and B r×in as for a Linear, and write back into the stored tensor
  /// through a transposed view. Only for 2-D parameters. PEFT's key of the
  /// same name; the adapter export writes it.
  bool fan_in_fan_out = false;
  /// The method's own options, by key (e.g. `merge_every` for lora, `update_proj_gap`
  /// for galore): the keys and defaults each method declares (MethodInfo::options).
  /// A key that is not set takes the method's default.
  std::map<std::string, OptionValue> options;

  /// s = alpha / rank.
  double scale() const { return alpha.value_or(static_cast<double>(rank)) / static_cast<double>(rank); }
};

/// Everything the optimizer needs to know. Plain data: build it in code or
/// with Config::from_yaml_string / from_yaml_file.
struct Config {
  uint64_t seed = 0;
  InnerConfig optimizer;
  std::vector<Target> targets;
  /// Method for parameters no target matches (`frozen` or `full`).
  Method default_method = Method::frozen;
  /// A target that matches no parameter is an error unless this is true
  /// (then it is a warning). YAML key `allow_unmatched_targets`.
  bool allow_unmatched_targets = false;
  OnNonFinite on_nonfinite = OnNonFinite::skip;
  /// Project each gradient inside backward() (docs/methods.md, "Fused mode").
  bool fuse_into_backward = false;
  /// Clips the global norm of the full gradients of every parameter the optimizer
  /// steps to this value, as torch::nn::utils::clip_grad_norm_ before an unfused
  /// step would; unset: no clipping (docs/methods.md, "Gradient clipping").
  std::optional<double> max_grad_norm;
  /// Log the selection report at info level when the optimizer is built.
  bool log_report = true;
  /// Subspace diagnostics at every step (LowRankOptimizer::subspace_stats): the
  /// share of the gradient's energy each low-rank step can use, the overlap of a
  /// refreshed projector with the previous one. Costs a norm of each gradient and
  /// small factorisations (and a host synchronisation when read).
  bool diagnostics = false;

  /// Checks value ranges; throws ConfigError naming the key and value.
  void validate() const;

  /// Parses YAML text. Unknown keys, wrong types and
  /// out-of-range values throw ConfigError with the key path and value.
  static Config from_yaml_string(const std::string& text);
  /// Reads and parses a YAML file; the error names the file too.
  static Config from_yaml_file(const std::string& path);
};

/// Every field of a target as (YAML key, config text), in the reference config's
/// order, with the method's options (defaults filled in) last. The data-parallel
/// config check compares these between ranks.
std::vector<std::pair<std::string, std::string>> describe_target(const Target& t);

/// True when `name` matches a target's pattern (glob, or `re:` regex).
/// Throws ConfigError when a regex does not compile.
bool pattern_matches(const std::string& pattern, const std::string& name);

}  // namespace gradlora
