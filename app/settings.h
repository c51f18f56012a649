#pragma once
/// \file settings.h
/// The trainer's sections of the YAML file (model, data, training, compare),
/// read next to the optimizer config that gradlora::Config parses from the
/// same file. Plain data, validated with errors that name the key and value.

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::app {

/// `model:` — the built-in byte-level Transformer (`type: char_transformer`)
/// or the user's own TorchScript language model (`type: torchscript`, `path`).
struct ModelSettings {
  std::string type = "char_transformer";  ///< char_transformer | torchscript
  std::string path;                       ///< torchscript: the file, resolved against the config's folder
  int64_t layers = 2;
  int64_t d_model = 128;
  int64_t heads = 4;
  int64_t context = 128;  ///< tokens per training window
  int64_t mlp_ratio = 4;  ///< hidden width of the MLP = mlp_ratio · d_model
  bool torchscript() const { return type == "torchscript"; }
};

/// One corpus: files (a directory stands for its regular files, sorted;
/// symbolic links inside a directory are skipped as duplicates), their token
/// format and the fraction of each file held out for evaluation (the tail of
/// the file).
struct CorpusSettings {
  std::vector<std::string> files;
  /// bytes (every byte a token) | u16 | u32 (flat little-endian token ids).
  std::string format = "bytes";
  double holdout = 0.1;
  /// Fraction of each file just before its held-out tail kept apart for
  /// validation (choosing learning rates, detecting the pre-training plateau);
  /// 0: none. Training data is what lies before both.
  double validation = 0.0;
  /// data.reference: the whole corpus is evaluation data.
  bool evaluation_only = false;
  /// Config key of this corpus, e.g. "data.finetune" (for error messages).
  std::string key;
};

/// `data:` — `finetune` is what the optimizer under test trains on; the
/// optional `pretrain` corpus is learned first by the built-in model (full
/// AdamW); forgetting is measured on the optional `reference` corpus (data of
/// what the model knew before, all of it held out), else on `pretrain`'s
/// held-out split.
struct DataSettings {
  CorpusSettings finetune;
  bool has_pretrain = false;
  CorpusSettings pretrain;
  bool has_reference = false;
  CorpusSettings reference;
};

/// `training.pretrain:` — how the base model is made before fine-tuning.
struct PretrainSettings {
  int64_t steps = 600;
  double lr = 3e-3;
  double weight_decay = 0.01;
  int64_t warmup = 50;
  uint64_t seed = 0;  ///< model init and data order of pre-training
  /// `plateau:` — train until the validation loss stops improving, then cool down.
  /// Without it the schedule is warm-up + cosine over `steps`.
  struct Plateau {
    int64_t eval_every = 100;  ///< validation loss every this many steps
    int64_t window = 400;      ///< steps over which the best validation loss must improve ...
    double min_delta = 0.01;   ///< ... by at least this much (nats), or the plateau is reached
    int64_t cooldown = 200;    ///< then the lr falls linearly to 0 over this many steps
  };
  bool has_plateau = false;
  Plateau plateau;  ///< with it, `steps` is the budget of the constant-lr phase
};

/// `training:` — the loop.
struct TrainingSettings {
  int64_t steps = 300;
  int64_t batch = 16;
  int64_t threads = 1;              ///< at::set_num_threads
  std::string device = "cpu";       ///< cpu, cuda or cuda:N: where the model and its batches live
  int64_t warmup = 20;              ///< linear warm-up steps
  std::string schedule = "cosine";  ///< cosine | constant (after warm-up)
  double min_lr_ratio = 0.1;        ///< cosine floor, as a fraction of the base lr
  double grad_clip = 1.0;           ///< global gradient-norm clip (0 = off)
  int64_t eval_every = 50;
  int64_t eval_windows = 64;  ///< held-out windows per evaluation (at most)
  int64_t log_every = 25;     ///< plain log lines when stderr is not a terminal
  int64_t checkpoint_every = 100;
  /// Stop as if interrupted after this many steps of this invocation (0 = never).
  /// Writes the checkpoint; used to test --resume.
  int64_t halt_after = 0;
  /// Folder for the cached pre-trained model; empty = <out>/cache.
  std::string cache_dir;
  PretrainSettings pretrain;
};

/// One entry of `compare.methods`: a name, and the optimizer keys it sets
/// (`optimizer` is merged key by key over the top-level one; `targets`,
/// `default`, … replace the top-level ones), plus `set:` overrides.
struct MethodSpec {
  std::string name;
  YAML::Node node;  ///< the entry itself
  /// `lrs:` — learning rates to sweep (optimizer.lr); compare trains each on the
  /// sweep seeds, keeps the one with the lowest final validation loss on the
  /// fine-tuning corpus and reports that one on every seed. Empty: optimizer.lr as given.
  std::vector<double> lrs;
};

/// `compare:` — one run per method and seed.
struct CompareSettings {
  std::vector<uint64_t> seeds{0, 1, 2};
  std::vector<MethodSpec> methods;
  /// Seeds of the learning-rate sweep (methods with `lrs`).
  std::vector<uint64_t> sweep_seeds{0};
  /// Held-out fine-tuning losses at which forgetting is compared (the frontier table).
  std::vector<double> levels;
  /// `--set`-style overrides applied when --quick is given.
  std::vector<std::pair<std::string, std::string>> quick;
};

/// Everything the trainer reads, plus the YAML tree it came from.
struct Settings {
  ModelSettings model;
  DataSettings data;
  TrainingSettings training;
  bool has_compare = false;
  CompareSettings compare;
  uint64_t seed = 0;
  YAML::Node root;       ///< the whole tree after overrides
  std::string base_dir;  ///< relative data paths are resolved against this
  std::string source;    ///< the config file, for messages
};

/// Thrown for a bad trainer setting; the message names the key and the value.
class SettingsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Splits "a.b=value" into ("a.b", "value"); throws SettingsError otherwise.
std::pair<std::string, std::string> split_override(const std::string& s);

/// Sets `key` (dotted path, `name[i]` indexes a list) to `value` parsed as
/// YAML, creating missing mappings. Throws SettingsError naming the key.
void apply_override(YAML::Node& root, const std::string& key, const std::string& value);

/// Reads the YAML file, applies the `compare.quick` overrides when `quick`,
/// then `overrides` in order, and validates the trainer sections. Throws
/// SettingsError on bad input.
Settings load_settings(const std::string& path, const std::vector<std::pair<std::string, std::string>>& overrides,
                       bool quick = false);

/// Validates the trainer sections of an already-loaded tree.
Settings parse_settings(const YAML::Node& root, const std::string& base_dir, const std::string& source);

/// The YAML tree of one compared method: the root with the method's keys
/// applied and `seed` set. Throws SettingsError on a bad method entry.
YAML::Node method_tree(const Settings& s, const MethodSpec& m, uint64_t seed);

/// Serialises a tree to YAML text (keys in their original order).
std::string to_yaml(const YAML::Node& root);

/// 64-bit FNV-1a hash, printed as 16 hex digits (stable across builds).
std::string stable_hash(const std::string& text);

}  // namespace gradlora::app
