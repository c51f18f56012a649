#pragma once
/// \file memory.h
/// The memory a run of the built-in model needs, estimated from the sizes in
/// the settings, and the check that refuses a run that cannot fit before
/// anything is allocated (an error naming the key, instead of LibTorch's
/// "can't allocate memory" deep inside a run).

#include "settings.h"

#include <cstdint>
#include <optional>
#include <string>

namespace gradlora::app {

/// Estimated bytes of one training process (float32 model). Doubles: the
/// sizes of a mistyped config overflow 64-bit integers.
struct MemoryEstimate {
  double parameters = 0;   ///< number of parameter values
  double weights = 0;      ///< bytes: parameters, their gradients, two AdamW moments
  double activations = 0;  ///< bytes: what one batch keeps for backward, and the peak on top
  double total() const { return weights + activations; }
};

/// What training with `m` on batches of `batch` windows needs (see memory.cpp
/// for the terms). `training = false`: only building the model and its
/// optimizer (inspect): parameters and two copies' worth of state.
MemoryEstimate estimate_memory(const ModelSettings& m, int64_t batch, bool training = true);

/// Throws gradlora::ConfigError when the estimate exceeds `available`, naming
/// the key that contributes most (the one whose default would shrink the
/// estimate the most: model.context, training.batch, model.d_model, ...), its
/// value, the bytes needed and the bytes available (`what` says whose).
void check_memory(const Settings& s, double available, const std::string& what, bool training = true);

/// check_memory against this machine: the host's memory when training.device
/// is cpu. On CUDA the check is skipped (logged): LibTorch 1.13 and 2.6 share
/// no C++ call for a device's free memory that a CPU-only build also has.
void check_memory(const Settings& s, bool training = true);

/// Bytes as "12800000000 bytes (12.80 GB)".
std::string describe_bytes(double b);

}  // namespace gradlora::app
