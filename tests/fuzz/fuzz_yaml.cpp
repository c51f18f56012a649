// libFuzzer entry point: any byte string given to the YAML loader must either
// parse into a Config that validates, or throw gradlora::ConfigError. Any other
// exception, a crash, a leak or undefined behaviour is a finding.
#include <gradlora/config.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const gradlora::Config cfg = gradlora::Config::from_yaml_string(text);
    cfg.validate();  // what parsed must be valid
    for (const auto& t : cfg.targets) (void)gradlora::pattern_matches(t.match, "layers.0.attn.q_proj.weight");
  } catch (const gradlora::ConfigError& e) {
    if (std::string(e.what()).empty()) std::abort();  // an error must say something
  } catch (const std::exception& e) {
    std::fprintf(stderr, "escaped exception (not gradlora::ConfigError): %s\n", e.what());
    std::abort();
  }
  return 0;
}
