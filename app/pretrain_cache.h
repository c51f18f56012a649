#pragma once
// The cache of pre-trained models: one file per pre-training setting, trained once.
#include "data.h"
#include "language_model.h"
#include "settings.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace gradlora::app {

/// The learning curve of a pre-training, kept next to the model in the cache
/// (`pretrained-<key>.csv`: step, lr, train_loss, val_loss, test_loss, phase).
std::string pretrain_curve_path(const std::string& model_path);

/// The plateau test of pre-training: the step of the last entry of `hist`
/// ((step, validation loss) of every evaluation so far, in order) when the best
/// loss up to it is less than `min_delta` below the best loss up to `window`
/// steps earlier; -1 otherwise (also while no evaluation is that old).
int64_t plateau_step(const std::vector<std::pair<int64_t, double>>& hist, int64_t window, double min_delta);

/// Loads a file of the cache into the built-in model `model`.
void load_pretrained(LanguageModel& model, const std::string& path);
/// The pre-trained model's file in the cache, training it first when missing.
/// With training.pretrain.plateau: warm-up, constant lr until the best
/// validation loss improved by less than min_delta over the last `window`
/// steps (or `steps` is reached), then the lr falls linearly to 0 over
/// `cooldown` steps. Without it: warm-up and cosine over `steps`.
/// Returns "" when interrupted.
std::string ensure_pretrained(const Settings& s, const Corpus& corpus, const std::string& cache_dir);

}  // namespace gradlora::app
