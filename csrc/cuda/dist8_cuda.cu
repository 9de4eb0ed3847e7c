// dist8_cuda.cu -- fused 8-bit optimizer kernels for CUDA.
//
// One thread block per quantization block: the two qmaps live in shared memory,
// each thread dequantizes (old absmax; second-moment-like states with their floor),
// applies the rule (dist8_rules.h, no FMA contraction: the rules use __f*_rn
// intrinsics and the file is built with --fmad=false), keeps the new fp32 states and
// outputs in shared memory (global scratch for block sizes above 2048), a block vote
// says whether they are all finite (else the block is skipped: nothing is written but
// a count), a block reduction gives the new absmax, and the block is requantized to
// the exact nearest code (the reference binary search on the shared-memory qmap).
// Bit-identical to the reference backend.
// fused_update_multi_ updates up to MULTI_MAX tensors per launch (thread block b
// finds its tensor in the prefix sums of their block counts), and
// all_finite_multi checks many tensors with one host sync: a step of a model
// with hundreds of parameters costs a few launches, not hundreds.
#ifdef DIST8_CUDA_EMULATION
// tests/cuda_emu: the kernels run as fibers on the CPU (no GPU needed to test their logic).
#include "d8_cuda_emulation.h"
#include <ATen/ATen.h>
#include <torch/library.h>
#else
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#endif

#include <cstdlib>
#include <string>
#include <type_traits>

#include "dist8_rules.h"

#if defined(DIST8_CUDA_EMULATION)
#define D8_GUARD(device) (void)0
#define D8_LAUNCH_CHECK() (void)0
#define D8_ON_DEVICE(t) ((t).is_cpu())
#define D8_LAUNCH(kernel, grid, threads, smem, ...) d8emu::launch(kernel, grid, threads, smem, __VA_ARGS__)
#define D8_DYNAMIC_SHARED(type, name) type* name = d8emu::dynamic_shared<type>()
#else
#define D8_ON_DEVICE(t) ((t).is_cuda())
#define D8_LAUNCH(kernel, grid, threads, smem, ...) kernel<<<grid, threads, smem, D8_STREAM()>>>(__VA_ARGS__)
#define D8_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
// A CUDA build of torch ships the c10/cuda headers: use torch's current stream,
// device guard and launch check. Without them (CPU-only torch: the compile-only
// test in tests/test_cuda_compile.py) fall back to the legacy default stream.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define D8_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define D8_GUARD(device) const c10::cuda::CUDAGuard d8_guard_(device)
#define D8_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#else
namespace dist8 {
struct DeviceGuardFallback {
  int prev = -1;
  explicit DeviceGuardFallback(const c10::Device& d) {
    cudaGetDevice(&prev);
    if (d.has_index() && d.index() != prev) cudaSetDevice(d.index());
  }
  ~DeviceGuardFallback() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};
}  // namespace dist8
#define D8_STREAM() cudaStreamLegacy
#define D8_GUARD(device) const dist8::DeviceGuardFallback d8_guard_(device)
#define D8_LAUNCH_CHECK()                                                                   \
  do {                                                                                      \
    const cudaError_t d8_err_ = cudaGetLastError();                                         \
    TORCH_CHECK(d8_err_ == cudaSuccess, "dist8: CUDA error: ", cudaGetErrorString(d8_err_)); \
  } while (0)
#endif
#endif

namespace dist8 {
namespace {

constexpr int DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2;
// Block sizes whose new states and outputs ((nstates + 1) * block_size floats, 24 KiB at
// most) are kept in shared memory; larger ones use global scratch.
constexpr int SMEM_STATE_LIMIT = 2048;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DT_F32;
    case at::kBFloat16: return DT_BF16;
    case at::kHalf: return DT_F16;
    default: TORCH_CHECK(false, "dist8: unsupported dtype ", t, " (float32, bfloat16, float16)");
  }
  return -1;
}

__device__ __forceinline__ float load_as_float(const void* p, int dt, int64_t i) {
  if (dt == DT_F32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (dt == DT_BF16) return bf16_bits_to_float(h);
  return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ void store_from_float(void* p, int dt, int64_t i, float v) {
  if (dt == DT_F32) {
    static_cast<float*>(p)[i] = v;
  } else if (dt == DT_BF16) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);  // == c10::BFloat16 (round to nearest even)
  } else {
    static_cast<uint16_t*>(p)[i] = __half_as_ushort(__float2half_rn(v));
  }
}

