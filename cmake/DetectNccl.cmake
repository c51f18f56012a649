# GRADLORA_HAVE_NCCL: whether LibTorch was built with CUDA and c10d's NCCL backend, so that
# data parallel can use NCCL for CUDA tensors. Checked only when LibTorch links CUDA at all
# (Debian's CPU build does not, and then Gloo is the only backend). GRADLORA_NCCL=OFF skips it.
option(GRADLORA_NCCL "Use c10d's NCCL backend for CUDA tensors when LibTorch has it" ON)
set(GRADLORA_HAVE_NCCL OFF)
if(GRADLORA_NCCL AND ("${TORCH_LIBRARIES}" MATCHES "cuda" OR TARGET torch_cuda))
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_INCLUDES ${TORCH_INCLUDE_DIRS})
  set(CMAKE_REQUIRED_LIBRARIES ${TORCH_LIBRARIES})
  set(CMAKE_REQUIRED_DEFINITIONS -DUSE_C10D_NCCL)
  set(CMAKE_REQUIRED_FLAGS "-std=c++17")
  check_cxx_source_compiles([[
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
int main() {
  auto options = c10d::ProcessGroupNCCL::Options::create();
  return options ? 0 : 1;
}
]] GRADLORA_TORCH_HAS_NCCL)
  unset(CMAKE_REQUIRED_INCLUDES)
  unset(CMAKE_REQUIRED_LIBRARIES)
  unset(CMAKE_REQUIRED_DEFINITIONS)
  unset(CMAKE_REQUIRED_FLAGS)
  if(GRADLORA_TORCH_HAS_NCCL)
    set(GRADLORA_HAVE_NCCL ON)
  endif()
endif()
message(STATUS "gradlora: NCCL backend for data parallel: ${GRADLORA_HAVE_NCCL}")
