#include "svg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace gradlora::app {

namespace {

constexpr const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
constexpr int kColors = sizeof(kPalette) / sizeof(kPalette[0]);

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

/// "Nice" tick positions covering [lo, hi].
std::vector<double> ticks(double lo, double hi, int target = 6) {
  const double span = hi - lo;
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    step = m * mag;
    if (span / step <= target) break;
  }
  std::vector<double> t;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + 1e-9 * step; v += step) t.push_back(v);
  return t;
}

std::string fmt_tick(double v) {
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 1e4 || a < 1e-3) return fmt::format("{:.1e}", v);
  return fmt::format("{:g}", std::round(v * 1e4) / 1e4);
}

}  // namespace

std::string svg_chart(const std::vector<Panel>& panels, const std::string& title) {
  const double pw = 460, ph = 340, ml = 62, mr = 16, mt = 30, mb = 48, top = 34;
  const double W = pw * static_cast<double>(std::max<size_t>(1, panels.size())), H = ph + top;
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{3}</text>\n",
      W, H, W / 2, esc(title));
  for (size_t pi = 0; pi < panels.size(); ++pi) {
    const Panel& p = panels[pi];
    const double ox = pw * static_cast<double>(pi), oy = top;
    const double x0 = ox + ml, x1 = ox + pw - mr, y0 = oy + ph - mb, y1 = oy + mt;
    double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
    for (const auto& s : p.series) {
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
        if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
        const double b = i < s.band.size() && std::isfinite(s.band[i]) ? s.band[i] : 0.0;
        xmin = std::min(xmin, s.x[i]);
        xmax = std::max(xmax, s.x[i]);
        ymin = std::min(ymin, s.y[i] - b);
        ymax = std::max(ymax, s.y[i] + b);
      }
    }
    if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
    if (xmax <= xmin) xmax = xmin + 1;
    if (ymax <= ymin) ymax = ymin + 1;
    const double pad = 0.04 * (ymax - ymin);
    ymin -= pad;
    ymax += pad;
    auto X = [&](double v) { return x0 + (v - xmin) / (xmax - xmin) * (x1 - x0); };
    auto Y = [&](double v) { return y0 - (v - ymin) / (ymax - ymin) * (y0 - y1); };
    out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n", (x0 + x1) / 2,
                       oy + 18, esc(p.title));
    for (double t : ticks(xmin, xmax)) {
      out += fmt::format(
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#e5e5e5\"/>"
          "<text x=\"{0:.1f}\" y=\"{3:.1f}\" text-anchor=\"middle\">{4}</text>\n",
          X(t), y0, y1, y0 + 16, fmt_tick(t));
    }
    for (double t : ticks(ymin, ymax)) {
      out += fmt::format(
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#e5e5e5\"/>"
          "<text x=\"{3:.1f}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}</text>\n",
          x0, Y(t), x1, x0 - 5, Y(t) + 4, fmt_tick(t));
    }
    out += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", x0, y1,
                       x1 - x0, y0 - y1);
    out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (x0 + x1) / 2, y0 + 34,
                       esc(p.xlabel));
    out +=
        fmt::format("<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\" transform=\"rotate(-90 {0} {1})\">{2}</text>\n",
                    ox + 16, (y0 + y1) / 2, esc(p.ylabel));
    for (size_t si = 0; si < p.series.size(); ++si) {
      const Series& s = p.series[si];
      const char* color = kPalette[(s.color >= 0 ? s.color : static_cast<int>(si)) % kColors];
      const size_t n = std::min(s.x.size(), s.y.size());
      const bool band = s.band.size() >= n && n > 0 &&
                        std::all_of(s.band.begin(), s.band.begin() + static_cast<std::ptrdiff_t>(n),
                                    [](double b) { return std::isfinite(b); });
      if (band) {
        std::string poly;
        for (size_t i = 0; i < n; ++i) poly += fmt::format("{:.1f},{:.1f} ", X(s.x[i]), Y(s.y[i] + s.band[i]));
        for (size_t i = n; i-- > 0;) poly += fmt::format("{:.1f},{:.1f} ", X(s.x[i]), Y(s.y[i] - s.band[i]));
        out += fmt::format("<polygon points=\"{}\" fill=\"{}\" fill-opacity=\"0.15\" stroke=\"none\"/>\n", poly, color);
      }
      std::string pts;
      for (size_t i = 0; i < n; ++i) {
        if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) pts += fmt::format("{:.1f},{:.1f} ", X(s.x[i]), Y(s.y[i]));
      }
      out += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\"{}/>\n", pts, color,
                         s.dashed ? " stroke-dasharray=\"5,3\"" : "");
      const bool left = p.legend.find("left") != std::string::npos;
      const bool bottom = p.legend.find("bottom") != std::string::npos;
      const double lx = left ? x0 + 160 : x1;  // the legend block spans [lx - 150, lx]
      const double ly = bottom ? y0 - 10 - 16 * static_cast<double>(p.series.size() - 1 - si)
                               : y1 + 14 + 16 * static_cast<double>(si);
      out += fmt::format(
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"{3}\" stroke-width=\"2\"{4}/>"
          "<text x=\"{5:.1f}\" y=\"{6:.1f}\">{7}</text>\n",
          lx - 150, ly, lx - 128, color, s.dashed ? " stroke-dasharray=\"5,3\"" : "", lx - 122, ly + 4, esc(s.label));
    }
  }
  out += "</svg>\n";
  return out;
}

}  // namespace gradlora::app