// Max over the block of unsigned values (absmax bits); result valid in all threads.
__device__ __forceinline__ uint32_t block_max_u32(uint32_t v, uint32_t* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? red[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) {
      const uint32_t w = __shfl_xor_sync(0xffffffffu, v, o);
      v = w > v ? w : v;
    }
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  const uint32_t r = red[32];
  __syncthreads();
  return r;
}

// What all tensors of one update call share.
struct CommonArgs {
  int rule, flags, nstates;
  int64_t block_size;
  Scalars c;
  const float* qmap[2];  // nullptr: 32-bit state
};

// One tensor of an update call.
struct TensorArgs {
  void* param;
  const void* grad;
  void* out;             // param, or update_out (LAMB/LARS)
  uint8_t* codes[2];     // 8-bit states, else nullptr
  float* f32[2];         // 32-bit states, else nullptr
  float* absmax[2];
  float* scratch;        // nullptr: shared memory holds the block's new states and outputs
  int64_t* skipped;      // += blocks not committed, or nullptr
  int64_t n;
  int pdt, gdt, odt;
  int writes_update;     // out is update_out: a skipped block's direction is written as 0
};

struct FusedArgs {
  CommonArgs k;
  TensorArgs t;
};

// Tensors per multi-tensor launch: the arguments stay under the 4 KB kernel-parameter limit.
constexpr int MULTI_MAX = 24;

struct MultiArgs {
  CommonArgs k;
  int ntensors;
  int64_t first_block[MULTI_MAX + 1];  // prefix sums of the tensors' block counts
  TensorArgs t[MULTI_MAX];
};
static_assert(sizeof(MultiArgs) <= 4000, "multi-tensor kernel arguments must fit the 4 KB parameter space");

__device__ __forceinline__ float apply_rule(int rule, int flags, const Scalars& c, float p, float g, float& s1,
                                            float& s2) {
  switch (rule) {
    case ADAM: return rule_adam<false>(p, g, s1, s2, c);
    case LAMB: return rule_adam<true>(p, g, s1, s2, c);
    case SGD: return rule_momentum<false>(p, g, s1, c, flags);
    case LARS: return rule_momentum<true>(p, g, s1, c, flags);
    case RMSPROP: return rule_rmsprop(p, g, s1, c);
    case ADAGRAD: return rule_adagrad(p, g, s1, c);
    default: return rule_lion(p, g, s1, c);
  }
}

__device__ __forceinline__ void count_skip(int64_t* skipped) {
  if (skipped) atomicAdd(reinterpret_cast<unsigned long long*>(skipped), 1ull);
}

// Floors of the 8-bit states that have one (-inf: none; nothing is below it, NaN stays NaN).
__device__ __forceinline__ void state_floors(const CommonArgs& k, const TensorArgs& t, const float (*q)[256],
                                             const float* old_am, float* floor) {
#pragma unroll
  for (int s = 0; s < 2; ++s)
    floor[s] = (s < k.nstates && t.codes[s] && rule_state_floored(k.rule, s))
                   ? fmul(state_floor_fraction(q[s]), old_am[s]) : u2f(0xFF800000u);
}

__device__ __forceinline__ void load_qmaps(const CommonArgs& k, float (*q)[256]) {
  for (int s = 0; s < k.nstates; ++s)
    if (k.qmap[s])
      for (int i = threadIdx.x; i < 256; i += blockDim.x) q[s][i] = k.qmap[s][i];
  __syncthreads();
}

