#pragma once
// The `--key=value` command lines of the benchmark programs: each option is bound to a
// variable; an unknown argument or a value that does not parse exits with status 2.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace gradlora::bench {

class Args {
 public:
  explicit Args(std::string program) : program_(std::move(program)) {}
  Args& add(const std::string& key, int& v) { return bind(key, &v); }
  Args& add(const std::string& key, int64_t& v) { return bind(key, &v); }
  Args& add(const std::string& key, std::string& v) { return bind(key, &v); }

  void parse(int argc, char** argv) const {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      const auto eq = a.find('=');
      const std::string key = a.substr(0, eq), val = eq == std::string::npos ? "" : a.substr(eq + 1);
      const Slot* slot = find(key);
      if (!slot) fail("unknown argument '" + a + "'");
      try {
        if (auto* p = std::get_if<int*>(&slot->target)) {
          **p = std::stoi(val);
        } else if (auto* q = std::get_if<int64_t*>(&slot->target)) {
          **q = std::stoll(val);
        } else {
          *std::get<std::string*>(slot->target) = val;
        }
      } catch (const std::exception&) {
        fail("'" + key + "' needs a number, got '" + val + "'");
      }
    }
  }

 private:
  struct Slot {
    std::string key;
    std::variant<int*, int64_t*, std::string*> target;
  };
  template <typename T>
  Args& bind(const std::string& key, T* v) {
    slots_.push_back({key, v});
    return *this;
  }
  const Slot* find(const std::string& key) const {
    for (const auto& s : slots_) {
      if (s.key == key) return &s;
    }
    return nullptr;
  }
  [[noreturn]] void fail(const std::string& what) const {
    std::fprintf(stderr, "%s: %s\n", program_.c_str(), what.c_str());
    std::exit(2);
  }
  std::string program_;
  std::vector<Slot> slots_;
};

/// The options every benchmark of a stack of linear layers takes (its Options has
/// these fields): threads, layers, dim, batch, rank, steps, warmup.
template <typename Options>
Args& add_stack_options(Args& args, Options& o) {
  return args.add("--threads", o.threads)
      .add("--layers", o.layers)
      .add("--dim", o.dim)
      .add("--batch", o.batch)
      .add("--rank", o.rank)
      .add("--steps", o.steps)
      .add("--warmup", o.warmup);
}

}  // namespace gradlora::bench
