#pragma once
// Everything that differs between the LibTorch releases gradlora supports (1.13 and 2.x),
// and nothing else. Each difference is detected from the API itself (a type, a base class),
// not from a version number, so a release that changes one of them is caught at compile time.
//
//   * The key of torch::optim::Optimizer::state(): a string of the TensorImpl address in
//     1.13 and early 2.x, the address itself (void*) later.
//   * c10d's TCPStore: since 2.4 it defaults to a libuv server, which a build without libuv
//     (Debian's 2.6) cannot start; gradlora asks for the plain socket server everywhere.
//   * c10d process groups: in 1.13 a backend (ProcessGroupGloo, ProcessGroupNCCL) *is* a
//     c10d::ProcessGroup; since 2.0 it is a c10d::Backend that a ProcessGroup dispatches to.
//     That part needs the c10d headers: it is compiled where GRADLORA_COMPAT_C10D is defined
//     before this header is included (the data-parallel sources only).

#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

namespace gradlora::compat {

/// The key type of torch::optim::Optimizer::state(), whatever the release.
using OptimizerStateKey = typename std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>::key_type;

/// The key of tensor `t` in torch::optim::Optimizer::state() (a template, so that only the
/// branch of this release is instantiated).
template <typename Key = OptimizerStateKey>
Key optimizer_state_key(const torch::Tensor& t) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;  // as LibTorch writes it: the address, printed
    os << static_cast<const void*>(t.unsafeGetTensorImpl());
    return os.str();
  } else {
    return static_cast<Key>(t.unsafeGetTensorImpl());
  }
}

}  // namespace gradlora::compat

#ifdef GRADLORA_COMPAT_C10D
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace gradlora::compat {

/// Wraps a freshly constructed c10d backend (ProcessGroupGloo, ProcessGroupNCCL) as the
/// c10d::ProcessGroup the rest of gradlora talks to. `Impl` is the backend's class and
/// `backend_type` its ProcessGroup::BackendType name (used only where the two differ).
/// A template, so that only the branch that fits this release is ever instantiated.
template <typename Impl, typename PG = c10d::ProcessGroup>
c10::intrusive_ptr<c10d::ProcessGroup> as_process_group(c10::intrusive_ptr<Impl> backend,
                                                        const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                        int world_size, const char* backend_type) {
  if constexpr (std::is_base_of_v<PG, Impl>) {
    (void)store, (void)rank, (void)world_size, (void)backend_type;
    return backend;  // 1.13: the backend is the process group
  } else {
    auto pg = c10::make_intrusive<PG>(store, rank, world_size);
    const auto type = std::string(backend_type) == "nccl" ? PG::BackendType::NCCL : PG::BackendType::GLOO;
    pg->setDefaultBackend(type);
    // Gloo serves CPU tensors (and CUDA ones, staged through the host); NCCL serves CUDA only.
    if (type == PG::BackendType::GLOO) pg->setBackend(c10::DeviceType::CPU, type, backend);
    pg->setBackend(c10::DeviceType::CUDA, type, backend);
    return pg;
  }
}

namespace detail {
template <typename Options>
auto plain_sockets(Options& o, int) -> decltype(o.useLibUV = false, void()) {
  o.useLibUV = false;
}
template <typename Options>
void plain_sockets(Options&, long) {}
}  // namespace detail

/// c10d::TCPStoreOptions with the plain socket server, which every release has. Since 2.4
/// `useLibUV` defaults to true, and a LibTorch built without libuv (Debian's 2.6) then fails
/// to start the store; 1.13 has no such field.
template <typename Options>
void use_plain_sockets(Options& o) {
  detail::plain_sockets(o, 0);
}

}  // namespace gradlora::compat
#endif