// Block `blk` of tensor `t`: dequantize, update, then (all new values finite) write the
// outputs, new absmax and codes; else count the block as skipped (q already in shared memory).
__device__ __forceinline__ void update_block(const CommonArgs& k, const TensorArgs& t, int64_t blk,
                                             const float (*q)[256], uint32_t* red, float* dyn) {
  const int tid = threadIdx.x;
  const int64_t off = blk * k.block_size;
  const int64_t len = min(k.block_size, t.n - off);
  // buf[s * block_size + i]: new state s; buf[nstates * block_size + i]: new output
  float* buf = t.scratch ? t.scratch + off * (k.nstates + 1) : dyn;
  float* obuf = buf + k.nstates * k.block_size;
  float old_am[2] = {0.f, 0.f}, floor[2];
  // Loops over states run to the constant 2 so they unroll and the arrays stay in registers.
#pragma unroll
  for (int s = 0; s < 2; ++s)
    if (s < k.nstates && t.codes[s]) old_am[s] = t.absmax[s][blk];
  state_floors(k, t, q, old_am, floor);
  uint32_t mx[2] = {0u, 0u}, bits = 0u;
  for (int64_t i = tid; i < len; i += blockDim.x) {
    const int64_t j = off + i;
    const float p = load_as_float(t.param, t.pdt, j);
    const float g = load_as_float(t.grad, t.gdt, j);
    float st[2] = {0.f, 0.f};
#pragma unroll
    for (int s = 0; s < 2; ++s)
      if (s < k.nstates) st[s] = t.codes[s] ? floored(fmul(q[s][t.codes[s][j]], old_am[s]), floor[s]) : t.f32[s][j];
    const float o = apply_rule(k.rule, k.flags, k.c, p, g, st[0], st[1]);
    obuf[i] = o;
    bits = max(bits, abs_bits(o));
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (s >= k.nstates) break;
      buf[s * k.block_size + i] = st[s];
      const uint32_t b = abs_bits(st[s]);
      mx[s] = b > mx[s] ? b : mx[s];
      bits = max(bits, b);
    }
  }
  if (__syncthreads_or(bits >= D8_INF_BITS)) {  // also orders the buf writes
    if (tid == 0) count_skip(t.skipped);
    if (t.writes_update)
      for (int64_t i = tid; i < len; i += blockDim.x) store_from_float(t.out, t.odt, off + i, 0.0f);
    return;
  }
  for (int64_t i = tid; i < len; i += blockDim.x) store_from_float(t.out, t.odt, off + i, obuf[i]);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (s >= k.nstates) continue;
    if (!t.codes[s]) {
      for (int64_t i = tid; i < len; i += blockDim.x) t.f32[s][off + i] = buf[s * k.block_size + i];
      continue;
    }
    const float am = absmax_from_bits(block_max_u32(mx[s], red));
    if (tid == 0) t.absmax[s][blk] = am;
    const float recip = block_reciprocal(am);
    for (int64_t i = tid; i < len; i += blockDim.x)
      t.codes[s][off + i] = (uint8_t)nearest_code(fmul(buf[s * k.block_size + i], recip), q[s]);
  }
}

// The tensor a thread block (or warp) works on: the last i with first_block[i] <= b.
template <typename Index>
__device__ __forceinline__ int tensor_of(const Index* first_block, int ntensors, int64_t b) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void fused_update_kernel(FusedArgs a) {
  __shared__ float q[2][256];
  __shared__ uint32_t red[33];
  D8_DYNAMIC_SHARED(float, dyn);
  load_qmaps(a.k, q);
  update_block(a.k, a.t, blockIdx.x, q, red, dyn);
}

// Many tensors in one launch: thread block b updates block b - first_block[i] of tensor i.
__global__ void fused_update_multi_kernel(MultiArgs a) {
  __shared__ float q[2][256];
  __shared__ uint32_t red[33];
  D8_DYNAMIC_SHARED(float, dyn);
  load_qmaps(a.k, q);
  const int64_t b = blockIdx.x;
  const int lo = tensor_of(a.first_block, a.ntensors, b);
  update_block(a.k, a.t[lo], b - a.first_block[lo], q, red, dyn);
}

// ---- variant "warp": one warp per quantization block (block sizes 64..512) ----------
// Each lane holds block_size/32 values in registers (strided by 32: coalesced), the new
// absmax is a warp shuffle reduction: no shared-memory state buffer and no __syncthreads
// after the qmaps are loaded. A thread block of 8 warps updates 8 quantization blocks.
// Selected with DIST8_CUDA_KERNEL=warp until a GPU measurement picks the default.
constexpr int WARPS_PER_CTA = 8;
constexpr int WARP_MAX_BLOCK = 512;

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <int VPT>
__device__ __forceinline__ void requantize_warp(const float (&vals)[VPT], uint32_t mx, uint8_t* codes, float* absmax,
                                                int64_t blk, int64_t off, int64_t len, const float* q, int lane) {
  const float am = absmax_from_bits(warp_max_u32(mx));
  if (lane == 0) absmax[blk] = am;
  const float recip = block_reciprocal(am);
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t i = lane + 32 * v;
    if (i < len) codes[off + i] = (uint8_t)nearest_code(fmul(vals[v], recip), q);
  }
}

