#pragma once
/// \file model.h
/// A small byte-level Transformer language model (pre-norm, causal
/// self-attention written with plain Linear layers so that parameter names
/// read `blocks.0.attn.qkv.weight`, `blocks.1.mlp.fc2.weight`, `head.weight`).

#include "settings.h"

#include <torch/torch.h>

namespace gradlora::app {

/// Vocabulary of the byte-level model: every byte value is a token.
constexpr int64_t kVocab = 256;

/// Causal multi-head self-attention: `qkv` (3d×d) and `proj` (d×d).
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t d_model, int64_t heads);
  torch::Tensor forward(const torch::Tensor& x);
  int64_t heads_;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
};
TORCH_MODULE(Attention);

/// Position-wise MLP: `fc1` (h×d), GELU, `fc2` (d×h).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t d_model, int64_t hidden);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Mlp);

/// Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t d_model, int64_t heads, int64_t hidden);
  torch::Tensor forward(torch::Tensor x);
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  Attention attn{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(Block);

/// Token + learned position embeddings, `layers` blocks, final norm, head.
struct CharTransformerImpl : torch::nn::Module {
  explicit CharTransformerImpl(const ModelSettings& s);
  /// tokens: (batch, T) int64 with T <= context → logits (batch, T, 256).
  torch::Tensor forward(const torch::Tensor& tokens);
  /// Mean next-byte cross-entropy (nats) of windows (batch, T+1).
  torch::Tensor loss(const torch::Tensor& windows);
  ModelSettings settings_;
  torch::nn::Embedding embed{nullptr};
  torch::Tensor pos_embed;
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(CharTransformer);

/// Builds the model of `s` with weights drawn from `seed` (torch::manual_seed).
CharTransformer make_model(const ModelSettings& s, uint64_t seed);

}  // namespace gradlora::app
