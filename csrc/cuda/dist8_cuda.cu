// dist8_cuda.cu -- fused 8-bit optimizer kernels for CUDA.
//
// One thread block per quantization block: the two qmaps live in shared memory,
// each thread dequantizes (old absmax), applies the rule (dist8_rules.h, no FMA
// contraction: the rules use __f*_rn intrinsics and the file is built with
// --fmad=false), keeps the new fp32 state in shared memory (global scratch for
// block sizes above 4096), a block reduction gives the new absmax, and the
// block is requantized to the exact nearest code (the reference binary search
// on the shared-memory qmap). Bit-identical to the reference backend.
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "dist8_rules.h"

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

namespace dist8 {
namespace {

constexpr int DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2;
constexpr int SMEM_STATE_LIMIT = 4096;  // elements per state kept in shared memory

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

struct FusedArgs {
  int rule, flags, nstates;
  int64_t n, block_size;
  Scalars c;
  void* param;
  int pdt;
  const void* grad;
  int gdt;
  void* out;
  int odt;
  uint8_t* codes[2];
  float* f32[2];
  float* absmax[2];
  const float* qmap[2];
  float* scratch;  // nullptr: shared memory
};

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

__global__ void fused_update_kernel(FusedArgs a) {
  __shared__ float q[2][256];
  __shared__ uint32_t red[33];
  extern __shared__ float dyn[];
  const int tid = threadIdx.x;
  for (int s = 0; s < a.nstates; ++s)
    if (a.codes[s])
      for (int i = tid; i < 256; i += blockDim.x) q[s][i] = a.qmap[s][i];
  __syncthreads();
  const int64_t blk = blockIdx.x;
  const int64_t off = blk * a.block_size;
  const int64_t len = min(a.block_size, a.n - off);
  float* buf = a.scratch ? a.scratch + off * a.nstates : dyn;  // buf[s * block_size + i]
  float old_am[2] = {0.f, 0.f};
  for (int s = 0; s < a.nstates; ++s)
    if (a.codes[s]) old_am[s] = a.absmax[s][blk];
  uint32_t mx[2] = {0u, 0u};
  for (int64_t i = tid; i < len; i += blockDim.x) {
    const int64_t j = off + i;
    const float p = load_as_float(a.param, a.pdt, j);
    const float g = load_as_float(a.grad, a.gdt, j);
    float st[2] = {0.f, 0.f};
    for (int s = 0; s < a.nstates; ++s)
      st[s] = a.codes[s] ? fmul(q[s][a.codes[s][j]], old_am[s]) : a.f32[s][j];
    const float o = apply_rule(a.rule, a.flags, a.c, p, g, st[0], st[1]);
    store_from_float(a.out, a.odt, j, o);
    for (int s = 0; s < a.nstates; ++s) {
      if (a.codes[s]) {
        buf[s * a.block_size + i] = st[s];
        const uint32_t b = abs_bits(st[s]);
        mx[s] = b > mx[s] ? b : mx[s];
      } else {
        a.f32[s][j] = st[s];
      }
    }
  }
  for (int s = 0; s < a.nstates; ++s) {
    if (!a.codes[s]) continue;
    const float am = absmax_from_bits(block_max_u32(mx[s], red));
    if (tid == 0) a.absmax[s][blk] = am;
    const float recip = block_reciprocal(am);
    for (int64_t i = tid; i < len; i += blockDim.x)
      a.codes[s][off + i] = (uint8_t)nearest_code(fmul(buf[s * a.block_size + i], recip), q[s]);
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

__global__ void all_finite_kernel(const void* x, int dt, int64_t n, int* bad) {
  int found = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    if (dt == DT_F32) {
      found |= (static_cast<const uint32_t*>(x)[i] & 0x7F800000u) == 0x7F800000u;
    } else {
      const uint16_t e = dt == DT_F16 ? 0x7C00 : 0x7F80;
      found |= (static_cast<const uint16_t*>(x)[i] & e) == e;
    }
  }
  if (__syncthreads_or(found) && threadIdx.x == 0) atomicOr(bad, 1);
}

int threads_for(int64_t block_size) { return (int)std::min<int64_t>(256, block_size); }

void check_block_size(int64_t block_size) {
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
}

void fused_update_cuda(int64_t rule, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                       const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                       const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                       int64_t flags, int64_t block_size, const at::Tensor& update_out) {
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES, "dist8: unknown rule ", rule);
  TORCH_CHECK(scalars.size() == NUM_SCALARS, "dist8: expected ", NUM_SCALARS, " scalars");
  check_block_size(block_size);
  D8_GUARD(param.device());
  FusedArgs a{};
  a.rule = (int)rule;
  a.flags = (int)flags;
  a.nstates = rule_num_states(a.rule);
  a.n = param.numel();
  a.block_size = block_size;
  float* cf = reinterpret_cast<float*>(&a.c);
  for (int i = 0; i < NUM_SCALARS; ++i) cf[i] = static_cast<float>(scalars[i]);
  TORCH_CHECK(param.is_cuda() && param.is_contiguous() && grad.is_contiguous() && grad.numel() == a.n,
              "dist8: param/grad must be contiguous CUDA tensors of equal size");
  const bool writes_update = update_out.defined() && update_out.numel() > 0;
  const at::Tensor& out_t = writes_update ? update_out : param;
  TORCH_CHECK(out_t.is_contiguous() && out_t.numel() == a.n, "dist8: bad update_out");
  a.param = param.data_ptr();
  a.pdt = dtype_code(param.scalar_type());
  a.grad = grad.data_ptr();
  a.gdt = dtype_code(grad.scalar_type());
  a.out = out_t.data_ptr();
  a.odt = dtype_code(out_t.scalar_type());
  const at::Tensor* states[2] = {&state1, &state2};
  const at::Tensor* absmaxes[2] = {&absmax1, &absmax2};
  const at::Tensor* qmaps[2] = {&qmap1, &qmap2};
  const int64_t nblocks = (a.n + block_size - 1) / block_size;
  int nq8 = 0;
  for (int s = 0; s < a.nstates; ++s) {
    TORCH_CHECK(states[s]->is_contiguous() && states[s]->numel() == a.n, "dist8: bad state", s + 1);
    if (absmaxes[s]->defined() && absmaxes[s]->numel() > 0) {
      TORCH_CHECK(states[s]->scalar_type() == at::kByte && absmaxes[s]->numel() == nblocks &&
                      absmaxes[s]->scalar_type() == at::kFloat && absmaxes[s]->is_contiguous(),
                  "dist8: bad 8-bit state", s + 1);
      TORCH_CHECK(qmaps[s]->scalar_type() == at::kFloat && qmaps[s]->numel() == 256 && qmaps[s]->is_cuda() &&
                      qmaps[s]->is_contiguous(),
                  "dist8: qmap", s + 1, " must be a contiguous float32[256] CUDA tensor");
      a.codes[s] = states[s]->data_ptr<uint8_t>();
      a.absmax[s] = absmaxes[s]->data_ptr<float>();
      a.qmap[s] = qmaps[s]->data_ptr<float>();
      ++nq8;
    } else {
      TORCH_CHECK(states[s]->scalar_type() == at::kFloat, "dist8: 32-bit state", s + 1, " must be float32");
      a.f32[s] = states[s]->data_ptr<float>();
    }
  }
  if (a.n == 0) return;
  at::Tensor scratch;
  size_t smem = 0;
  if (nq8 > 0) {
    if (block_size <= SMEM_STATE_LIMIT) {
      smem = sizeof(float) * block_size * a.nstates;
    } else {
      scratch = at::empty({nblocks * block_size * a.nstates}, param.options().dtype(at::kFloat));
      a.scratch = scratch.data_ptr<float>();
    }
  }
  cudaStream_t stream = D8_STREAM();
  fused_update_kernel<<<(unsigned)nblocks, threads_for(block_size), smem, stream>>>(a);
  D8_LAUNCH_CHECK();
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
    quantize_kernel<<<(unsigned)nblocks, threads_for(block_size), 0, D8_STREAM()>>>(
        xc.data_ptr(), dtype_code(xc.scalar_type()), n, block_size, q.data_ptr<float>(), codes.data_ptr<uint8_t>(),
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
    dequantize_kernel<<<(unsigned)nblocks, threads_for(block_size), 0, D8_STREAM()>>>(
        cc.data_ptr<uint8_t>(), ac.data_ptr<float>(), q.data_ptr<float>(), n, block_size, out.data_ptr<float>());
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
  all_finite_kernel<<<(unsigned)blocks, threads, 0, D8_STREAM()>>>(
      xc.data_ptr(), dtype_code(xc.scalar_type()), n, bad.data_ptr<int>());
  D8_LAUNCH_CHECK();
  return bad.item<int>() == 0;
}

}  // namespace
}  // namespace dist8

TORCH_LIBRARY_IMPL(dist8, CUDA, m) {
  m.impl("fused_update_", &dist8::fused_update_cuda);
  m.impl("quantize_blockwise", &dist8::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dist8::dequantize_blockwise_cuda);
  m.impl("all_finite", &dist8::all_finite_cuda);
}