template <int VPT>
__device__ __forceinline__ void update_block_warp(const CommonArgs& k, const TensorArgs& t, int64_t blk,
                                                  const float (*q)[256], int lane) {
  const int64_t off = blk * k.block_size;
  const int64_t len = min(k.block_size, t.n - off);
  float old_am[2];
  old_am[0] = t.codes[0] ? t.absmax[0][blk] : 0.f;
  old_am[1] = k.nstates > 1 && t.codes[1] ? t.absmax[1][blk] : 0.f;
  float floor[2];
  state_floors(k, t, q, old_am, floor);
  // the new states and outputs (registers: every index is a constant after unrolling)
  float st0[VPT], st1[VPT], ov[VPT];
  uint32_t mx0 = 0u, mx1 = 0u, bits = 0u;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t i = lane + 32 * v;
    st0[v] = st1[v] = ov[v] = 0.f;
    if (i >= len) continue;
    const int64_t j = off + i;
    const float p = load_as_float(t.param, t.pdt, j);
    const float g = load_as_float(t.grad, t.gdt, j);
    float s0 = t.codes[0] ? floored(fmul(q[0][t.codes[0][j]], old_am[0]), floor[0]) : t.f32[0][j];
    float s1 = 0.f;
    if (k.nstates > 1) s1 = t.codes[1] ? floored(fmul(q[1][t.codes[1][j]], old_am[1]), floor[1]) : t.f32[1][j];
    ov[v] = apply_rule(k.rule, k.flags, k.c, p, g, s0, s1);
    st0[v] = s0;
    st1[v] = s1;
    bits = max(bits, abs_bits(ov[v]));
    mx0 = max(mx0, abs_bits(s0));
    mx1 = max(mx1, abs_bits(s1));
  }
  if (warp_max_u32(max(bits, max(mx0, mx1))) >= D8_INF_BITS) {  // skip the block
    if (lane == 0) count_skip(t.skipped);
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t i = lane + 32 * v;
      if (t.writes_update && i < len) store_from_float(t.out, t.odt, off + i, 0.0f);
    }
    return;
  }
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t i = lane + 32 * v;
    if (i >= len) continue;
    store_from_float(t.out, t.odt, off + i, ov[v]);
    if (!t.codes[0]) t.f32[0][off + i] = st0[v];
    if (k.nstates > 1 && !t.codes[1]) t.f32[1][off + i] = st1[v];
  }
  if (t.codes[0]) requantize_warp<VPT>(st0, mx0, t.codes[0], t.absmax[0], blk, off, len, q[0], lane);
  if (k.nstates > 1 && t.codes[1]) requantize_warp<VPT>(st1, mx1, t.codes[1], t.absmax[1], blk, off, len, q[1], lane);
}

// VPT = block_size / 32 values per lane; the host picks the instantiation.
template <int VPT>
__global__ void fused_update_warp_kernel(FusedArgs a, int64_t nblocks) {
  __shared__ float q[2][256];
  load_qmaps(a.k, q);
  const int64_t blk = (int64_t)blockIdx.x * WARPS_PER_CTA + (threadIdx.x >> 5);
  if (blk < nblocks) update_block_warp<VPT>(a.k, a.t, blk, q, threadIdx.x & 31);
}

template <int VPT>
__global__ void fused_update_multi_warp_kernel(MultiArgs a) {
  __shared__ float q[2][256];
  load_qmaps(a.k, q);
  const int64_t b = (int64_t)blockIdx.x * WARPS_PER_CTA + (threadIdx.x >> 5);
  if (b >= a.first_block[a.ntensors]) return;
  const int lo = tensor_of(a.first_block, a.ntensors, b);
  update_block_warp<VPT>(a.k, a.t[lo], b - a.first_block[lo], q, threadIdx.x & 31);
}

__global__ void quantize_kernel(const void* x, int dt, int64_t n, int64_t block_size, const float* qmap,
                                uint8_t* codes, float* absmax) {
  __shared__ float q[256];
  __shared__ uint32_t red[33];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) q[i] = qmap[i];
  const int64_t blk = blockIdx.x, off = blk * block_size, len = min(block_size, n - off);
  uint32_t mx = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const uint32_t b = abs_bits(load_as_float(x, dt, off + i));
    mx = b > mx ? b : mx;
  }
  const float am = absmax_from_bits(block_max_u32(mx, red));  // also syncs q
  if (threadIdx.x == 0) absmax[blk] = am;
  const float recip = block_reciprocal(am);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
    codes[off + i] = (uint8_t)nearest_code(fmul(load_as_float(x, dt, off + i), recip), q);
}

