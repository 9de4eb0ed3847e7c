// dist8_cuda.cu -- the host side of dist8's CUDA kernels: argument checks, launch
// configuration (block-per-block or warp-per-block kernel, multi-tensor chunking), the
// finite checks' host sync, and the registration as torch.ops.dist8.*. The device code
// (what each kernel does, and why) is in dist8_cuda_device.cuh, included below after the
// platform macros; tests/cuda_emu compiles both as C++ (DIST8_CUDA_EMULATION).
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

#include "dist8_cuda_device.cuh"

namespace dist8 {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DT_F32;
    case at::kBFloat16: return DT_BF16;
    case at::kHalf: return DT_F16;
    default: TORCH_CHECK(false, "dist8: unsupported dtype ", t, " (float32, bfloat16, float16)");
  }
  return -1;
}
int threads_for(int64_t block_size) { return (int)std::min<int64_t>(256, block_size); }

// DIST8_CUDA_KERNEL=warp picks the warp-per-block kernels (block sizes up to 512), =block (or unset)
// the block-per-CTA ones; read per call so a benchmark can compare both in one process. A typo is an
// error, not a silent choice.
bool use_warp_kernel(int64_t block_size) {
  const char* v = std::getenv("DIST8_CUDA_KERNEL");
  const std::string kernel = v == nullptr ? "" : v;
  TORCH_CHECK(kernel.empty() || kernel == "block" || kernel == "warp",
              "dist8: DIST8_CUDA_KERNEL must be 'block' or 'warp', got '", kernel, "'");
  return kernel == "warp" && block_size <= WARP_MAX_BLOCK;
}

// Thread blocks of a warp-kernel launch: one per WARPS_PER_CTA quantization blocks, at most
// WARP_CTAS_PER_SM per multiprocessor (the kernels stride over the rest). The emulation has 2
// "multiprocessors", so its tests run the striding with several blocks per warp.
constexpr int64_t WARP_CTAS_PER_SM = 8;
int64_t multiprocessors() {
#if defined(DIST8_CUDA_EMULATION)
  return 2;
#else
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
#endif
}
unsigned warp_grid(int64_t nblocks) {
  return (unsigned)std::min((nblocks + WARPS_PER_CTA - 1) / WARPS_PER_CTA, WARP_CTAS_PER_SM * multiprocessors());
}

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
  for (int s = 0; s < k.nstates && s < 2; ++s) {  // a third state uses qmap1 (state_qmap_index)
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
                       const at::Tensor& update_out, int& nq8, const at::Tensor& state3, const at::Tensor& absmax3,
                       const at::Tensor& correction) {
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
  if (correction.defined() && correction.numel() > 0) {
    const at::ScalarType ct = correction.scalar_type();
    TORCH_CHECK(ct == at::kChar || ct == at::kShort,
                "dist8: correction must be int8 (24-bit master) or int16 (32-bit), got ", ct);
    TORCH_CHECK(t.pdt == DT_BF16 || t.pdt == DT_F16,
                "dist8: a master-weight correction needs a bfloat16/float16 param, got ", param.scalar_type());
    TORCH_CHECK(correction.is_contiguous() && correction.numel() == t.n && correction.device() == param.device(),
                "dist8: correction must be contiguous with the param's ", t.n, " elements, on its device");
    t.corr = correction.data_ptr();
    t.cbits = ct == at::kChar ? 8 : 16;
  }
  const at::Tensor* states[MAX_STATES] = {&state1, &state2, &state3};
  const at::Tensor* absmaxes[MAX_STATES] = {&absmax1, &absmax2, &absmax3};
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
      TORCH_CHECK(k.qmap[state_qmap_index(s)] != nullptr, "dist8: 8-bit state", s + 1, " needs qmap",
                  state_qmap_index(s) + 1);
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
                       int64_t flags, int64_t block_size, const at::Tensor& update_out, const at::Tensor& skipped,
                       const at::Tensor& state3, const at::Tensor& absmax3, const at::Tensor& correction) {
  D8_GUARD(param.device());
  FusedArgs a{};
  a.k = common_args(rule, flags, block_size, scalars, qmap1, qmap2);
  int nq8 = 0;
  a.t = tensor_args(a.k, param, grad, state1, state2, absmax1, absmax2, update_out, nq8, state3, absmax3, correction);
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
                             int64_t flags, int64_t block_size, const at::Tensor& skipped, at::TensorList state3,
                             at::TensorList absmax3, at::TensorList correction) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && state1.size() == count && state2.size() == count &&
                  absmax1.size() == count && absmax2.size() == count,
              "dist8: fused_update_multi_ needs one grad, state1, state2, absmax1, absmax2 per param");
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES && !rule_writes_update((int)rule),
              "dist8: fused_update_multi_ does not take LAMB/LARS");
  const bool three = rule_num_states((int)rule) > 2;
  TORCH_CHECK(three ? (state3.size() == count && absmax3.size() == count) : (state3.empty() && absmax3.empty()),
              "dist8: fused_update_multi_ needs one state3, absmax3 per param for a rule with three states, none else");
  TORCH_CHECK(correction.size() == 0 || correction.size() == count,
              "dist8: fused_update_multi_ needs no correction list or one correction per param");
  if (count == 0) return;
  const at::Tensor none;
  if (block_size > SMEM_STATE_LIMIT) {
    const bool counting = skipped.defined() && skipped.numel() > 0;
    for (size_t i = 0; i < count; ++i)
      fused_update_cuda(rule, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], qmap1, qmap2,
                        scalars, flags, block_size, none, counting ? skipped.narrow(0, (int64_t)i, 1) : none,
                        three ? state3[i] : none, three ? absmax3[i] : none, correction.size() ? correction[i] : none);
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
    TensorArgs t = tensor_args(a.k, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], none, nq8,
                               three ? state3[i] : none, three ? absmax3[i] : none,
                               correction.size() ? correction[i] : none);
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

