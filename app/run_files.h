#pragma once
// The files of a run: metrics.csv, loss.svg, summary.json, and the hash of the
// settings that decide a run's result.
#include "settings.h"
#include "trainer.h"

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

namespace gradlora::app {

std::string metrics_csv(const std::vector<MetricRow>& rows);
std::vector<MetricRow> parse_metrics_csv(const std::string& text);
/// The loss curves of a run (held-out B, and the forgetting corpus A unless
/// `base_corpus` is empty: "pre-training" or "reference"), as SVG; `unit` is
/// what a token is ("byte", "token").
std::string loss_svg(const std::vector<MetricRow>& rows, const std::string& title, const std::string& base_corpus,
                     const std::string& unit);
/// The subspace diagnostics of a run (the `energy_kept:` and `overlap:` columns), as SVG.
std::string subspace_svg(const std::vector<MetricRow>& rows, const std::string& title);
nlohmann::json summary_json(const RunSummary& s);
/// summary.json of a finished run in `dir`, if there is one.
std::optional<RunSummary> read_summary(const std::string& dir);
/// The forgetting (base_eval_loss minus its first value) where eval_loss first
/// reaches `level`, interpolated linearly between evaluations; NaN when it never does.
double forgetting_at(const std::vector<MetricRow>& rows, double level);
/// A hash of the settings that determine a run's result (with the contents of
/// a TorchScript model's file: another file is another run).
std::string result_hash(const YAML::Node& tree, const Settings& s);

}  // namespace gradlora::app
