#pragma once
// How a YAML node is named in an error message, and keys given twice, for the
// config loader and the trainer's settings alike (header-only; the includer
// links yaml-cpp).
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <string>
#include <unordered_map>

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

/// yaml-cpp keeps both entries of a key written twice in one mapping (and a
/// lookup sees only the first). Walks every mapping of `n`, inside lists too,
/// and returns "config key 'a.b': given twice, at lines L1 and L2" (1-based;
/// the columns when both are on one line) for the first scalar key it finds
/// twice, or "" when there is none.
/// `path` is the key of `n` itself ("" for the top level).
inline std::string duplicate_key(const YAML::Node& n, const std::string& path = "") {
  if (n.IsMap()) {
    std::unordered_map<std::string, YAML::Mark> first;
    for (const auto& kv : n) {
      if (!kv.first.IsScalar()) continue;
      const std::string& k = kv.first.Scalar();
      const std::string key = path.empty() ? k : path + "." + k;
      const YAML::Mark here = kv.first.Mark();
      const auto [it, fresh] = first.emplace(k, here);
      if (!fresh) {
        const YAML::Mark& was = it->second;
        if (was.line == here.line) {  // flow style: {a: 1, a: 2}
          return fmt::format("config key '{}': given twice, at line {}, columns {} and {}", key, here.line + 1,
                             was.column + 1, here.column + 1);
        }
        return fmt::format("config key '{}': given twice, at lines {} and {}", key, was.line + 1, here.line + 1);
      }
      std::string inner = duplicate_key(kv.second, key);
      if (!inner.empty()) return inner;
    }
  } else if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i) {
      std::string inner = duplicate_key(n[i], fmt::format("{}[{}]", path.empty() ? "(top level)" : path, i));
      if (!inner.empty()) return inner;
    }
  }
  return "";
}

}  // namespace gradlora::yaml_text
