#pragma once
// xquant: cache quantized layer inputs X instead of K and V, and rematerialize K and V from them
// (XQuant, arXiv 2508.10395). CPU umbrella header: no CUDA headers are included.

#include "config.hpp"
#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/dispatch.hpp"
#include "core/half.hpp"
#include "quant/format.hpp"
#include "quant/packing.hpp"
#include "quant/uniform.hpp"
#include "quant/reference.hpp"
#include "backend/eigen/quantize.hpp"
#include "backend/eigen/linalg.hpp"
#include "cache/config.hpp"
#include "cache/snapshot.hpp"
#include "cache/stream.hpp"
#include "cache/cache.hpp"
#include "codec/per_layer.hpp"
#include "remat/weights.hpp"
#include "remat/rope.hpp"
#include "remat/materialize.hpp"
#include "remat/attention.hpp"