__global__ void dequantize_kernel(const uint8_t* codes, const float* absmax, const float* qmap, int64_t n,
                                  int64_t block_size, float* out) {
  __shared__ float q[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) q[i] = qmap[i];
  __syncthreads();
  const int64_t blk = blockIdx.x, off = blk * block_size, len = min(block_size, n - off);
  const float am = absmax[blk];
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) out[off + i] = fmul(q[codes[off + i]], am);
}

__device__ __forceinline__ bool any_nonfinite(const void* x, int dt, int64_t i0, int64_t n, int64_t stride) {
  bool found = false;
  for (int64_t i = i0; i < n; i += stride) {
    if (dt == DT_F32) {
      found |= (static_cast<const uint32_t*>(x)[i] & 0x7F800000u) == 0x7F800000u;
    } else {
      const uint16_t e = dt == DT_F16 ? 0x7C00 : 0x7F80;
      found |= (static_cast<const uint16_t*>(x)[i] & e) == e;
    }
  }
  return found;
}

__global__ void all_finite_kernel(const void* x, int dt, int64_t n, int* bad) {
  const bool found = any_nonfinite(x, dt, blockIdx.x * (int64_t)blockDim.x + threadIdx.x, n,
                                   (int64_t)gridDim.x * blockDim.x);
  if (__syncthreads_or(found) && threadIdx.x == 0) atomicOr(bad, 1);
}

constexpr int FINITE_MULTI_MAX = 64;  // tensors per launch (kernel parameters under 4 KB)
constexpr int FINITE_THREADS = 256;

struct FiniteMultiArgs {
  int ntensors;
  int first_block[FINITE_MULTI_MAX + 1];  // thread blocks given to each tensor (prefix sums)
  int slot[FINITE_MULTI_MAX];             // where its flag goes in `bad`
  int dt[FINITE_MULTI_MAX];
  int64_t n[FINITE_MULTI_MAX];
  const void* x[FINITE_MULTI_MAX];
};
static_assert(sizeof(FiniteMultiArgs) <= 4000, "finite-check kernel arguments must fit the 4 KB parameter space");

// Thread blocks first_block[i] .. first_block[i+1]-1 stride over tensor i; bad[slot[i]] |= non-finite seen.
__global__ void all_finite_multi_kernel(FiniteMultiArgs a, int* bad) {
  const int b = blockIdx.x;
  const int lo = tensor_of(a.first_block, a.ntensors, b);
  const int64_t nb = a.first_block[lo + 1] - a.first_block[lo];
  const bool found = any_nonfinite(a.x[lo], a.dt[lo], (b - a.first_block[lo]) * (int64_t)blockDim.x + threadIdx.x,
                                   a.n[lo], nb * blockDim.x);
  if (__syncthreads_or(found) && threadIdx.x == 0) atomicOr(bad + a.slot[lo], 1);
}

int threads_for(int64_t block_size) { return (int)std::min<int64_t>(256, block_size); }

// DIST8_CUDA_KERNEL=warp picks the warp-per-block kernels (block sizes up to 512), read per call
// so a benchmark can compare both in one process.
bool use_warp_kernel(int64_t block_size) {
  const char* v = std::getenv("DIST8_CUDA_KERNEL");
  return v != nullptr && std::string(v) == "warp" && block_size <= WARP_MAX_BLOCK;
}

unsigned warp_grid(int64_t nblocks) { return (unsigned)((nblocks + WARPS_PER_CTA - 1) / WARPS_PER_CTA); }

// f(std::integral_constant<int, block_size / 32>{}): picks the warp kernels' instantiation.
template <typename F>
void with_values_per_lane(int64_t block_size, F&& f) {
  switch (block_size) {
    case 64: f(std::integral_constant<int, 2>{}); break;
    case 128: f(std::integral_constant<int, 4>{}); break;
    case 256: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;  // 512
  }
}

void check_block_size(int64_t block_size) {
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
}

