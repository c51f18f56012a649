# gradlora_sanitize(target): AddressSanitizer + UBSan on one target, when
# GRADLORA_SANITIZE is on. Applied to test targets only.
function(gradlora_sanitize target)
  if(GRADLORA_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()
