// dist8_rules.h -- the update rules and the exact nearest-code quantization,
// shared by the C++ (CPU) and CUDA kernels.
//
// This header mirrors dist8/kernels/rules.py and dist8/quant/blockwise.py
// operation for operation: same order of float32 operations, no fused
// multiply-add (host code is compiled with -ffp-contract=off; device code uses
// the __f*_rn intrinsics, which are never contracted), IEEE correctly rounded
// division and sqrt. Change both sides together.
#pragma once

#include <stdint.h>
#include <string.h>
#ifndef __CUDACC__
#include <cmath>
#endif

#if defined(__CUDACC__)
#define D8_HD __host__ __device__ __forceinline__
#else
#define D8_HD inline
#endif

namespace dist8 {

// Rule ids: keep in sync with dist8.kernels.rules.Rule.
enum Rule : int {
  ADAM = 0, LAMB = 1, SGD = 2, LARS = 3, RMSPROP = 4, ADAGRAD = 5, LION = 6, ADEMAMIX = 7, RMSPROP_MOMENTUM = 8
};
constexpr int NUM_RULES = 9;
constexpr int MAX_STATES = 3;  // AdEMAMix: m1, nu, m2
constexpr int FLAG_FIRST_STEP = 1;
constexpr int FLAG_NESTEROV = 2;

// Field order of dist8.kernels.rules.Scalars (all float32).
struct Scalars {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, grad_wd, decay, bc1, bc2_sqrt,
      grad_scale, update_wd, beta3, one_minus_beta3, alpha;
};
constexpr int NUM_SCALARS = 15;

D8_HD int rule_num_states(int rule) {
  return rule == ADEMAMIX ? 3 : (rule == ADAM || rule == LAMB || rule == RMSPROP_MOMENTUM) ? 2 : 1;
}
// The quantization map of 8-bit state s (0-based): qmap1 for state 0, qmap2 for state 1, and
// qmap1 again for AdEMAMix's third state (m2, signed like m1): dist8.kernels.rules.state_qmap_index.
D8_HD int state_qmap_index(int s) { return s == 2 ? 0 : s; }
D8_HD bool rule_writes_update(int rule) { return rule == LAMB || rule == LARS; }

// ---- float32 arithmetic that is never contracted into an FMA --------------
#if defined(__CUDA_ARCH__)
D8_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
D8_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
D8_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
D8_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
D8_HD float fsqrt(float a) { return __fsqrt_rn(a); }
#else
D8_HD float fmul(float a, float b) { return a * b; }
D8_HD float fadd(float a, float b) { return a + b; }
D8_HD float fsub(float a, float b) { return a - b; }
D8_HD float fdiv(float a, float b) { return a / b; }
D8_HD float fsqrt(float a) { return std::sqrt(a); }  // IEEE: correctly rounded
#endif

D8_HD uint32_t f2u(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
#endif
}
D8_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, 4);
  return x;
#endif
}

// ---- the rules (see dist8/kernels/rules.py) ---------------------------------
// Adam / AdamW (LAMB=false) and LAMB (LAMB=true: returns the update direction u).
template <bool IS_LAMB>
D8_HD float rule_adam(float p, float g, float& m, float& v, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  g = fadd(g, fmul(c.grad_wd, p));
  m = fadd(fmul(c.beta1, m), fmul(c.one_minus_beta1, g));
  v = fadd(fmul(c.beta2, v), fmul(c.one_minus_beta2, fmul(g, g)));
  const float denom = fadd(fdiv(fsqrt(v), c.bc2_sqrt), c.eps);
  if (IS_LAMB) {
    const float u = fdiv(fdiv(m, c.bc1), denom);
    return fadd(u, fmul(c.update_wd, p));
  }
  p = fmul(p, c.decay);
  return fsub(p, fmul(c.lr, fdiv(m, denom)));
}

// SGD with momentum (IS_LARS=false) and LARS (IS_LARS=true: returns the direction d).
template <bool IS_LARS>
D8_HD float rule_momentum(float p, float g, float& m, const Scalars& c, int flags) {
  g = fmul(g, c.grad_scale);
  g = fadd(g, fmul(c.grad_wd, p));
  m = (flags & FLAG_FIRST_STEP) ? g : fadd(fmul(c.beta1, m), fmul(c.one_minus_beta1, g));
  const float d = (flags & FLAG_NESTEROV) ? fadd(g, fmul(c.beta1, m)) : m;
  if (IS_LARS) return d;
  return fsub(p, fmul(c.lr, d));
}

D8_HD float rule_rmsprop(float p, float g, float& v, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  g = fadd(g, fmul(c.grad_wd, p));
  v = fadd(fmul(c.beta1, v), fmul(c.one_minus_beta1, fmul(g, g)));
  return fsub(p, fmul(c.lr, fdiv(g, fadd(fsqrt(v), c.eps))));
}

