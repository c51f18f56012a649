#pragma once
/// \file checkpoint.h
/// Crash-safe checkpoints of a model and its LowRankOptimizer in one file.
///
/// `torch::save(opt, path)` / `torch::load(opt, path)` (LibTorch's convention)
/// work as well, but write the file in place: a process killed mid-way leaves a
/// broken file. save_checkpoint() never destroys the last good checkpoint: it
/// writes a temporary file in the same folder, flushes it to disk (fsync) and
/// renames it over `path` (atomic on POSIX file systems). load_checkpoint()
/// validates everything before it changes anything.
///
/// Every tensor in a checkpoint (model and optimizer state) and its metadata
/// (counters, names, learning rates, per-parameter settings, extras) carry a
/// 64-bit checksum written at save time and verified while reading, before the
/// model or the optimizer is touched: a file damaged anywhere in what it holds
/// is refused with CheckpointError naming the file and the record that failed.

#include <gradlora/optimizer.h>

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>

namespace gradlora {

/// Thrown when a checkpoint cannot be written, read, or does not fit the
/// model/optimizer it is loaded into. The message names the file and lists
/// every mismatch found.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Saves `model` (parameters and buffers, LibTorch's nested archive layout) and
/// `opt` (everything LowRankOptimizer::save writes) into one file at `path`.
/// Atomic: the data goes to `<path>.tmp.<pid>` in the same folder, is fsync'ed
/// and renamed over `path`; the folder is fsync'ed afterwards. On any failure
/// the temporary file is removed, the previous file at `path` is untouched and
/// CheckpointError is thrown. A process killed mid-way may leave the temporary
/// file behind, never a broken `path`.
void save_checkpoint(const LowRankOptimizer& opt, const torch::nn::Module& model, const std::string& path);

/// Values a caller keeps in the same checkpoint beside the model and the optimizer (a
/// trainer's data position, running sums, the hash of its settings): ints, doubles,
/// bools and strings, by name.
using CheckpointExtras = std::map<std::string, c10::IValue>;

/// save_checkpoint(opt, model, path) with `extras` in the same file, written in the
/// same atomic step.
void save_checkpoint(const LowRankOptimizer& opt, const torch::nn::Module& model, const std::string& path,
                     const CheckpointExtras& extras);

/// The extras of a checkpoint (empty when it has none), read without changing
/// anything; throws CheckpointError naming the file when it is not a readable
/// gradlora checkpoint. Read them first to check that a checkpoint belongs to a run
/// before load_checkpoint() restores it.
CheckpointExtras read_checkpoint_extras(const std::string& path);

/// Restores what save_checkpoint() wrote. First reads the whole file and checks
/// that every parameter and buffer of `model` is present with the same shape
/// and that the optimizer state fits `opt` (names, shapes, methods, ranks,
/// inner rule); only then changes the model and the optimizer. On a truncated,
/// corrupt or foreign file, or any mismatch, throws CheckpointError listing the
/// problems and leaves both exactly as they were.
void load_checkpoint(LowRankOptimizer& opt, torch::nn::Module& model, const std::string& path);

/// Optimizer-only variants (same file layout, without the model section).
void save_checkpoint(const LowRankOptimizer& opt, const std::string& path);
/// Optimizer-only load; see load_checkpoint(opt, model, path).
void load_checkpoint(LowRankOptimizer& opt, const std::string& path);

/// Writes a file atomically: `produce` receives a sink that appends bytes;
/// the bytes land in `<path>.tmp.<pid>`, which is fsync'ed and renamed over
/// `path`. Throws CheckpointError (and removes the temporary file) when
/// `produce` or any write fails.
void write_file_atomically(const std::string& path,
                           const std::function<void(const std::function<void(const void*, size_t)>& sink)>& produce);

namespace detail {
/// The checksum of checkpoints: a 64-bit hash of `n` bytes. Any change confined
/// to one aligned 8-byte word of the input (in particular any single changed
/// byte) changes the result, provably; see docs/checkpoints.md for the definition.
uint64_t checksum64(const void* data, size_t n, uint64_t seed = 0);

/// checksum64 of a tensor's elements (row-major, as a contiguous CPU copy), seeded
/// with the checksum of its dtype and sizes.
uint64_t tensor_checksum(const torch::Tensor& t);

/// Test seam for fault injection: called before each chunk written by
/// write_file_atomically with the number of bytes already written. It may throw
/// (a failing write) or end the process (a crash). Empty: no hook.
void set_write_hook(std::function<void(size_t bytes_written)> hook);
}  // namespace detail

}  // namespace gradlora
