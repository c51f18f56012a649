#pragma once
// How a YAML node is named in an error message, for the config loader and the
// trainer's settings alike (header-only; the includer links yaml-cpp).
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <string>

namespace gradlora::yaml_text {

/// " (line L, column C)" of a node read from text, or "" for one built in code.
inline std::string where(const YAML::Node& n) {
  const YAML::Mark m = n.Mark();
  if (m.line < 0) return "";
  return fmt::format(" (line {}, column {})", m.line + 1, m.column + 1);
}

/// The value as a user wrote it: 'text', a list, a mapping, or nothing.
inline std::string show(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "nothing";
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  return "a mapping";
}

}  // namespace gradlora::yaml_text
