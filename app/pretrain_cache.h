#pragma once
// The cache of pre-trained models: one file per pre-training setting, trained once.
#include "data.h"
#include "language_model.h"
#include "settings.h"

#include <string>

namespace gradlora::app {

/// Loads a file of the cache into the built-in model `model`.
void load_pretrained(LanguageModel& model, const std::string& path);
/// The pre-trained model's file in the cache, training it first when missing.
/// Returns "" when interrupted.
std::string ensure_pretrained(const Settings& s, const Corpus& corpus, const std::string& cache_dir);

}  // namespace gradlora::app
