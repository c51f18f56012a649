#pragma once
/// \file svg.h
/// Line charts as standalone SVG text: no plotting library, no runtime
/// dependency; any browser opens the file.

#include <string>
#include <vector>

namespace gradlora::app {

/// One curve; `band` (same length as y, optional) draws y ± band shaded.
struct Series {
  std::string label;
  std::vector<double> x, y, band;
  bool dashed = false;
  int color = -1;  ///< palette index; -1 = position in the panel
};

/// One chart area with its own axes.
struct Panel {
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
  /// Corner of the legend: "top-right", "top-left", "bottom-right", "bottom-left".
  std::string legend = "top-right";
};

/// Panels side by side under a common title, as an SVG document.
std::string svg_chart(const std::vector<Panel>& panels, const std::string& title);

}  // namespace gradlora::app