// torch's RMSprop with momentum (beta2 = momentum): v square average, buf momentum buffer.
D8_HD float rule_rmsprop_momentum(float p, float g, float& v, float& buf, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  g = fadd(g, fmul(c.grad_wd, p));
  v = fadd(fmul(c.beta1, v), fmul(c.one_minus_beta1, fmul(g, g)));
  buf = fadd(fmul(c.beta2, buf), fdiv(g, fadd(fsqrt(v), c.eps)));
  return fsub(p, fmul(c.lr, buf));
}

D8_HD float rule_adagrad(float p, float g, float& s, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  g = fadd(g, fmul(c.grad_wd, p));
  s = fadd(s, fmul(g, g));
  return fsub(p, fmul(c.lr, fdiv(g, fadd(fsqrt(s), c.eps))));
}

// torch.sign: (0 < a) - (a < 0); +0 for zeros and NaN.
D8_HD float torch_sign(float a) { return (float)((0.0f < a) - (a < 0.0f)); }

D8_HD float rule_lion(float p, float g, float& m, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  const float direction = torch_sign(fadd(fmul(c.beta1, m), fmul(c.one_minus_beta1, g)));
  p = fmul(p, c.decay);
  p = fsub(p, fmul(c.lr, direction));
  m = fadd(fmul(c.beta2, m), fmul(c.one_minus_beta2, g));
  return p;
}

// LAMB/LARS phase 2 (dist8.kernels.rules.trust_step): p - fl32(lr * trust ratio) * u, where u is
// the update direction rule_adam<true> / rule_momentum<true> wrote.
D8_HD float rule_trust_step(float p, float u, float lr_times_ratio) { return fsub(p, fmul(lr_times_ratio, u)); }
// AdEMAMix (Pagliardini et al. 2024, as bitsandbytes): m1 fast EMA, nu second moment, m2 slow EMA.
D8_HD float rule_ademamix(float p, float g, float& m1, float& nu, float& m2, const Scalars& c) {
  g = fmul(g, c.grad_scale);
  m1 = fadd(fmul(c.beta1, m1), fmul(c.one_minus_beta1, g));
  m2 = fadd(fmul(c.beta3, m2), fmul(c.one_minus_beta3, g));
  nu = fadd(fmul(c.beta2, nu), fmul(c.one_minus_beta2, fmul(g, g)));
  const float denom = fadd(fdiv(fsqrt(nu), c.bc2_sqrt), c.eps);
  p = fmul(p, c.decay);
  return fsub(p, fmul(c.lr, fdiv(fadd(fdiv(m1, c.bc1), fmul(c.alpha, m2)), denom)));
}

// ---- block-wise quantization (see dist8/quant/blockwise.py) ----------------
// The factor a block's values are multiplied by before the code search (see
// dist8.quant.blockwise.block_reciprocal): fl(1 / absmax) when absmax is a normal
// float, else 1 (zero, subnormal, NaN). One division per block, not per value.
constexpr float D8_FLT_MIN = 1.17549435082228750797e-38f;
D8_HD float block_reciprocal(float absmax) { return absmax >= D8_FLT_MIN ? fdiv(1.0f, absmax) : 1.0f; }

// Bits of |x| as an unsigned int: for non-negative floats integer order is float
// order and NaNs compare above +inf, so max over these bits is torch's amax of
// |x| (NaN-propagating).
D8_HD uint32_t abs_bits(float x) { return f2u(x) & 0x7FFFFFFFu; }
D8_HD float absmax_from_bits(uint32_t b) { return u2f(b); }

// torch.searchsorted(side='left') on 256 entries: the first index i with
// qmap[i] >= x (256 when none; NaN gives 256). Same binary search as torch, with
// a fixed trip count: every step at least halves end - start (256 -> 0 in 9), and a
// step with start == end changes nothing, so 9 predicated steps visit the same
// midpoints as torch's loop for any map. No data-dependent branch: a GPU thread's
// searches for several values interleave instead of waiting on each load in turn.
D8_HD int lower_bound256(float x, const float* qmap) {
  int start = 0, end = 256;
#pragma unroll
  for (int step = 0; step < 9; ++step) {
    const int mid = start + ((end - start) >> 1);
    const bool right = !(qmap[mid < 255 ? mid : 255] >= x);  // mid == 256 only once start == end
    const bool active = start < end;
    start = (active && right) ? mid + 1 : start;
    end = (active && !right) ? mid : end;
  }
  return start;
}

