# gradlora_sanitize(target): AddressSanitizer + UBSan on one target, when
# GRADLORA_SANITIZE is on. Applied to the library and the test targets. The link
# option is PUBLIC: whatever links the instrumented static library (examples,
# the trainer) needs the sanitizer runtimes too.
function(gradlora_sanitize target)
  if(GRADLORA_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer)
    target_link_options(${target} PUBLIC -fsanitize=address,undefined)
  endif()
endfunction()
