#include "model.h"

#include <cmath>

namespace gradlora::app {

AttentionImpl::AttentionImpl(int64_t d_model, int64_t heads)
    : heads_(heads),
      qkv(register_module("qkv", torch::nn::Linear(d_model, 3 * d_model))),
      proj(register_module("proj", torch::nn::Linear(d_model, d_model))) {}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), dh = D / heads_;
  // (B, T, 3D) → three (B, heads, T, dh)
  auto parts = qkv->forward(x).view({B, T, 3, heads_, dh}).permute({2, 0, 3, 1, 4}).unbind(0);
  torch::Tensor att = torch::matmul(parts[0], parts[1].transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
  torch::Tensor mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool)).triu(1);
  att = torch::softmax(att.masked_fill(mask, -std::numeric_limits<float>::infinity()), -1);
  torch::Tensor y = torch::matmul(att, parts[2]).transpose(1, 2).reshape({B, T, D});
  return proj->forward(y);
}

MlpImpl::MlpImpl(int64_t d_model, int64_t hidden)
    : fc1(register_module("fc1", torch::nn::Linear(d_model, hidden))),
      fc2(register_module("fc2", torch::nn::Linear(hidden, d_model))) {}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) { return fc2->forward(torch::gelu(fc1->forward(x))); }

BlockImpl::BlockImpl(int64_t d_model, int64_t heads, int64_t hidden)
    : norm1(register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})))),
      norm2(register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})))),
      attn(register_module("attn", Attention(d_model, heads))),
      mlp(register_module("mlp", Mlp(d_model, hidden))) {}

torch::Tensor BlockImpl::forward(torch::Tensor x) {
  x = x + attn->forward(norm1->forward(x));
  return x + mlp->forward(norm2->forward(x));
}

CharTransformerImpl::CharTransformerImpl(const ModelSettings& s) : settings_(s) {
  embed = register_module("embed", torch::nn::Embedding(kVocab, s.d_model));
  pos_embed = register_parameter("pos_embed", torch::zeros({s.context, s.d_model}));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < s.layers; ++i) blocks->push_back(Block(s.d_model, s.heads, s.mlp_ratio * s.d_model));
  norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({s.d_model})));
  head = register_module("head", torch::nn::Linear(s.d_model, kVocab));
  torch::NoGradGuard guard;
  embed->weight.normal_(0.0, 0.02);
  pos_embed.normal_(0.0, 0.02);
}

torch::Tensor CharTransformerImpl::forward(const torch::Tensor& tokens) {
  const int64_t T = tokens.size(1);
  TORCH_CHECK(T <= settings_.context, "sequence of ", T, " tokens is longer than model.context = ", settings_.context);
  torch::Tensor x = embed->forward(tokens) + pos_embed.slice(0, 0, T);
  for (const auto& b : *blocks) x = b->as<Block>()->forward(x);
  return head->forward(norm->forward(x));
}

torch::Tensor CharTransformerImpl::loss(const torch::Tensor& windows) {
  const int64_t T = windows.size(1) - 1;
  torch::Tensor logits = forward(windows.slice(1, 0, T));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), windows.slice(1, 1, T + 1).reshape({-1}));
}

CharTransformer make_model(const ModelSettings& s, uint64_t seed) {
  torch::manual_seed(seed);
  return CharTransformer(s);
}

}  // namespace gradlora::app
