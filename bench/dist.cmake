# Data-parallel benchmark (docs/data-parallel.md): low-rank vs full-gradient all-reduce over
# Gloo on loopback. Included from bench/CMakeLists.txt: include(${CMAKE_CURRENT_LIST_DIR}/dist.cmake)
add_executable(gradlora_dist_bench ${CMAKE_CURRENT_LIST_DIR}/dist_bench.cpp)
target_link_libraries(gradlora_dist_bench PRIVATE gradlora::distributed)
target_compile_options(gradlora_dist_bench PRIVATE -Wall -Wextra)
target_precompile_headers(gradlora_dist_bench PRIVATE <torch/torch.h>)
