# Optional CUDA backend: INTERFACE target xquant::cuda (headers under include/xquant/backend/cuda,
# umbrella <xquant/cuda.cuh>). ON by default when a CUDA compiler is found; the GPU tests and
# benches build whenever the target exists and skip at run time when no device is present.
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(_xq_cuda_default ON)
else()
  set(_xq_cuda_default OFF)
endif()
option(XQUANT_ENABLE_CUDA "Build the CUDA backend (xquant::cuda) and its tests and benches" ${_xq_cuda_default})

if(XQUANT_ENABLE_CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "XQUANT_ENABLE_CUDA is ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER)")
  endif()
  # Hopper by default; 90a (wgmma/setmaxnreg) when asked for explicitly, e.g. -DCMAKE_CUDA_ARCHITECTURES=90a.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  if(NOT DEFINED CMAKE_CUDA_STANDARD)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  endif()

  add_library(xquant_cuda INTERFACE)
  add_library(xquant::cuda ALIAS xquant_cuda)
  set_target_properties(xquant_cuda PROPERTIES EXPORT_NAME cuda)
  target_link_libraries(xquant_cuda INTERFACE xquant::xquant CUDA::cudart CUDA::cublas)
  # Device code must keep IEEE division and rounding: the quantizer's codes match the CPU's bit for bit.
  target_compile_options(xquant_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  message(STATUS "xquant: CUDA backend ON (architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "xquant: CUDA backend OFF")
endif()
