# ctest's package test: install the built gradlora into a temporary prefix, then
# configure, build and run tests/consumer against it with find_package(gradlora).
# Arguments: BUILD_DIR (gradlora's build), SOURCE_DIR (this folder), WORK_DIR (scratch).
file(REMOVE_RECURSE "${WORK_DIR}")
function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()
step("install" ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix")
step("configure" ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -DCMAKE_BUILD_TYPE=Release
     "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
step("build" ${CMAKE_COMMAND} --build "${WORK_DIR}/build")
step("run" "${WORK_DIR}/build/consumer")
if(NOT step_output MATCHES "weight moved yes")
  message(FATAL_ERROR "consumer test: unexpected output: ${step_output}")
endif()
message(STATUS "${step_output}")
file(REMOVE_RECURSE "${WORK_DIR}")
