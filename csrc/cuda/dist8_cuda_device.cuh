// dist8_cuda_device.cuh -- the device side of dist8_cuda.cu: argument structs shared with the
// host launchers, the per-value loads/stores, the block-per-block and warp-per-block update
// kernels, quantize/dequantize and the finite checks. Included once, by dist8_cuda.cu, after
// its platform macros (D8_DYNAMIC_SHARED; the emulation header under DIST8_CUDA_EMULATION).
// Host code (argument checks, launch configuration, op registration) stays in the .cu file.
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
#pragma once

#include <cstdint>

#include "dist8_rules.h"

namespace dist8 {
namespace {

constexpr int DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2;
// Block sizes whose new states and outputs ((nstates + 1) * block_size floats, 32 KiB at
// most with AdEMAMix's three states, under the 48 KiB default limit of dynamic shared memory
// with the maps' 2 KiB) are kept in shared memory; larger ones use global scratch.
constexpr int SMEM_STATE_LIMIT = 2048;

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
  const float* qmap[2];  // nullptr: 32-bit state (a third state uses qmap[0]: state_qmap_index)
};

// One tensor of an update call.
struct TensorArgs {
  void* param;
  const void* grad;
  void* out;             // param, or update_out (LAMB/LARS)
  uint8_t* codes[MAX_STATES];  // 8-bit states, else nullptr
  float* f32[MAX_STATES];       // 32-bit states, else nullptr
  float* absmax[MAX_STATES];
  float* scratch;        // nullptr: shared memory holds the block's new states and outputs
  int64_t* skipped;      // += blocks not committed, or nullptr
  int64_t n;
  int pdt, gdt, odt;
  int writes_update;     // out is update_out: a skipped block's direction is written as 0
  void* corr;            // master-weight correction (int8/int16; bf16/fp16 param), or nullptr
  int cbits;             // 8, 16, or 0: no correction
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
                                            float& s2, float& s3) {
  switch (rule) {
    case ADEMAMIX: return rule_ademamix(p, g, s1, s2, s3, c);
    case RMSPROP_MOMENTUM: return rule_rmsprop_momentum(p, g, s1, s2, c);
    case ADAM: return rule_adam<false>(p, g, s1, s2, c);
    case LAMB: return rule_adam<true>(p, g, s1, s2, c);
    case SGD: return rule_momentum<false>(p, g, s1, c, flags);
    case LARS: return rule_momentum<true>(p, g, s1, c, flags);
    case RMSPROP: return rule_rmsprop(p, g, s1, c);
    case ADAGRAD: return rule_adagrad(p, g, s1, c);
    default: return rule_lion(p, g, s1, c);
  }
}

// The parameter value the rule sees: the decoded master with a correction (dist8_rules.h master_decode).
__device__ __forceinline__ float load_param(const TensorArgs& t, int64_t j) {
  if (!t.cbits) return load_as_float(t.param, t.pdt, j);
  const int32_t c = t.cbits == 8 ? (int32_t) static_cast<const int8_t*>(t.corr)[j]
                                 : (int32_t) static_cast<const int16_t*>(t.corr)[j];
  return master_decode(static_cast<const uint16_t*>(t.param)[j], c, master_format(t.pdt == DT_F16, t.cbits));
}

// A committed output: the new parameter (re-encoded into param + correction with one) or direction.
__device__ __forceinline__ void store_output(const TensorArgs& t, int64_t j, float v) {
  if (!t.cbits || t.writes_update) {
    store_from_float(t.out, t.odt, j, v);
    return;
  }
  int32_t c;
  static_cast<uint16_t*>(t.param)[j] = master_encode(v, master_format(t.pdt == DT_F16, t.cbits), c);
  if (t.cbits == 8) static_cast<int8_t*>(t.corr)[j] = (int8_t)c;
  else static_cast<int16_t*>(t.corr)[j] = (int16_t)c;
}

__device__ __forceinline__ void count_skip(int64_t* skipped) {
  if (skipped) atomicAdd(reinterpret_cast<unsigned long long*>(skipped), 1ull);
}

// Floors of the 8-bit states that have one (-inf: none; nothing is below it, NaN stays NaN).
__device__ __forceinline__ void state_floors(const CommonArgs& k, const TensorArgs& t, const float (*q)[256],
                                             const float* old_am, float* floor) {
#pragma unroll
  for (int s = 0; s < MAX_STATES; ++s)
    floor[s] = (s < k.nstates && t.codes[s] && rule_state_floored(k.rule, s))
                   ? fmul(state_floor_fraction(q[state_qmap_index(s)]), old_am[s]) : u2f(0xFF800000u);
}

__device__ __forceinline__ void load_qmaps(const CommonArgs& k, float (*q)[256]) {
  for (int s = 0; s < k.nstates && s < 2; ++s)  // a third state uses qmap[0] (state_qmap_index)
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
  float old_am[MAX_STATES] = {0.f, 0.f, 0.f}, floor[MAX_STATES];
  // Loops over states run to the constant MAX_STATES so they unroll and the arrays stay in registers.
#pragma unroll
  for (int s = 0; s < MAX_STATES; ++s)
    if (s < k.nstates && t.codes[s]) old_am[s] = t.absmax[s][blk];
  state_floors(k, t, q, old_am, floor);
  uint32_t mx[MAX_STATES] = {0u, 0u, 0u}, bits = 0u;
  for (int64_t i = tid; i < len; i += blockDim.x) {
    const int64_t j = off + i;
    const float p = load_param(t, j);
    const float g = load_as_float(t.grad, t.gdt, j);
    float st[MAX_STATES] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < MAX_STATES; ++s)
      if (s < k.nstates)
        st[s] = t.codes[s] ? floored(fmul(q[state_qmap_index(s)][t.codes[s][j]], old_am[s]), floor[s]) : t.f32[s][j];
    const float o = apply_rule(k.rule, k.flags, k.c, p, g, st[0], st[1], st[2]);
    obuf[i] = o;
    bits = max(bits, abs_bits(o));
#pragma unroll
    for (int s = 0; s < MAX_STATES; ++s) {
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
  for (int64_t i = tid; i < len; i += blockDim.x) store_output(t, off + i, obuf[i]);
#pragma unroll
  for (int s = 0; s < MAX_STATES; ++s) {
    if (s >= k.nstates) continue;
    if (!t.codes[s]) {
      for (int64_t i = tid; i < len; i += blockDim.x) t.f32[s][off + i] = buf[s * k.block_size + i];
      continue;
    }
    const float am = absmax_from_bits(block_max_u32(mx[s], red));
    if (tid == 0) t.absmax[s][blk] = am;
    const float recip = block_reciprocal(am);
    for (int64_t i = tid; i < len; i += blockDim.x)
      t.codes[s][off + i] = (uint8_t)nearest_code(fmul(buf[s * k.block_size + i], recip), q[state_qmap_index(s)]);
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
  uint8_t c[VPT];  // every code first, then the stores: the VPT searches interleave
#pragma unroll
  for (int v = 0; v < VPT; ++v) c[v] = (uint8_t)nearest_code(fmul(vals[v], recip), q);
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t i = lane + 32 * v;
    if (i < len) codes[off + i] = c[v];
  }
}

template <int VPT>
__device__ __forceinline__ void update_block_warp(const CommonArgs& k, const TensorArgs& t, int64_t blk,
                                                  const float (*q)[256], int lane) {
  const int64_t off = blk * k.block_size;
  const int64_t len = min(k.block_size, t.n - off);
  float old_am[MAX_STATES];
  old_am[0] = t.codes[0] ? t.absmax[0][blk] : 0.f;
  old_am[1] = k.nstates > 1 && t.codes[1] ? t.absmax[1][blk] : 0.f;
  old_am[2] = k.nstates > 2 && t.codes[2] ? t.absmax[2][blk] : 0.f;
  float floor[MAX_STATES];
  state_floors(k, t, q, old_am, floor);
  // the new states and outputs (registers: every index is a constant after unrolling)
  float st0[VPT], st1[VPT], st2[VPT], ov[VPT];
  uint32_t mx0 = 0u, mx1 = 0u, mx2 = 0u, bits = 0u;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t i = lane + 32 * v;
    st0[v] = st1[v] = st2[v] = ov[v] = 0.f;
    if (i >= len) continue;
    const int64_t j = off + i;
    const float p = load_param(t, j);
    const float g = load_as_float(t.grad, t.gdt, j);
    float s0 = t.codes[0] ? floored(fmul(q[0][t.codes[0][j]], old_am[0]), floor[0]) : t.f32[0][j];
    float s1 = 0.f, s2 = 0.f;
    if (k.nstates > 1) s1 = t.codes[1] ? floored(fmul(q[1][t.codes[1][j]], old_am[1]), floor[1]) : t.f32[1][j];
    if (k.nstates > 2) s2 = t.codes[2] ? floored(fmul(q[state_qmap_index(2)][t.codes[2][j]], old_am[2]), floor[2])
                                       : t.f32[2][j];
    ov[v] = apply_rule(k.rule, k.flags, k.c, p, g, s0, s1, s2);
    st0[v] = s0;
    st1[v] = s1;
    st2[v] = s2;
    bits = max(bits, abs_bits(ov[v]));
    mx0 = max(mx0, abs_bits(s0));
    mx1 = max(mx1, abs_bits(s1));
    mx2 = max(mx2, abs_bits(s2));
  }
  if (warp_max_u32(max(max(bits, mx2), max(mx0, mx1))) >= D8_INF_BITS) {  // skip the block
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
    store_output(t, off + i, ov[v]);
    if (!t.codes[0]) t.f32[0][off + i] = st0[v];
    if (k.nstates > 1 && !t.codes[1]) t.f32[1][off + i] = st1[v];
    if (k.nstates > 2 && !t.codes[2]) t.f32[2][off + i] = st2[v];
  }
  if (t.codes[0]) requantize_warp<VPT>(st0, mx0, t.codes[0], t.absmax[0], blk, off, len, q[0], lane);
  if (k.nstates > 1 && t.codes[1]) requantize_warp<VPT>(st1, mx1, t.codes[1], t.absmax[1], blk, off, len, q[1], lane);
  if (k.nstates > 2 && t.codes[2])
    requantize_warp<VPT>(st2, mx2, t.codes[2], t.absmax[2], blk, off, len, q[state_qmap_index(2)], lane);
}

// VPT = block_size / 32 values per lane; the host picks the instantiation. Persistent: the
// grid is capped (warp_grid) and each warp strides over the blocks, so the maps are loaded
// once per thread block, not once per 8 quantization blocks.
template <int VPT>
__global__ void fused_update_warp_kernel(FusedArgs a, int64_t nblocks) {
  __shared__ float q[2][256];
  load_qmaps(a.k, q);
  const int64_t stride = (int64_t)gridDim.x * WARPS_PER_CTA;
  for (int64_t blk = (int64_t)blockIdx.x * WARPS_PER_CTA + (threadIdx.x >> 5); blk < nblocks; blk += stride)
    update_block_warp<VPT>(a.k, a.t, blk, q, threadIdx.x & 31);
}

template <int VPT>
__global__ void fused_update_multi_warp_kernel(MultiArgs a) {
  __shared__ float q[2][256];
  load_qmaps(a.k, q);
  const int64_t stride = (int64_t)gridDim.x * WARPS_PER_CTA, total = a.first_block[a.ntensors];
  for (int64_t b = (int64_t)blockIdx.x * WARPS_PER_CTA + (threadIdx.x >> 5); b < total; b += stride) {
    const int lo = tensor_of(a.first_block, a.ntensors, b);
    update_block_warp<VPT>(a.k, a.t[lo], b - a.first_block[lo], q, threadIdx.x & 31);
  }
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

// LAMB/LARS phase 2: p[i] <- rule_trust_step(p[i], u[i], lr * ratio), grid-stride over the tensor.
__global__ void trust_step_kernel(void* p, int dt, const float* u, int64_t n, float lr_times_ratio) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_from_float(p, dt, i, rule_trust_step(load_as_float(p, dt, i), u[i], lr_times_ratio));
}

// The same on the master of a bf16/fp16 parameter with an int8/int16 correction C: decode, step, re-encode.
template <typename C>
__global__ void trust_step_master_kernel(uint16_t* p, C* corr, const float* u, int64_t n, float lr_times_ratio,
                                         MasterFormat f) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int32_t c;
    p[i] = master_encode(rule_trust_step(master_decode(p[i], (int32_t)corr[i], f), u[i], lr_times_ratio), f, c);
    corr[i] = (C)c;
  }
}

}  // namespace
}  // namespace dist8