void trust_step_cuda(const at::Tensor& param, const at::Tensor& update, double lr_times_ratio,
                     const at::Tensor& correction) {
  TORCH_CHECK(D8_ON_DEVICE(param) && D8_ON_DEVICE(update) && param.device() == update.device(),
              "dist8: trust_step_ param and update must be on one CUDA device");
  TORCH_CHECK(param.is_contiguous(), "dist8: trust_step_ param must be contiguous");
  TORCH_CHECK(update.scalar_type() == at::kFloat && update.is_contiguous() && update.numel() == param.numel(),
              "dist8: trust_step_ update must be a contiguous float32 tensor with the parameter's length");
  const int64_t n = param.numel();
  if (n == 0) return;
  D8_GUARD(param.device());
  const int threads = 256;
  const unsigned blocks = (unsigned)std::min<int64_t>((n + threads - 1) / threads, 4096);
  const int dt = dtype_code(param.scalar_type());
  const float lr = static_cast<float>(lr_times_ratio);
  if (correction.defined() && correction.numel() > 0) {
    const at::ScalarType ct = correction.scalar_type();
    TORCH_CHECK((ct == at::kChar || ct == at::kShort) && dt != DT_F32 && correction.is_contiguous() &&
                    correction.numel() == n && correction.device() == param.device(),
                "dist8: trust_step_ correction must be a contiguous int8/int16 tensor with a bf16/fp16 param's length");
    const MasterFormat f = master_format(dt == DT_F16, ct == at::kChar ? 8 : 16);
    uint16_t* p = static_cast<uint16_t*>(param.data_ptr());
    if (ct == at::kChar)
      D8_LAUNCH(trust_step_master_kernel<int8_t>, blocks, threads, 0, p, correction.data_ptr<int8_t>(),
                update.data_ptr<float>(), n, lr, f);
    else
      D8_LAUNCH(trust_step_master_kernel<int16_t>, blocks, threads, 0, p, correction.data_ptr<int16_t>(),
                update.data_ptr<float>(), n, lr, f);
  } else {
    D8_LAUNCH(trust_step_kernel, blocks, threads, 0, param.data_ptr(), dt, update.data_ptr<float>(), n, lr);
  }
  D8_LAUNCH_CHECK();
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
  m.impl("trust_step_", &dist8::trust_step_cuda);
}
