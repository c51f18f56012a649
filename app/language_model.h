#pragma once
/// \file language_model.h
/// The model a run trains, whichever it is: the built-in byte-level
/// Transformer (model.type char_transformer) or the user's own TorchScript
/// language model (model.type torchscript), behind one interface that the
/// loop, the evaluation, checkpoints and the outputs use.

#include "model.h"
#include "settings.h"

#include <gradlora/optimizer.h>

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>

namespace gradlora::app {

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  /// The parameters by the names `targets` match, in the model's order.
  virtual torch::OrderedDict<std::string, torch::Tensor> named_parameters() const = 0;
  /// Token ids (batch, T) int64 → logits (batch, T, vocab).
  virtual torch::Tensor logits(const torch::Tensor& tokens) = 0;
  virtual void set_training(bool on) = 0;
  /// A torch::nn::Module whose parameters and buffers are the model's own
  /// tensors (same names), for gradlora's checkpoints.
  virtual torch::nn::Module& state_module() = 0;
  /// Writes the model to `path` atomically, in its own format: the built-in
  /// model as a LibTorch archive, a TorchScript model as TorchScript (the
  /// structure of the loaded file, with the current weights).
  virtual void save(const std::string& path) = 0;
  /// One line for `inspect` and the log.
  virtual std::string describe() const = 0;
  /// TorchScript models: with nullptr, every parameter requires a gradient
  /// (before the optimizer is built: fused mode hooks only those); with the
  /// optimizer, only the ones it trains. The built-in model keeps its flags.
  virtual void prepare_gradients(const LowRankOptimizer* opt) { (void)opt; }
  /// Module paths whose weight is an embedding table (for the PEFT adapter).
  virtual std::set<std::string> embedding_modules() const = 0;
  /// Where the parameters live.
  torch::Device device() const;
  /// The vocabulary size: the last dimension of the logits.
  int64_t vocab() const { return vocab_; }
  /// Mean next-token cross-entropy (nats) of windows (batch, T+1).
  torch::Tensor loss(const torch::Tensor& windows);
  void zero_grad();

 protected:
  int64_t vocab_ = 0;
};

/// The built-in model of `s.model`, initialised from `seed`, on training.device.
std::unique_ptr<LanguageModel> make_builtin_model(const Settings& s, uint64_t seed);
/// The built-in model behind a LanguageModel made by make_builtin_model.
CharTransformer& builtin(LanguageModel& m);

/// Loads `s.model.path` with torch::jit::load onto training.device, then runs
/// `forward` once on a (2, model.context) batch of token id 0 to check
/// that it returns logits (batch, context, vocab) — or a tuple whose first
/// element, or a dict whose "logits" entry, is that — and to learn the vocabulary.
/// Throws SettingsError naming the file: missing, not TorchScript, no
/// forward, a failing forward, an output of another shape.
std::unique_ptr<LanguageModel> load_torchscript_model(const Settings& s);

/// The model of a run: make_builtin_model(s, seed) or load_torchscript_model(s).
std::unique_ptr<LanguageModel> open_model(const Settings& s, uint64_t seed);

/// A file's checksum (hex) for the settings hash: another model file is another run.
std::string file_checksum(const std::string& path);

}  // namespace gradlora::app
