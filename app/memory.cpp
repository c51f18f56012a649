// The memory check of a run: the bytes the configured sizes need, against the
// bytes the machine has, before the model, the data or the sampler exist.
#include "memory.h"

#include "host_memory.h"
#include "model.h"

#include <gradlora/config.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <vector>

namespace gradlora::app {

namespace {

/// One knob of the estimate: its config key, its value, and the estimate with
/// the knob at its default (how much of the total it is responsible for).
struct Knob {
  std::string key;
  int64_t value;
  int64_t default_value;
  double total_at_default;
};

}  // namespace

// The estimate follows app/model.cpp term by term, in float32 values (4 bytes).
// B = training.batch, T = model.context, d = model.d_model, h = mlp_ratio·d,
// H = model.heads, L = model.layers, V = 256 (bytes are tokens).
//
// Parameters P = embed V·d + pos_embed T·d + head V·d + V + final norm 2d
//              + L · (qkv 3d²+3d + proj d²+d + fc1 h·d+h + fc2 h·d+d + two norms 4d).
// Weights: each parameter, its gradient and the two moments of AdamW (the
// pre-training optimizer; the low-rank fine-tuning keeps less at the usual
// ranks): 4·P values.
//
// Activations of one batch (what autograd keeps for backward), per block:
//   the block input and norm1's output (2·B·T·d), the q, k, v copies that the
//   batched matmuls make of the permuted qkv output (3·B·T·d), the attention
//   output reshaped for proj (B·T·d), the residual sum and norm2's output
//   (2·B·T·d), fc1's output and GELU's (2·B·T·h), the softmax output
//   S = B·H·T² and the causal mask (T² bytes);
// once: the embedding output, the final norm's input and output (3·B·T·d),
// the logits, log-softmax and its gradient (3·B·T·V), the gradient flowing back
// through the widest layer (2·B·T·h), and in the forward (or backward) of one
// block two more score tensors beside its softmax (2·S); the token windows and
// the targets (2·B·(T+1) int64).
// Left out, small next to these: LayerNorm's mean and rstd (2·B·T per norm), biases' gradients' temporaries.
// Left out, bounded by the data and not by these keys: the corpora (memory-mapped files, paged in as read).
MemoryEstimate estimate_memory(const ModelSettings& m, int64_t batch, bool training) {
  const double B = static_cast<double>(batch), T = static_cast<double>(m.context), d = static_cast<double>(m.d_model),
               h = static_cast<double>(m.mlp_ratio) * d, H = static_cast<double>(m.heads),
               L = static_cast<double>(m.layers), V = static_cast<double>(kVocab);
  constexpr double kFloat = 4, kInt64 = 8;
  MemoryEstimate e;
  e.parameters = 2 * V * d + T * d + V + 2 * d + L * (4 * d * d + 2 * h * d + h + 9 * d);
  if (!training) {
    // Building the model and the optimizer (inspect): the values, and at most
    // two copies' worth of optimizer state.
    e.weights = kFloat * 3 * e.parameters;
    return e;
  }
  e.weights = kFloat * 4 * e.parameters;
  const double S = B * H * T * T;
  const double per_block = B * T * (8 * d + 2 * h) + S;
  e.activations =
      kFloat * (L * per_block + B * T * (3 * d + 2 * h) + 3 * B * T * V + 2 * S) + L * T * T + kInt64 * 2 * B * (T + 1);
  return e;
}

std::string describe_bytes(double b) {
  static const char* units[] = {"bytes", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"};
  size_t u = 0;
  double v = b;
  while (v >= 1000 && u + 1 < std::size(units)) {
    v /= 1000;
    ++u;
  }
  if (u == 0) return fmt::format("{:.0f} bytes", b);
  return fmt::format("{:.0f} bytes ({:.2f} {})", b, v, units[u]);
}

void check_memory(const Settings& s, double available, const std::string& what, bool training) {
  const ModelSettings& m = s.model;
  const int64_t batch = s.training.batch;
  const MemoryEstimate e = estimate_memory(m, batch, training);
  if (e.total() <= available) return;
  // Blame the key whose value costs the most: the one that, put back to its
  // default, shrinks the estimate the most.
  const ModelSettings dm;
  const TrainingSettings dt;
  auto with = [&](auto change) {
    ModelSettings mm = m;
    int64_t bb = batch;
    change(mm, bb);
    return estimate_memory(mm, bb, training).total();
  };
  std::vector<Knob> knobs = {
      {"model.context", m.context, dm.context, with([&](ModelSettings& x, int64_t&) { x.context = dm.context; })},
      {"model.d_model", m.d_model, dm.d_model, with([&](ModelSettings& x, int64_t&) { x.d_model = dm.d_model; })},
      {"model.layers", m.layers, dm.layers, with([&](ModelSettings& x, int64_t&) { x.layers = dm.layers; })},
      {"model.heads", m.heads, dm.heads, with([&](ModelSettings& x, int64_t&) { x.heads = dm.heads; })},
      {"model.mlp_ratio", m.mlp_ratio, dm.mlp_ratio,
       with([&](ModelSettings& x, int64_t&) { x.mlp_ratio = dm.mlp_ratio; })},
  };
  if (training)
    knobs.push_back({"training.batch", batch, dt.batch, with([&](ModelSettings&, int64_t& b) { b = dt.batch; })});
  const Knob& worst = *std::min_element(
      knobs.begin(), knobs.end(), [](const Knob& a, const Knob& b) { return a.total_at_default < b.total_at_default; });
  const std::string sizes = fmt::format(
      "model.context = {}, model.d_model = {}, model.heads = {}, model.layers = {}, model.mlp_ratio = {}{}", m.context,
      m.d_model, m.heads, m.layers, m.mlp_ratio, training ? fmt::format(", training.batch = {}", batch) : "");
  const std::string parts =
      training ? fmt::format("{:.0f} parameters with gradients and AdamW moments: {}; activations of one batch: {}",
                             e.parameters, describe_bytes(e.weights), describe_bytes(e.activations))
               : fmt::format("{:.0f} parameters with the optimizer's state", e.parameters);
  throw ConfigError(fmt::format(
      "config key '{}': {} needs more memory than there is: an estimated {} ({}; {} of it because {} is {} rather "
      "than its default {}), but {} {} available ({})",
      worst.key, worst.value, describe_bytes(e.total()), parts,
      describe_bytes(std::max(0.0, e.total() - worst.total_at_default)), worst.key, worst.value, worst.default_value,
      what, describe_bytes(available), sizes));
}

void check_memory(const Settings& s, bool training) {
  if (s.training.device != "cpu") {
    spdlog::debug("memory check skipped on {}: no portable query of a device's free memory", s.training.device);
    return;
  }
  const std::optional<double> avail = gradlora::detail::available_host_bytes();
  if (!avail) {
    spdlog::debug("memory check skipped: neither /proc/meminfo nor sysconf says what memory is available");
    return;
  }
  check_memory(s, *avail, "this machine has", training);
}

}  // namespace gradlora::app