CommonArgs common_args(int64_t rule, int64_t flags, int64_t block_size, c10::ArrayRef<double> scalars,
                       const at::Tensor& qmap1, const at::Tensor& qmap2) {
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES, "dist8: unknown rule ", rule);
  TORCH_CHECK(scalars.size() == NUM_SCALARS, "dist8: expected ", NUM_SCALARS, " scalars");
  check_block_size(block_size);
  CommonArgs k{};
  k.rule = (int)rule;
  k.flags = (int)flags;
  k.nstates = rule_num_states(k.rule);
  k.block_size = block_size;
  float* cf = reinterpret_cast<float*>(&k.c);
  for (int i = 0; i < NUM_SCALARS; ++i) cf[i] = static_cast<float>(scalars[i]);
  const at::Tensor* qmaps[2] = {&qmap1, &qmap2};
  for (int s = 0; s < k.nstates; ++s) {
    if (!qmaps[s]->defined() || qmaps[s]->numel() == 0) continue;
    TORCH_CHECK(qmaps[s]->scalar_type() == at::kFloat && qmaps[s]->numel() == 256 && D8_ON_DEVICE(*qmaps[s]) &&
                    qmaps[s]->is_contiguous(),
                "dist8: qmap", s + 1, " must be a contiguous float32[256] CUDA tensor");
    k.qmap[s] = qmaps[s]->data_ptr<float>();
  }
  return k;
}

// Checks one tensor's arguments against the common ones; nq8 counts its 8-bit states.
TensorArgs tensor_args(const CommonArgs& k, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                       const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                       const at::Tensor& update_out, int& nq8) {
  TensorArgs t{};
  t.n = param.numel();
  TORCH_CHECK(D8_ON_DEVICE(param) && param.is_contiguous() && grad.is_contiguous() && grad.numel() == t.n &&
                  grad.device() == param.device(),
              "dist8: param/grad must be contiguous CUDA tensors of equal size on one device");
  const bool writes_update = update_out.defined() && update_out.numel() > 0;
  t.writes_update = writes_update ? 1 : 0;
  const at::Tensor& out_t = writes_update ? update_out : param;
  TORCH_CHECK(out_t.is_contiguous() && out_t.numel() == t.n, "dist8: bad update_out");
  t.param = param.data_ptr();
  t.pdt = dtype_code(param.scalar_type());
  t.grad = grad.data_ptr();
  t.gdt = dtype_code(grad.scalar_type());
  t.out = out_t.data_ptr();
  t.odt = dtype_code(out_t.scalar_type());
  const at::Tensor* states[2] = {&state1, &state2};
  const at::Tensor* absmaxes[2] = {&absmax1, &absmax2};
  const int64_t nblocks = (t.n + k.block_size - 1) / k.block_size;
  nq8 = 0;
  for (int s = 0; s < k.nstates; ++s) {
    TORCH_CHECK(states[s]->is_contiguous() && states[s]->numel() == t.n && states[s]->device() == param.device(),
                "dist8: bad state", s + 1);
    if (absmaxes[s]->defined() && absmaxes[s]->numel() > 0) {
      TORCH_CHECK(states[s]->scalar_type() == at::kByte && absmaxes[s]->numel() == nblocks &&
                      absmaxes[s]->scalar_type() == at::kFloat && absmaxes[s]->is_contiguous() &&
                      absmaxes[s]->device() == param.device(),
                  "dist8: bad 8-bit state", s + 1);
      TORCH_CHECK(k.qmap[s] != nullptr, "dist8: 8-bit state", s + 1, " needs qmap", s + 1);
      t.codes[s] = states[s]->data_ptr<uint8_t>();
      t.absmax[s] = absmaxes[s]->data_ptr<float>();
      ++nq8;
    } else {
      TORCH_CHECK(states[s]->scalar_type() == at::kFloat, "dist8: 32-bit state", s + 1, " must be float32");
      t.f32[s] = states[s]->data_ptr<float>();
    }
  }
  return t;
}

size_t state_smem_bytes(const CommonArgs& k) { return sizeof(float) * k.block_size * (k.nstates + 1); }

// Where a tensor's skipped blocks are counted: element i of `skipped` (int64), or nowhere when it is empty.
int64_t* skipped_counter(const at::Tensor& skipped, int64_t i) {
  if (!skipped.defined() || skipped.numel() == 0) return nullptr;
  TORCH_CHECK(skipped.scalar_type() == at::kLong && skipped.is_contiguous() && skipped.numel() > i &&
                  D8_ON_DEVICE(skipped),
              "dist8: skipped must be a contiguous int64 tensor with one element per tensor, on the device");
  return skipped.data_ptr<int64_t>() + i;
}

