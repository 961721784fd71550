#pragma once
// xquant's GPU umbrella header (CUDA translation units only): device streams that quantize and
// append X, fused rematerialization of K/V, and decode attention with absorbed values.
// The CPU headers never include this one; <xquant/xquant.hpp> stays free of CUDA headers.

#if !defined(__CUDACC__)
#error "<xquant/cuda.cuh> needs a CUDA compiler (compile this file as CUDA); CPU code includes <xquant/xquant.hpp>"
#endif

#include "config.hpp"
#include "core/error.hpp"
#include "core/half.hpp"
#include "quant/format.hpp"
#include "quant/packing.hpp"
#include "quant/uniform.hpp"
#include "cache/config.hpp"
#include "remat/rope.hpp"
#include "backend/cuda/error.cuh"
#include "backend/cuda/memory.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/quantize.cuh"
#include "backend/cuda/stream.cuh"
#include "backend/cuda/mainloop.cuh"
#include "backend/cuda/remat.cuh"
#include "backend/cuda/attention.cuh"
