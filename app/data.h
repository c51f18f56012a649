#pragma once
/// \file data.h
/// Token corpora: files of token ids (bytes, or little-endian u16/u32 ids as
/// nanoGPT's train.bin writes them), memory-mapped, the tail of each file held
/// out, and a batch order that is a pure function of (seed, step) so that a
/// resumed run sees exactly the batches an uninterrupted one would.

#include "settings.h"

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gradlora::app {

/// One input file of a corpus and how many of its tokens went where.
struct CorpusFile {
  std::string path;
  int64_t tokens = 0;
  int64_t heldout_tokens = 0;
  int64_t validation_tokens = 0;
};

/// Where a token lies: the file and its index in that file (0-based, in tokens).
struct TokenLocation {
  std::string path;
  int64_t index = 0;
  int64_t value = 0;
};

/// A read-only sequence of token ids made of pieces of memory-mapped files,
/// one after the other (windows cross from one file into the next). Copying a
/// stream shares the mappings.
class TokenStream {
 public:
  /// A mapped file of tokens of `width` bytes each (1, 2 or 4).
  struct File;
  struct Piece {
    std::shared_ptr<const File> file;
    int64_t begin = 0, size = 0;  ///< in tokens of that file
  };

  int64_t numel() const { return size_; }
  /// Tokens [start, end) as an int64 tensor (a copy).
  torch::Tensor slice(int64_t start, int64_t end) const;
  /// The first token with id >= `vocab`, if any.
  std::optional<TokenLocation> find_at_least(int64_t vocab) const;
  void append(Piece p);
  const std::vector<Piece>& pieces() const { return pieces_; }

 private:
  std::vector<Piece> pieces_;
  std::vector<int64_t> starts_;  ///< stream index of each piece's first token
  int64_t size_ = 0;
};

/// A corpus split into a training stream, a validation stream (empty unless
/// the corpus has `validation`) and a held-out (test) stream: per file, the
/// training part first, then validation, then the held-out tail.
struct Corpus {
  std::string key;  ///< config key, e.g. "data.finetune"
  std::string format;
  std::vector<CorpusFile> files;
  TokenStream train;
  TokenStream validation;
  TokenStream heldout;
  int64_t total_tokens() const;
};

/// Maps the files of `c` (relative paths against `base_dir`). Throws
/// SettingsError naming the key and path on a missing file, a file whose size
/// is not a multiple of the token size, or an empty corpus, and when a split
/// holds less than one window of `context + 1` tokens. A corpus with
/// `evaluation_only` (data.reference) is held out whole.
Corpus load_corpus(const CorpusSettings& c, const std::string& base_dir, int64_t context);

/// Throws SettingsError naming the corpus key, the file and the position of
/// the first token id >= `vocab` (`model` names the model for the message).
void check_vocabulary(const Corpus& c, int64_t vocab, const std::string& model);

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
  TokenStream data_;
  int64_t window_, batch_, n_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  int64_t shift_ = 0;
  std::vector<int64_t> perm_;
};

/// Up to `max_windows` evenly spaced non-overlapping held-out windows, fixed.
torch::Tensor eval_windows(const TokenStream& stream, int64_t window, int64_t max_windows);

}  // namespace gradlora::app