void fused_update_cuda(int64_t rule, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                       const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                       const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                       int64_t flags, int64_t block_size, const at::Tensor& update_out, const at::Tensor& skipped) {
  D8_GUARD(param.device());
  FusedArgs a{};
  a.k = common_args(rule, flags, block_size, scalars, qmap1, qmap2);
  int nq8 = 0;
  a.t = tensor_args(a.k, param, grad, state1, state2, absmax1, absmax2, update_out, nq8);
  a.t.skipped = skipped_counter(skipped, 0);
  if (a.t.n == 0) return;
  const int64_t nblocks = (a.t.n + block_size - 1) / block_size;
  if (use_warp_kernel(block_size)) {
    with_values_per_lane(block_size, [&](auto vpt) {
      D8_LAUNCH(fused_update_warp_kernel<decltype(vpt)::value>, warp_grid(nblocks), 32 * WARPS_PER_CTA, 0, a,
                nblocks);
    });
    D8_LAUNCH_CHECK();
    return;
  }
  at::Tensor scratch;
  size_t smem = state_smem_bytes(a.k);
  if (block_size > SMEM_STATE_LIMIT) {
    scratch = at::empty({nblocks * block_size * (a.k.nstates + 1)}, param.options().dtype(at::kFloat));
    a.t.scratch = scratch.data_ptr<float>();
    smem = 0;
  }
  D8_LAUNCH(fused_update_kernel, (unsigned)nblocks, threads_for(block_size), smem, a);
  D8_LAUNCH_CHECK();
}

