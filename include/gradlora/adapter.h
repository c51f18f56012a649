#pragma once
/// \file adapter.h
/// What `lora` learned, as a PEFT-compatible LoRA adapter folder
/// (adapter_model.safetensors + adapter_config.json), and back.
///
/// PEFT (Mangrulkar et al., "PEFT: State-of-the-art Parameter-Efficient
/// Fine-Tuning methods", 2022) merges an adapter as W ← W + scale·lora_B·lora_A
/// with scale = lora_alpha / r (Hu et al., "LoRA", arXiv:2106.09685). Our
/// parameterisation is P = P0 + s·(A·B − A0·B0), so
/// lora_B = our A (n×r) and lora_A = our B (r×m), with lora_alpha = s·r.
/// A `symmetric` init has A0·B0 ≠ 0 and the change has rank ≤ 2r: it is
/// exported faithfully at rank 2r as lora_B = [A, −A0], lora_A = [B; B0].
/// A weight stored (in, out), as GPT-2's Conv1D (target `fan_in_fan_out:
/// true`), is trained as its out×in transpose, so the factors keep their
/// meaning and PEFT's `fan_in_fan_out: true` applies ΔW_stored = (lora_B·lora_A)ᵀ.
/// An `nn.Embedding` table (num_embeddings × dim) is written as PEFT writes
/// it: lora_embedding_A = Aᵀ (r × num_embeddings), lora_embedding_B = Bᵀ
/// (dim × r), ΔW = (lora_embedding_B·lora_embedding_A)ᵀ·scale.
/// The safetensors format (8-byte little-endian header length, JSON header,
/// raw little-endian data) is written and read here, without other libraries.

#include <gradlora/optimizer.h>

#include <torch/nn/module.h>
#include <torch/ordered_dict.h>
#include <torch/types.h>

#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace gradlora {

/// Thrown when an adapter or a safetensors file cannot be written or read, or
/// does not fit the parameters it is applied to. The message names the file,
/// the key or parameter, and the offending value.
class AdapterError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Tensors in file order, with their names.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// Contents of a safetensors file.
struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;  ///< CPU tensors by name
  std::map<std::string, std::string> metadata;   ///< the optional `__metadata__` map
};

/// Writes `tensors` (any device; stored as contiguous CPU data) in the
/// safetensors format, atomically (see write_file_atomically). Supported
/// dtypes: float64/32/16, bfloat16, int64/32/16/8, uint8, bool.
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Reads a safetensors file. Validates the header length, the JSON, every
/// dtype, shape and data offset (in range, matching the size, no overlaps, no
/// holes) and throws AdapterError naming the file and key on any problem.
SafetensorsFile read_safetensors(const std::string& path);

/// Options of export_adapter().
struct AdapterOptions {
  /// Written as `base_model_name_or_path` in adapter_config.json.
  std::string base_model_name_or_path;
  /// Prefix of every key, PEFT's "base_model.model." by default.
  std::string key_prefix = "base_model.model.";
  /// Stored dtype of lora_A / lora_B; undefined: the factors' own dtype.
  std::optional<torch::ScalarType> dtype;
  /// Module paths (parameter name without ".weight") whose weight is an
  /// embedding table, exported as `lora_embedding_A` / `lora_embedding_B`.
  /// The optimizer knows parameters, not module types: fill it with
  /// embedding_modules(model) (or the TorchScript overload in jit.h), or by hand.
  std::set<std::string> embedding_modules;
};

/// Paths of the torch::nn::Embedding submodules of `module` (as
/// named_modules() names them), for AdapterOptions::embedding_modules.
std::set<std::string> embedding_modules(const torch::nn::Module& module);

/// What export_adapter() wrote.
struct AdapterExport {
  /// Module paths exported (parameter name without ".weight").
  std::vector<std::string> modules;
  /// Exported rank per module (r, or 2r for `symmetric` and `gradient` init).
  std::map<std::string, int64_t> ranks;
  /// Trained parameters that a LoRA adapter cannot carry (full, additive,
  /// random, …); a warning names them.
  std::vector<std::string> skipped;
};

/// Writes `folder`/adapter_model.safetensors and `folder`/adapter_config.json
/// (creating the folder) for every `lora` parameter of `opt`, such that
/// W − W0 = (lora_alpha / r)·lora_B·lora_A reproduces what training changed.
/// Keys: `<key_prefix><module>.lora_A.weight` (r×in, or r×in×k… for conv
/// kernels) and `<key_prefix><module>.lora_B.weight` (out×r, or out×r×1… for
/// conv); for options.embedding_modules `<key_prefix><module>.lora_embedding_A`
/// (r×num_embeddings) and `.lora_embedding_B` (dim×r). `fan_in_fan_out` in the
/// config is that of the targets (all non-embedding modules must agree).
/// Ranks or alphas that differ between modules go into PEFT's
/// `rank_pattern` / `alpha_pattern`. Throws AdapterError for a `lora`
/// parameter whose name does not end in ".weight", or that merged its factors
/// into the weight (merge_every): its change is no longer of low rank; for
/// modules whose fan_in_fan_out differ; for an embedding module whose weight
/// is not 2-D.
AdapterExport export_adapter(const LowRankOptimizer& opt, const std::string& folder,
                             const AdapterOptions& options = {});

/// True when `opt` trains at least one parameter that export_adapter() would
/// write (the PEFT LoRA format holds `lora` factors only).
bool has_adapter_parameters(const LowRankOptimizer& opt);

/// Applies a PEFT LoRA adapter folder to parameters by name:
/// W += scale·lora_B·lora_A for each module (W += scale·(lora_B·lora_A)ᵀ under
/// `fan_in_fan_out: true`, W += scale·(lora_embedding_B·lora_embedding_A)ᵀ for
/// embedding factors), with scale = lora_alpha / r
/// (lora_alpha / √r under `use_rslora`) and PEFT's rank_pattern/alpha_pattern
/// (a pattern key matches a module equal to it or ending in "." + key).
/// Validates everything first (config keys, every key of the safetensors file,
/// shapes against the parameters, r against the tensors) and throws
/// AdapterError listing the problems without changing any parameter.
/// Returns the names of the parameters changed.
std::vector<std::string> load_adapter(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                      const std::string& folder);

}  // namespace gradlora
