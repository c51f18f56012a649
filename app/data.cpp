#include "data.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace gradlora::app {

/// A file mapped read-only for the lifetime of the streams that use it.
struct TokenStream::File {
  std::string path;
  int width = 1;  ///< bytes per token
  const unsigned char* data = nullptr;
  size_t bytes = 0;
  int64_t tokens() const { return static_cast<int64_t>(bytes) / width; }
  /// Token `i` of the file (little-endian ids).
  int64_t at(int64_t i) const {
    const unsigned char* p = data + static_cast<size_t>(i) * static_cast<size_t>(width);
    switch (width) {
      case 1:
        return p[0];
      case 2:
        return static_cast<int64_t>(p[0]) | (static_cast<int64_t>(p[1]) << 8);
      default:
        return static_cast<int64_t>(p[0]) | (static_cast<int64_t>(p[1]) << 8) | (static_cast<int64_t>(p[2]) << 16) |
               (static_cast<int64_t>(p[3]) << 24);
    }
  }
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (data) ::munmap(const_cast<unsigned char*>(data), bytes);
  }
};

namespace {

std::vector<fs::path> expand(const CorpusSettings& c, const std::string& base_dir) {
  std::vector<fs::path> out;
  for (size_t i = 0; i < c.files.size(); ++i) {
    const std::string key = fmt::format("{}.files[{}]", c.key, i);
    fs::path p(c.files[i]);
    if (p.is_relative()) p = fs::path(base_dir) / p;
    std::error_code ec;
    if (!fs::exists(p, ec))
      throw SettingsError(fmt::format("config key '{}': path '{}' does not exist", key, p.string()));
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> inside;
      for (const auto& e : fs::directory_iterator(p, ec)) {
        if (e.is_symlink() || !e.is_regular_file()) continue;  // links duplicate other files
        inside.push_back(e.path());
      }
      std::sort(inside.begin(), inside.end());
      out.insert(out.end(), inside.begin(), inside.end());
    } else {
      out.push_back(p);
    }
  }
  return out;
}

int token_width(const std::string& format) { return format == "u32" ? 4 : format == "u16" ? 2 : 1; }

std::shared_ptr<const TokenStream::File> map_file(const fs::path& p, const CorpusSettings& c) {
  auto f = std::make_shared<TokenStream::File>();
  f->path = p.string();
  f->width = token_width(c.format);
  const int fd = ::open(f->path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw SettingsError(
        fmt::format("config key '{}.files': cannot read '{}': {}", c.key, f->path, std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw SettingsError(fmt::format("config key '{}.files': '{}' is not a regular file", c.key, f->path));
  }
  f->bytes = static_cast<size_t>(st.st_size);
  if (f->bytes % static_cast<size_t>(f->width) != 0) {
    ::close(fd);
    throw SettingsError(fmt::format(
        "config key '{}.format': '{}' holds {} bytes, not a multiple of {} ({} tokens are {} bytes each): a "
        "truncated file, or not in this format",
        c.key, f->path, f->bytes, f->width, c.format, f->width));
  }
  if (f->bytes > 0) {
    void* m = ::mmap(nullptr, f->bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw SettingsError(
          fmt::format("config key '{}.files': cannot map '{}': {}", c.key, f->path, std::strerror(err)));
    }
    f->data = static_cast<const unsigned char*>(m);
  }
  ::close(fd);  // the mapping stays valid
  return f;
}

uint64_t mix(uint64_t a, uint64_t b) {
  // splitmix64 of a combined word: independent streams per (seed, epoch).
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

// ------------------------------------------------------------ TokenStream

void TokenStream::append(Piece p) {
  if (p.size == 0) return;
  starts_.push_back(size_);
  size_ += p.size;
  pieces_.push_back(std::move(p));
}

torch::Tensor TokenStream::slice(int64_t start, int64_t end) const {
  TORCH_CHECK(0 <= start && start <= end && end <= size_, "token slice [", start, ", ", end, ") outside [0, ", size_,
              ")");
  torch::Tensor out = torch::empty({end - start}, torch::kInt64);
  int64_t* d = out.data_ptr<int64_t>();
  // The piece holding `start`, then onwards.
  size_t k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), start) - starts_.begin()) - 1;
  for (int64_t i = start; i < end; ++k) {
    const Piece& p = pieces_[k];
    const int64_t from = i - starts_[k], to = std::min(p.size, end - starts_[k]);
    const File& f = *p.file;
    if (f.width == 1) {  // the common case, bytes: a plain widening copy
      const unsigned char* src = f.data + p.begin + from;
      for (int64_t j = 0; j < to - from; ++j) d[j] = src[j];
    } else {
      for (int64_t j = from; j < to; ++j) d[j - from] = f.at(p.begin + j);
    }
    d += to - from;
    i += to - from;
  }
  return out;
}

std::optional<TokenLocation> TokenStream::find_at_least(int64_t vocab) const {
  for (const Piece& p : pieces_) {
    const File& f = *p.file;
    for (int64_t j = p.begin; j < p.begin + p.size; ++j) {
      const int64_t v = f.at(j);
      if (v >= vocab) return TokenLocation{f.path, j, v};
    }
  }
  return std::nullopt;
}

