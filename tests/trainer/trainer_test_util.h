#pragma once
// What the trainer's end-to-end tests share: running the built program and
// checking that a failure is one clean error.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace gradlora::app::cli_test {

namespace fs = std::filesystem;

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Result {
  int code = -1;
  std::string out, err;
};

/// Runs the program with `args`, capturing stdout and stderr.
inline Result run(const std::string& args, const fs::path& dir) {
  fs::create_directories(dir);
  const fs::path o = dir / "stdout.txt", e = dir / "stderr.txt";
  const std::string cmd = std::string(GRADLORA_BIN) + " " + args + " > " + o.string() + " 2> " + e.string();
  const int status = std::system(cmd.c_str());
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(o);
  r.err = slurp(e);
  return r;
}

/// Starts the program with `args` in the background, its stderr in `log` and
/// its stdout discarded; returns its pid (for kill and waitpid).
inline pid_t start(const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stderr);
    std::freopen("/dev/null", "w", stdout);
    std::vector<char*> argv{const_cast<char*>(GRADLORA_BIN)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(GRADLORA_BIN, argv.data());
    std::_Exit(127);
  }
  return pid;
}

/// A fresh scratch folder per test.
inline fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("gradlora_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

inline void expect_clean_error(const Result& r, const std::vector<std::string>& needles) {
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.code, -1) << "killed by a signal";
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
  EXPECT_NE(r.err.find("gradlora: error:"), std::string::npos) << r.err;
  // No stack trace, no uncaught exception.
  for (const char* bad : {"Exception raised from", "frame #", "terminate called", "what():"}) {
    EXPECT_EQ(r.err.find(bad), std::string::npos) << r.err;
  }
}

}  // namespace gradlora::app::cli_test
