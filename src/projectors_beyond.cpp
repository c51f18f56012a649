// galore (SVD projection) and hadamard (FedPara / LoHa) projectors.
#include "projectors_internal.h"

#include <fmt/format.h>

namespace gradlora::detail {

std::unique_ptr<Projector> make_galore_projector(ProjectorContext ctx) {
  throw ConfigError(fmt::format("parameter '{}': method 'galore' is not available yet", ctx.name));
}

std::unique_ptr<Projector> make_hadamard_projector(ProjectorContext ctx) {
  throw ConfigError(fmt::format("parameter '{}': method 'hadamard' is not available yet", ctx.name));
}

}  // namespace gradlora::detail