// One launch per MULTI_MAX tensors (block sizes above SMEM_STATE_LIMIT: one per tensor).
void fused_update_multi_cuda(int64_t rule, at::TensorList params, at::TensorList grads, at::TensorList state1,
                             at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                             const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                             int64_t flags, int64_t block_size, const at::Tensor& skipped) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && state1.size() == count && state2.size() == count &&
                  absmax1.size() == count && absmax2.size() == count,
              "dist8: fused_update_multi_ needs one grad, state1, state2, absmax1, absmax2 per param");
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES && !rule_writes_update((int)rule),
              "dist8: fused_update_multi_ does not take LAMB/LARS");
  if (count == 0) return;
  const at::Tensor none;
  if (block_size > SMEM_STATE_LIMIT) {
    const bool counting = skipped.defined() && skipped.numel() > 0;
    for (size_t i = 0; i < count; ++i)
      fused_update_cuda(rule, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], qmap1, qmap2,
                        scalars, flags, block_size, none, counting ? skipped.narrow(0, (int64_t)i, 1) : none);
    return;
  }
  D8_GUARD(params[0].device());
  MultiArgs a{};
  a.k = common_args(rule, flags, block_size, scalars, qmap1, qmap2);
  size_t smem = 0;
  const bool warp = use_warp_kernel(block_size);
  auto launch = [&]() {
    if (a.ntensors == 0) return;
    if (warp) {
      with_values_per_lane(block_size, [&](auto vpt) {
        D8_LAUNCH(fused_update_multi_warp_kernel<decltype(vpt)::value>, warp_grid(a.first_block[a.ntensors]),
                  32 * WARPS_PER_CTA, 0, a);
      });
    } else {
      D8_LAUNCH(fused_update_multi_kernel, (unsigned)a.first_block[a.ntensors], threads_for(block_size), smem, a);
    }
    D8_LAUNCH_CHECK();
    a.ntensors = 0;
    smem = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(params[i].device() == params[0].device(), "dist8: fused_update_multi_ tensors must share a device");
    int nq8 = 0;
    TensorArgs t = tensor_args(a.k, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], none, nq8);
    t.skipped = skipped_counter(skipped, (int64_t)i);
    if (t.n == 0) continue;
    const int64_t nblocks = (t.n + block_size - 1) / block_size;
    if (a.ntensors == MULTI_MAX || a.first_block[a.ntensors] + nblocks > INT32_MAX) launch();
    a.t[a.ntensors] = t;
    a.first_block[a.ntensors + 1] = a.first_block[a.ntensors] + nblocks;
    ++a.ntensors;
    smem = state_smem_bytes(a.k);
  }
  launch();
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& qmap,
                                                           int64_t block_size) {
  check_block_size(block_size);
  D8_GUARD(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor q = qmap.to(x.device(), at::kFloat).contiguous();
  const int64_t n = xc.numel(), nblocks = (n + block_size - 1) / block_size;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (n > 0) {
    D8_LAUNCH(quantize_kernel, (unsigned)nblocks, threads_for(block_size), 0, xc.data_ptr(),
              dtype_code(xc.scalar_type()), n, block_size, q.data_ptr<float>(), codes.data_ptr<uint8_t>(),
              absmax.data_ptr<float>());
    D8_LAUNCH_CHECK();
  }
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                     int64_t block_size) {
  check_block_size(block_size);
  D8_GUARD(codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8: codes must be uint8");
  at::Tensor cc = codes.contiguous(), ac = absmax.contiguous();
  at::Tensor q = qmap.to(codes.device(), at::kFloat).contiguous();
  const int64_t n = cc.numel(), nblocks = (n + block_size - 1) / block_size;
  TORCH_CHECK(ac.numel() == nblocks && ac.scalar_type() == at::kFloat, "dist8: absmax must be float32[", nblocks, "]");
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  if (n > 0) {
    D8_LAUNCH(dequantize_kernel, (unsigned)nblocks, threads_for(block_size), 0, cc.data_ptr<uint8_t>(),
              ac.data_ptr<float>(), q.data_ptr<float>(), n, block_size, out.data_ptr<float>());
    D8_LAUNCH_CHECK();
  }
  return out;
}

bool all_finite_cuda(const at::Tensor& x) {
  if (!at::isFloatingType(x.scalar_type())) return true;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return at::isfinite(x).all().item<bool>();
  D8_GUARD(x.device());
  at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  if (n == 0) return true;
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 4096);
  D8_LAUNCH(all_finite_kernel, (unsigned)blocks, threads, 0, xc.data_ptr(), dtype_code(xc.scalar_type()), n,
            bad.data_ptr<int>());
  D8_LAUNCH_CHECK();
  return bad.item<int>() == 0;
}

// Non-finite flag per tensor (1 = has inf/NaN), with one host sync for all of them.
std::vector<int64_t> all_finite_multi_cuda(at::TensorList xs) {
  std::vector<int64_t> result(xs.size(), 0);
  if (xs.empty()) return result;
  D8_GUARD(xs[0].device());
  at::Tensor bad = at::zeros({(int64_t)xs.size()}, xs[0].options().dtype(at::kInt));
  std::vector<at::Tensor> keep;  // contiguous copies live until their launch is queued
  FiniteMultiArgs a{};
  auto launch = [&]() {
    if (a.ntensors == 0) return;
    D8_LAUNCH(all_finite_multi_kernel, (unsigned)a.first_block[a.ntensors], FINITE_THREADS, 0, a,
              bad.data_ptr<int>());
    D8_LAUNCH_CHECK();
    a.ntensors = 0;
    keep.clear();
  };
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.device() == xs[0].device(), "dist8: all_finite_multi tensors must share a device");
    if (!at::isFloatingType(x.scalar_type()) || x.numel() == 0) continue;
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) {
      bad.narrow(0, (int64_t)i, 1).copy_(at::isfinite(x).all().logical_not().to(at::kInt).reshape({1}));
      continue;
    }
    if (a.ntensors == FINITE_MULTI_MAX) launch();
    keep.push_back(x.contiguous());
    // ~4 values per thread, at most 1024 blocks per tensor (they stride over the rest)
    const int64_t nb = std::min<int64_t>(1024, (x.numel() + 4 * FINITE_THREADS - 1) / (4 * FINITE_THREADS));
    const int j = a.ntensors++;
    a.x[j] = keep.back().data_ptr();
    a.dt[j] = dtype_code(x.scalar_type());
    a.n[j] = x.numel();
    a.slot[j] = (int)i;
    a.first_block[j + 1] = a.first_block[j] + (int)nb;
  }
  launch();
  const at::Tensor host = bad.cpu();
  const int* flags = host.data_ptr<int>();
  for (size_t i = 0; i < xs.size(); ++i) result[i] = flags[i] != 0;
  return result;
}

}  // namespace
}  // namespace dist8

#ifdef DIST8_CUDA_EMULATION
TORCH_LIBRARY_IMPL(dist8_cuda_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(dist8, CUDA, m) {
#endif
  m.impl("fused_update_", &dist8::fused_update_cuda);
  m.impl("quantize_blockwise", &dist8::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dist8::dequantize_blockwise_cuda);
  m.impl("all_finite", &dist8::all_finite_cuda);
  m.impl("fused_update_multi_", &dist8::fused_update_multi_cuda);
  m.impl("all_finite_multi", &dist8::all_finite_multi_cuda);
}
