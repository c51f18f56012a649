#pragma once
/// \file data.h
/// Byte-level corpora: files read as bytes, the tail of each file held out,
/// and a batch order that is a pure function of (seed, step) so that a
/// resumed run sees exactly the batches an uninterrupted one would.

#include "settings.h"

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradlora::app {

/// One input file of a corpus and how many of its bytes went where.
struct CorpusFile {
  std::string path;
  int64_t bytes = 0;
  int64_t heldout_bytes = 0;
};

/// A corpus split into a training stream and a held-out stream (int64 tokens).
struct Corpus {
  std::string key;  ///< config key, e.g. "data.finetune"
  std::vector<CorpusFile> files;
  torch::Tensor train;
  torch::Tensor heldout;
  int64_t total_bytes() const;
};

/// Reads the files of `c` (relative paths against `base_dir`). Throws
/// SettingsError naming the key and path on a missing file or an empty corpus,
/// and when either split holds less than one window of `context + 1` bytes.
Corpus load_corpus(const CorpusSettings& c, const std::string& base_dir, int64_t context);

/// Random non-overlapping windows of `window` tokens: each epoch is a
/// permutation of the windows with a random offset, both drawn from
/// (seed, epoch) alone. batch(step) depends on nothing else.
class BatchSampler {
 public:
  /// Throws SettingsError when `batch` exceeds the windows of one epoch.
  BatchSampler(const Corpus& corpus, int64_t window, int64_t batch, uint64_t seed);
  /// The windows of step `step` (0-based): (batch, window) int64.
  torch::Tensor batch(int64_t step);
  int64_t windows_per_epoch() const { return n_; }

 private:
  void prepare_epoch(int64_t epoch);
  torch::Tensor data_;
  int64_t window_, batch_, n_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  int64_t shift_ = 0;
  std::vector<int64_t> perm_;
};

/// Up to `max_windows` evenly spaced non-overlapping held-out windows, fixed.
torch::Tensor eval_windows(const torch::Tensor& stream, int64_t window, int64_t max_windows);

}  // namespace gradlora::app
