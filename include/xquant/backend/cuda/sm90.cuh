#pragma once
// Hopper (sm_90a) building blocks for the fused remat GEMM: mbarriers, bulk tensor copies (TMA),
// wgmma shared-memory descriptors and the register-A wgmma itself. Device code here assembles only
// for the sm_90a target (`-gencode=arch=compute_90a,code=sm_90a`); in any other build the bodies
// compile to a trap and sm90a_kernels() reports false at run time, so callers take their portable
// path instead.

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <cstdint>

#include "error.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define XQ_SM90A 1
#else
#define XQ_SM90A 0
#endif

namespace xquant::cuda {

namespace detail {
template <int = 0>
__global__ void sm90a_probe_kernel(int* out) { *out = XQ_SM90A; }
}  // namespace detail

/// True when the current device runs this binary's sm_90a code (a Hopper GPU and a build for
/// compute_90a). Found once per device by launching a probe kernel (synchronously), and cached;
/// DeviceStream's constructor asks first, so that no later call (e.g. inside CUDA graph capture)
/// has to launch the probe.
inline bool sm90a_kernels() {
  static std::atomic<signed char> state[64];  // 0: not yet known, 1: no, 2: yes
  int dev = 0;
  XQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && state[dev].load() != 0) return state[dev].load() == 2;
  int major = 0;
  XQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  int result = 0;
  if (major == 9) {
    int* d = nullptr;
    XQ_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
    detail::sm90a_probe_kernel<><<<1, 1>>>(d);
    const cudaError_t launch = cudaGetLastError();  // no sm_90 code in the binary: not available
    if (launch == cudaSuccess) XQ_CUDA_CHECK(cudaMemcpy(&result, d, sizeof(int), cudaMemcpyDeviceToHost));
    XQ_CUDA_CHECK(cudaFree(d));
  }
  if (dev < 64) state[dev].store(result ? 2 : 1);
  return result != 0;
}

namespace sm90 {

// ---- host: tensor maps ----------------------------------------------------------------------------

/// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    XQ_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    require<CudaError>(q == cudaDriverEntryPointSuccess && p != nullptr, "cuTensorMapEncodeTiled is not available");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

/// A tensor map of `rank` dimensions (innermost first; strides in bytes for dimensions 1..rank-1).
inline CUtensorMap tensor_map(CUtensorMapDataType type, cuuint32_t rank, const void* base, const cuuint64_t* dims,
                              const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle) {
  CUtensorMap m{};
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode_tiled()(&m, type, rank, const_cast<void*>(base), dims, strides, box, unit,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require<CudaError>(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (error ", static_cast<int>(r), ")");
  return m;
}

// ---- device: barriers and copies ------------------------------------------------------------------

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
#if XQ_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}
/// Makes barrier initialization visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbar_fence_init() {
#if XQ_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/// One arrival that also expects `bytes` from bulk copies before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, unsigned bytes) {
#if XQ_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
/// One plain arrival.
__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
#if XQ_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
/// Waits until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
#if XQ_SM90A
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

/// Bulk tensor copy global -> shared of one box at coordinates (innermost first), completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, std::uint64_t* bar) {
#if XQ_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#endif
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            std::uint64_t* bar) {
#if XQ_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
#endif
}

/// Bulk tensor copy shared -> global of one box at coordinates (innermost first); the parts of the
/// box outside the tensor are not written. Completes in the calling thread's bulk group.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
#if XQ_SM90A
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<std::uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if XQ_SM90A
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
/// Waits until at most N of this thread's bulk groups are pending (Read: only their reads of shared
/// memory need to be done, so the buffer may be reused).
template <int N, bool Read>
__device__ __forceinline__ void bulk_wait() {
#if XQ_SM90A
  if constexpr (Read) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
  else asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
/// Makes this thread's shared-memory writes visible to the async proxy (a following TMA store).
__device__ __forceinline__ void fence_proxy_async_smem() {
#if XQ_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/// Barrier `id` (1..15; 0 is __syncthreads') over the first `threads` threads' warps.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- device: wgmma --------------------------------------------------------------------------------

/// Descriptor of a K-major bf16 operand tile in shared memory written by TMA with 128-byte
/// swizzle: rows of 64 values (128 bytes), 8-row core groups 1024 bytes apart. `addr` must lie in
/// a 1024-byte aligned tile; stepping along K by 16 values adds 32 bytes to it.
__device__ __forceinline__ std::uint64_t kmajor_sw128_desc(std::uint32_t addr) {
  std::uint64_t d = 0;
  d |= static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4);   // start address
  d |= static_cast<std::uint64_t>(1) << 16;                 // leading byte offset (unused with this swizzle)
  d |= static_cast<std::uint64_t>(1024 >> 4) << 32;         // stride byte offset: next 8-row group
  d |= static_cast<std::uint64_t>(1) << 62;                 // layout: 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
#if XQ_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if XQ_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if XQ_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/// Raises (Inc) or lowers the warpgroup's per-thread register budget to N (a multiple of 8).
template <bool Inc, int N>
__device__ __forceinline__ void set_max_registers() {
#if XQ_SM90A
  if constexpr (Inc) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

/// Keeps the compiler from moving reads or writes of `r` across wgmma issue and wait points.
template <class T>
__device__ __forceinline__ void fence_operand(T& r) {
  asm volatile("" : "+r"(r)::"memory");
}
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(std::uint64_t& r) { asm volatile("" : "+l"(r)::"memory"); }

/// d[0..127] += A(registers, 4 × bf16x2) · B(shared memory, descriptor), m64n256k16, fp32 accumulators.
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const std::uint32_t (&a)[4], std::uint64_t desc_b) {
#if XQ_SM90A
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  (void)d, (void)a, (void)desc_b;
  __trap();
#endif
}

}  // namespace sm90
}  // namespace xquant::cuda
