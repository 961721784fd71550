# ctest driver: install xquant from the build tree into a scratch prefix, then configure, build and
# run the consumer project against it. Variables: BUILD_DIR, SOURCE_DIR, WORK_DIR.
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "cmake --install failed: ${rc}")
endif()
# The headers must build warning-free as C++17 (the requirement) and as C++20.
foreach(std 17 20)
  set(dir "${WORK_DIR}/build${std}")
  execute_process(COMMAND ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${dir}" -DCMAKE_BUILD_TYPE=Release
                          "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" -DCMAKE_CXX_STANDARD=${std}
                          "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Wpedantic -Werror" RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "configuring the consumer (C++${std}) against the installed package failed: ${rc}")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} --build "${dir}" RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "building the consumer as C++${std} failed: ${rc}")
  endif()
  execute_process(COMMAND "${dir}/consumer" RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "the consumer (C++${std}) failed: ${rc}")
  endif()
endforeach()
