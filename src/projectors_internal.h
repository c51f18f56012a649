#pragma once
// Factories of the methods beyond the seed (galore, hadamard), defined in
// projectors_beyond.cpp and called from make_projector().
#include <gradlora/projector.h>

#include <memory>

namespace gradlora::detail {

std::unique_ptr<Projector> make_galore_projector(ProjectorContext ctx);
std::unique_ptr<Projector> make_hadamard_projector(ProjectorContext ctx);

}  // namespace gradlora::detail