// ----------------------------------------------------------------- Corpus

int64_t Corpus::total_tokens() const { return train.numel() + validation.numel() + heldout.numel(); }

Corpus load_corpus(const CorpusSettings& c, const std::string& base_dir, int64_t context) {
  Corpus corpus;
  corpus.key = c.key;
  corpus.format = c.format;
  for (const fs::path& p : expand(c, base_dir)) {
    std::shared_ptr<const TokenStream::File> f = map_file(p, c);
    const int64_t n = f->tokens();
    const int64_t h = c.evaluation_only ? n : static_cast<int64_t>(static_cast<double>(n) * c.holdout);
    const int64_t v = c.evaluation_only ? 0 : static_cast<int64_t>(static_cast<double>(n) * c.validation);
    corpus.train.append({f, 0, n - h - v});
    corpus.validation.append({f, n - h - v, v});
    corpus.heldout.append({f, n - h, h});
    corpus.files.push_back({f->path, n, h, v});
  }
  const std::string unit = c.format == "bytes" ? "bytes" : c.format + " tokens";
  if (corpus.total_tokens() == 0) {
    throw SettingsError(fmt::format("config key '{}.files': the corpus is empty (0 {} in {} file(s))", c.key, unit,
                                    corpus.files.size()));
  }
  const int64_t window = context + 1;
  if (c.evaluation_only) {
    if (corpus.heldout.numel() < window) {
      throw SettingsError(fmt::format(
          "config key '{}.files': the corpus is too small: {} {}; it needs at least one window of model.context + 1 "
          "= {}",
          c.key, corpus.heldout.numel(), unit, window));
    }
  } else if (corpus.train.numel() < window || corpus.heldout.numel() < window ||
             (c.validation > 0.0 && corpus.validation.numel() < window)) {
    throw SettingsError(
        fmt::format("config key '{}.files': the corpus is too small: {} training, {} validation and {} held-out {} "
                    "(validation {}, holdout {}), each split needs at least one window of model.context + 1 = {}",
                    c.key, corpus.train.numel(), corpus.validation.numel(), corpus.heldout.numel(), unit, c.validation,
                    c.holdout, window));
  }
  return corpus;
}

void check_vocabulary(const Corpus& c, int64_t vocab, const std::string& model) {
  for (const TokenStream* s : {&c.train, &c.validation, &c.heldout}) {
    if (auto at = s->find_at_least(vocab)) {
      throw SettingsError(fmt::format(
          "config key '{}': token {} of '{}' (0-based, {} format) is {}, beyond the vocabulary of {} ({} ids, "
          "0..{}): the data was tokenised for another model, or its format is wrong",
          c.key, at->index, at->path, c.format, at->value, model, vocab, vocab - 1));
    }
  }
}

// ---------------------------------------------------------- BatchSampler

BatchSampler::BatchSampler(const Corpus& corpus, int64_t window, int64_t batch, uint64_t seed)
    : data_(corpus.train), window_(window), batch_(batch), seed_(seed) {
  n_ = (data_.numel() - (window - 1)) / window;
  if (batch_ > n_) {
    throw SettingsError(fmt::format(
        "config key 'training.batch': {} is larger than the data: the training split of {} ({} tokens) holds only "
        "{} windows of model.context + 1 = {} tokens",
        batch_, corpus.key, data_.numel(), n_, window));
  }
}

void BatchSampler::prepare_epoch(int64_t epoch) {
  if (epoch == epoch_) return;
  std::mt19937_64 rng(mix(seed_, static_cast<uint64_t>(epoch)));
  perm_.resize(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) perm_[static_cast<size_t>(i)] = i;
  for (int64_t i = n_ - 1; i > 0; --i) {  // Fisher–Yates with our own index draw (portable)
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
  }
  shift_ = static_cast<int64_t>(rng() % static_cast<uint64_t>(window_));
  if (shift_ + n_ * window_ > data_.numel()) shift_ = 0;
  epoch_ = epoch;
}

torch::Tensor BatchSampler::batch(int64_t step) {
  std::vector<torch::Tensor> rows;
  rows.reserve(static_cast<size_t>(batch_));
  for (int64_t j = 0; j < batch_; ++j) {
    const int64_t i = step * batch_ + j;
    prepare_epoch(i / n_);
    const int64_t start = shift_ + perm_[static_cast<size_t>(i % n_)] * window_;
    rows.push_back(data_.slice(start, start + window_));
  }
  return torch::stack(rows);
}

torch::Tensor eval_windows(const TokenStream& stream, int64_t window, int64_t max_windows) {
  const int64_t m = stream.numel() / window;
  const int64_t count = std::min(m, max_windows);
  std::vector<torch::Tensor> rows;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t w = k * m / count;
    rows.push_back(stream.slice(w * window, (w + 1) * window));
  }
  return torch::stack(rows);
}

}  // namespace gradlora::app