// Exact nearest code given the lower bound of x (clamped as the reference does).
D8_HD int nearest_from_lower_bound(float x, int hi, const float* qmap) {
  hi = hi > 255 ? 255 : hi;
  const int lo = hi - 1 < 0 ? 0 : hi - 1;
  const float q_lo = qmap[lo], q_hi = qmap[hi];
  const float d_lo = fsub(x, q_lo), d_hi = fsub(q_hi, x);
  const bool take_lo = (d_lo < d_hi) || ((d_lo == d_hi) && (fabsf(q_lo) <= fabsf(q_hi)));
  return take_lo ? lo : hi;
}

// dist8.quant.nearest_code for one float32 value (x already normalised).
D8_HD int nearest_code(float x, const float* qmap) { return nearest_from_lower_bound(x, lower_bound256(x, qmap), qmap); }

// Monotone integer key of a float: unsigned order of keys == float order
// (-0 just below +0; NaNs at both ends).
D8_HD uint32_t float_key(float x) {
  const uint32_t b = f2u(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
D8_HD float key_float(uint32_t k) { return u2f((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

// ---- reading and committing 8-bit state (see dist8/kernels/rules.py) ---------
// Second-moment-like states (unsigned map: Adam/LAMB state 2, RMSprop and Adagrad state 1)
// are read back as max(q[code] * absmax, floor), floor = fl(floor_fraction * absmax): a
// value stored as code 0 is below half the smallest positive code, and reading it as 0
// let lr * m / eps through.
D8_HD bool rule_state_floored(int rule, int s) {
  return ((rule == ADAM || rule == LAMB || rule == ADEMAMIX) && s == 1) ||
         ((rule == RMSPROP || rule == ADAGRAD || rule == RMSPROP_MOMENTUM) && s == 0);
}
// Half the first entry >= the smallest positive float (0 when none): dist8.kernels.rules.state_floor_fraction.
D8_HD float state_floor_fraction(const float* qmap) {
  const int i = lower_bound256(u2f(1u), qmap);
  return i < 256 ? fmul(qmap[i], 0.5f) : 0.0f;
}
// NaN stays NaN (the comparison is false), as torch.where(v < floor, floor, v).
D8_HD float floored(float v, float floor) { return v < floor ? floor : v; }

// A block is committed only if all its new states and outputs are finite: with the
// magnitude bits of all of them max-reduced (abs_bits), that is bits < D8_INF_BITS.
constexpr uint32_t D8_INF_BITS = 0x7F800000u;

// ---- reduced-precision conversions (bit-exact with c10 / torch .to()) -------
D8_HD float bf16_bits_to_float(uint16_t h) { return u2f(((uint32_t)h) << 16); }
// c10::BFloat16 round_to_nearest_even.
D8_HD uint16_t float_to_bf16_bits(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = f2u(f);
  const uint32_t bias = ((u >> 16) & 1u) + 0x7FFFu;
  return (uint16_t)((u + bias) >> 16);
}

// The master-weight functions are always inlined (gcc otherwise keeps master_encode out of line
// in some of the CPU kernel's instantiations, and the loop over it is not vectorised).
#if defined(__CUDACC__)
#define D8_HD_FORCE D8_HD
#elif defined(__GNUC__)
#define D8_HD_FORCE inline __attribute__((always_inline))
#else
#define D8_HD_FORCE inline
#endif

// ---- master weights (see dist8/quant/master.py, the specification) --------------
// A bf16/fp16 parameter p plus an int8 (24-bit master) or int16 (32-bit) correction c:
// decode(p, c) = p if c == 0, else fp32(p + c * 2**(E(p) - shift)); encode(m) = (N(m) with
// finite m saturated to +-max, c = clamp(rne(ldexp(m - p, shift - E(p))), -Q, Q - 1), 0 for
// non-finite m). E(p) = max(biased exponent field, 1) - bias, shift = min(t + b, 24).
struct MasterFormat {
  bool half;       // fp16 parameter (else bf16)
  int fraction;    // t: 7 (bf16), 10 (fp16)
  int bias;        // 127, 15
  int shift;       // min(t + b, 24)
  float q;         // Q = 2**(b - 1): corrections lie in [-Q, Q - 1]
  float max_finite;
};

// The format of a bf16 (half = false) or fp16 parameter with a correction of 8 or 16 bits.
D8_HD_FORCE MasterFormat master_format(bool half, int correction_bits) {
  MasterFormat f;
  f.half = half;
  f.fraction = half ? 10 : 7;
  f.bias = half ? 15 : 127;
  f.shift = f.fraction + correction_bits < 24 ? f.fraction + correction_bits : 24;
  f.q = correction_bits == 8 ? 128.0f : 32768.0f;
  f.max_finite = half ? 65504.0f : u2f(0x7F7F0000u);  // bf16 max = 3.3895314e38
  return f;
}

// The master-weight functions below are written with selects, not branches, so that the CPU
// loops over them vectorise (and GPU warps do not diverge).
D8_HD_FORCE float rint_even(float a) {  // round to nearest, ties to even (the default rounding mode)
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::rint(a);
#endif
}

// cond ? a : b as a bit mask: gcc turns a select between values computed with float operations
// into a branch (they might trap) and then does not vectorise the loop.
D8_HD_FORCE uint32_t mask_select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - (uint32_t)cond;
  return (a & m) | (b & ~m);
}

// fp16 bits -> float (exact).
D8_HD_FORCE float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = ((uint32_t)h & 0x8000u) << 16, e = ((uint32_t)h >> 10) & 0x1Fu, m = (uint32_t)h & 0x3FFu;
  const uint32_t sub = f2u(fmul((float)m, u2f(0x33800000u)));  // zero, subnormal: m * 2**-24 (exact)
  const uint32_t biased = e == 31 ? 255u : e + 112u;            // inf, NaN: all ones
  const uint32_t bits = mask_select(e == 0, sub, (biased << 23) | (m << 13));
  return u2f(sign | bits);
}

// float -> fp16 bits, round to nearest even (== c10::Half / torch .to(float16) for non-NaN values).
D8_HD_FORCE uint16_t float_to_f16_bits(float f) {
  const uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  const bool is_sub = a < 0x38800000u;  // below 2**-14: subnormal fp16, rne(|f| * 2**24) (1024: smallest normal)
  const uint32_t sub = (uint32_t)rint_even(fmul(u2f(mask_select(is_sub, a, 0u)), u2f(0x4B800000u)));  // exact product
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu);
  const uint32_t rest = a & 0x1FFFu;
  h += (uint32_t)((rest + (h & 1u)) > 0x1000u);  // nearest, ties to even; a carry into the exponent is right
  const uint32_t mag = mask_select(a > 0x7F800000u, 0x7E00u,                // NaN
                                  mask_select(a >= 0x477FF000u, 0x7C00u,   // >= 65520 rounds to inf
                                              mask_select(is_sub, sub, h)));
  return (uint16_t)(sign | mag);
}

// E(p) from the parameter's bits.
D8_HD_FORCE int master_exponent(uint16_t pbits, const MasterFormat& f) {
  const int field = (int)((pbits & 0x7FFFu) >> f.fraction);
  return (field > 1 ? field : 1) - f.bias;
}

// 2**k as a float for -126 <= k <= 127 (exact).
D8_HD_FORCE float pow2i(int k) { return u2f((uint32_t)(k + 127) << 23); }

// x * 2**k by two exact power-of-two multiplies (2**k alone may not be a float): k1 = floor(k / 2)
// (>> on a negative int is an arithmetic shift with gcc, clang and nvcc; defined so in C++20).
D8_HD_FORCE float ldexp_exact(float x, int k) {
  const int k1 = k >> 1;
  return fmul(fmul(x, pow2i(k1)), pow2i(k - k1));
}

D8_HD_FORCE float master_param_float(uint16_t pbits, const MasterFormat& f) {
  return f.half ? f16_bits_to_float(pbits) : bf16_bits_to_float(pbits);
}

// The fp32 master of (parameter bits, correction).
D8_HD_FORCE float master_decode(uint16_t pbits, int32_t c, const MasterFormat& f) {
  const float p = master_param_float(pbits, f);
  const float m = fadd(p, ldexp_exact((float)c, master_exponent(pbits, f) - f.shift));
  return u2f(mask_select(c != 0, f2u(m), f2u(p)));  // c == 0 keeps p (-0.0, inf, NaN)
}

// The parameter bits of the fp32 master m; its correction in c.
D8_HD_FORCE uint16_t master_encode(float m, const MasterFormat& f, int32_t& c) {
  const bool finite = abs_bits(m) < 0x7F800000u;
  const float clamped = m > f.max_finite ? f.max_finite : (m < -f.max_finite ? -f.max_finite : m);
  const float x = u2f(mask_select(finite, f2u(clamped), f2u(m)));  // finite: saturated; inf/NaN pass
  const uint32_t u = f2u(x);  // bf16: float_to_bf16_bits, as selects
  const uint16_t bf = x != x ? (uint16_t)0x7FC0u : (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  const uint16_t pbits = f.half ? float_to_f16_bits(x) : bf;
  const float e = fsub(m, master_param_float(pbits, f));  // exact (Sterbenz)
  float r = ldexp_exact(e, f.shift - master_exponent(pbits, f));  // exact
  r = r < -f.q ? -f.q : (r > f.q - 1.0f ? f.q - 1.0f : r);  // clamp, then round: same as the reverse
  c = (int32_t)rint_even(u2f(mask_select(finite, f2u(r), 0u)));
  return pbits;
}

}  // namespace dist8
