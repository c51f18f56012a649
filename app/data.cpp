#include "data.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>

namespace fs = std::filesystem;

namespace gradlora::app {

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

std::string read_file(const fs::path& p, const std::string& key) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw SettingsError(fmt::format("config key '{}': cannot read '{}'", key, p.string()));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

torch::Tensor to_tokens(const std::string& bytes) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kInt64);
  auto* d = t.data_ptr<int64_t>();
  for (size_t i = 0; i < bytes.size(); ++i) d[i] = static_cast<unsigned char>(bytes[i]);
  return t;
}

uint64_t mix(uint64_t a, uint64_t b) {
  // splitmix64 of a combined word: independent streams per (seed, epoch).
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

int64_t Corpus::total_bytes() const { return train.numel() + heldout.numel(); }

Corpus load_corpus(const CorpusSettings& c, const std::string& base_dir, int64_t context) {
  Corpus corpus;
  corpus.key = c.key;
  std::string train, held;
  for (const fs::path& p : expand(c, base_dir)) {
    const std::string bytes = read_file(p, c.key + ".files");
    const auto n = static_cast<int64_t>(bytes.size());
    const auto h = static_cast<int64_t>(static_cast<double>(n) * c.holdout);
    train.append(bytes, 0, static_cast<size_t>(n - h));
    held.append(bytes, static_cast<size_t>(n - h), std::string::npos);
    corpus.files.push_back({p.string(), n, h});
  }
  if (train.empty() && held.empty()) {
    throw SettingsError(
        fmt::format("config key '{}.files': the corpus is empty (0 bytes in {} file(s))", c.key, corpus.files.size()));
  }
  const int64_t window = context + 1;
  if (static_cast<int64_t>(train.size()) < window || static_cast<int64_t>(held.size()) < window) {
    throw SettingsError(fmt::format(
        "config key '{}.files': the corpus is too small: {} training and {} held-out bytes (holdout {}), each "
        "split needs at least one window of model.context + 1 = {} bytes",
        c.key, train.size(), held.size(), c.holdout, window));
  }
  corpus.train = to_tokens(train);
  corpus.heldout = to_tokens(held);
  return corpus;
}

BatchSampler::BatchSampler(const Corpus& corpus, int64_t window, int64_t batch, uint64_t seed)
    : data_(corpus.train), window_(window), batch_(batch), seed_(seed) {
  n_ = (data_.numel() - (window - 1)) / window;
  if (batch_ > n_) {
    throw SettingsError(fmt::format(
        "config key 'training.batch': {} is larger than the data: the training split of {} ({} bytes) holds only "
        "{} windows of model.context + 1 = {} bytes",
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
    rows.push_back(data_.slice(0, start, start + window_));
  }
  return torch::stack(rows);
}

torch::Tensor eval_windows(const torch::Tensor& stream, int64_t window, int64_t max_windows) {
  const int64_t m = stream.numel() / window;
  const int64_t count = std::min(m, max_windows);
  std::vector<torch::Tensor> rows;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t w = k * m / count;
    rows.push_back(stream.slice(0, w * window, (w + 1) * window));
  }
  return torch::stack(rows);
}

}  // namespace gradlora::app
