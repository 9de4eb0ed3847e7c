// lookup_free_kernel.cpp -- a prototype Adam/AdamW step on a *lookup-free* 8-bit state code.
//
// Built at run time by bench/lookup_free.py (torch.utils.cpp_extension.load, -O3 -march=native
// -fno-fast-math -ffp-contract=off -fopenmp), never by the package. A measurement, not a product:
// it answers "what would dist8's CPU Adam step cost if the 8-bit codes were computed from float
// bits instead of looked up in a 256-entry map?".
//
// Codes (block size 256, one float32 absmax per block and state, as dist8):
//   m (signed):   sign + 7-bit magnitude k, an e4m3 grid with subnormals whose largest used code
//                 is exactly 1.0 (k = 120; k = 121..127 are never produced):
//                   k >= 8: 2^((k >> 3) - 15) * (1 + (k & 7) / 8)   (float bits (k + 896) << 20)
//                   k <  8: k * 2^-17                               (subnormals, 2^-17 .. 7 * 2^-17)
//   v (unsigned): 8-bit magnitude k, an e5m3 grid with subnormals, largest used code 1.0 (k = 248):
//                   k >= 8: 2^((k >> 3) - 31) * (1 + (k & 7) / 8)   (float bits (k + 768) << 20)
//                   k <  8: k * 2^-33
// Encoding y = x * fl(1 / absmax) (dist8's block_reciprocal): round to nearest code, ties to the
// even code, computed from the float bits of |y| (normal range: integer round-to-nearest-even of
// the 20 dropped mantissa bits; subnormal range: cvtps_epi32(|y| * 2^17 or 2^33), whose MXCSR
// rounding is round-half-even). Decoding: the code's bits shifted to float bits 20..27 (sign to
// bit 31) are a float32 equal to the code value times 2^-112 (m) or 2^-96 (v), its subnormal
// codes float32 subnormals; one exact multiplication by 2^112 / 2^96, then times the absmax.
// v floor (as dist8, dist8/kernels/rules.py): a v code 0 reads back as half the smallest positive
// code value times absmax, i.e. max(decode(k) * absmax, fl(2^-34 * absmax)).
//
// Adam rule: dist8's rule_adam (csrc/include/dist8_rules.h) op for op, fp32, no FMA:
//   g = g * grad_scale; g = g + grad_wd * p; m = beta1 * m + (1 - beta1) * g;
//   v = beta2 * v + (1 - beta2) * (g * g); denom = sqrt(v) / bc2_sqrt + eps;
//   p = p * decay; p = p - lr_c * (m / denom)        (lr_c = lr / bc1, decay = 1 - lr * wd)
// Per block (two passes, as dist8's simple path): dequantize + rule into stack buffers while
// max-reducing the magnitude bits of the new m, v and p; a block is committed (p, absmax, codes
// written) only if all of them are finite (dist8's per-block skip); then quantize m and v.
//
// `variant` (a bit mask, timing only: the results are then wrong on purpose) compiles phases out:
//   1 = no dequantization (the old states are a constant per block; the codes are not read),
//   2 = no quantization (absmax and p are written, the codes are not),
//   4 = no divider work (sqrt and the two divisions replaced by multiplications),
//   8 = the first version's decoding (normal/subnormal select; same results, for comparison),
//  16 = "fast encode" (see encode8_fast; AVX2 path only; differs from the exact codes only by
//       double rounding in the subnormal-code range; checked against its own torch reference).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#if defined(__AVX2__)
#include <immintrin.h>
#define LF_AVX2 1
#endif

#if defined(__GNUC__)
#define LF_INLINE inline __attribute__((always_inline))
#else
#define LF_INLINE inline
#endif

namespace lookup_free {

constexpr int64_t BS = 256;
constexpr int64_t GRAIN_BLOCKS = 128;  // dist8: 32768 values / block_size
constexpr uint32_t INF_BITS = 0x7F800000u;
constexpr float FLT_MIN_NORMAL = 1.17549435082228750797e-38f;

// Per-state code constants.
struct Code {
  int32_t off;        // normal codes: float bits = (k + off) << 20
  uint32_t minnorm;   // float bits of the smallest normal code value
  float sub_scale;    // subnormal range: k = round(|y| * sub_scale)
  float sub_inv;      // and back: k * sub_inv
  int32_t kmax;       // largest magnitude code
  bool sign;
};
constexpr Code M_CODE{896, 0x38800000u, 131072.0f, 7.62939453125e-06f, 127, true};             // 2^-14; 2^17
constexpr Code V_CODE{768, 0x30800000u, 8589934592.0f, 1.16415321826934814453e-10f, 255, false};  // 2^-30; 2^33
constexpr float V_FLOOR_FRAC = 5.82076609134674072266e-11f;  // 2^-34: half the smallest positive v code

struct Scalars {
  float lr, beta1, omb1, beta2, omb2, eps, decay, bc2_sqrt, grad_scale, grad_wd;
};

LF_INLINE uint32_t f2u(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
LF_INLINE float u2f(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// ---- scalar code (reference semantics; also the non-AVX2 path) --------------------------
LF_INLINE uint8_t encode1(float y, const Code& c) {
  const uint32_t bits = f2u(y), a = bits & 0x7FFFFFFFu;
  int32_t k;
  if (a < c.minnorm) {
    k = (int32_t)std::nearbyint(u2f(a) * c.sub_scale);  // round half even (default rounding mode)
  } else {
    const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
    k = (int32_t)(r >> 20) - c.off;
  }
  k = std::min(k, c.kmax);
  if (c.sign) k |= (int32_t)((bits >> 24) & 0x80u);
  return (uint8_t)k;
}

LF_INLINE float decode1(uint8_t code, const Code& c) {
  const int32_t mag = c.sign ? (code & 127) : code;
  const float v = mag < 8 ? (float)mag * c.sub_inv : u2f((uint32_t)(mag + c.off) << 20);
  return (c.sign && (code & 128)) ? -v : v;
}

LF_INLINE float block_reciprocal(float am) { return am >= FLT_MIN_NORMAL ? 1.0f / am : 1.0f; }

template <int V>
LF_INLINE float rule1(float p, float g, float& m, float& v, const Scalars& s) {
  g = g * s.grad_scale;
  g = g + s.grad_wd * p;
  m = s.beta1 * m + s.omb1 * g;
  v = s.beta2 * v + s.omb2 * (g * g);
  if (V & 4) {
    const float denom = v * s.bc2_sqrt + s.eps;
    p = p * s.decay;
    return p - s.lr * (m * denom);
  }
  const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  p = p * s.decay;
  return p - s.lr * (m / denom);
}

struct Args {
  float* p;
  const float* g;
  uint8_t* mc;
  uint8_t* vc;
  float* ma;
  float* va;
  Scalars s;
};

// Returns 1 if the block was skipped (non-finite new value).
template <int V>
int64_t block_scalar(const Args& a, int64_t b) {
  const int64_t off = b * BS;
  float mb[BS], vb[BS], pb[BS];
  const float am = a.ma[b], av = a.va[b], fl = V_FLOOR_FRAC * av;
  uint32_t bm = 0, bv = 0, bp = 0;
  for (int64_t i = 0; i < BS; ++i) {
    float m, v;
    if (V & 1) {
      m = 0.5f * am;
      v = 0.5f * av;
    } else {
      m = decode1(a.mc[off + i], M_CODE) * am;
      v = decode1(a.vc[off + i], V_CODE) * av;
      v = v < fl ? fl : v;
    }
    pb[i] = rule1<V>(a.p[off + i], a.g[off + i], m, v, a.s);
    mb[i] = m;
    vb[i] = v;
    bm = std::max(bm, f2u(m) & 0x7FFFFFFFu);
    bv = std::max(bv, f2u(v) & 0x7FFFFFFFu);
    bp = std::max(bp, f2u(pb[i]) & 0x7FFFFFFFu);
  }
  if (std::max(bm, std::max(bv, bp)) >= INF_BITS) return 1;
  memcpy(a.p + off, pb, sizeof(pb));
  const float nm = u2f(bm), nv = u2f(bv);
  a.ma[b] = nm;
  a.va[b] = nv;
  if (!(V & 2)) {  // (variant 16, fast encode, exists on the AVX2 path only)
    const float rm = block_reciprocal(nm), rv = block_reciprocal(nv);
    for (int64_t i = 0; i < BS; ++i) {
      a.mc[off + i] = encode1(mb[i] * rm, M_CODE);
      a.vc[off + i] = encode1(vb[i] * rv, V_CODE);
    }
  }
  return 0;
}

#ifdef LF_AVX2
// ---- AVX2 ------------------------------------------------------------------------------
// Code -> value (relative to absmax) of 8 codes. The code's bits placed at float bits 20..27
// (sign at 31) form a float32 that is the code value times 2^-112 (m) or 2^-96 (v), the
// subnormal codes included (they become float32 subnormals), so one exact multiplication by a
// power of two finishes the decoding: 3-4 integer ops and one multiplication, no select.
template <bool SIGNED>
LF_INLINE __m256 decode8(const uint8_t* codes) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  if (SIGNED) {
    // sign-extended: a code with bit 7 set has bits 8..31 set; after << 20 keep bit 31 and 20..26
    const __m256i b = _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepi8_epi32(raw), 20),
                                       _mm256_set1_epi32((int32_t)0x87F00000u));
    return _mm256_mul_ps(_mm256_castsi256_ps(b), _mm256_set1_ps(5.192296858534828e+33f));  // 2^112
  }
  const __m256i b = _mm256_slli_epi32(_mm256_cvtepu8_epi32(raw), 20);
  return _mm256_mul_ps(_mm256_castsi256_ps(b), _mm256_set1_ps(7.922816251426434e+28f));  // 2^96
}

// The first version (variant bit 8, for comparison): normal and subnormal codes decoded
// separately and selected. Same values.
template <bool SIGNED>
LF_INLINE __m256 decode8_select(const uint8_t* codes) {
  constexpr Code c = SIGNED ? M_CODE : V_CODE;
  const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i mag = SIGNED ? _mm256_and_si256(k, _mm256_set1_epi32(127)) : k;
  const __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(c.off)), 20));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(c.sub_inv));
  const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
  __m256 v = _mm256_blendv_ps(normal, sub, is_sub);
  if (SIGNED) {
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(k, _mm256_set1_epi32(128)), 24);
    v = _mm256_or_ps(v, _mm256_castsi256_ps(sign));
  }
  return v;
}

// One code per 32-bit lane. CLAMP: limit the magnitude to kmax (needed only for |y| > 1.875;
// inside the kernel |y| = |x * fl(1 / absmax)| < 1 + 2^-22 always rounds to at most 1.0).
template <bool SIGNED, bool CLAMP = true>
LF_INLINE __m256i encode8(__m256 y) {
  constexpr Code c = SIGNED ? M_CODE : V_CODE;
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  // (a + 0x7FFFF + odd) >> 20 is the float rounded to 3 mantissa bits (ties to even); subtracting
  // off << 20 first (mod 2^32) leaves the code directly for every normal-range a
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32((int32_t)(0x7FFFFu - ((uint32_t)c.off << 20)))), odd);
  const __m256i kn = _mm256_srli_epi32(r, 20);
  const __m256i ks = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(c.sub_scale)));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)c.minnorm), a);
  __m256i k = _mm256_blendv_epi8(kn, ks, is_sub);
  if (CLAMP) k = _mm256_min_epi32(k, _mm256_set1_epi32(c.kmax));
  if (SIGNED) k = _mm256_or_si256(k, _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(128)));
  return k;
}

LF_INLINE void store_codes32(__m256i a, __m256i b, __m256i c, __m256i d, uint8_t* out) {
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, order));
}

// Variant 16 ("fast encode"): the power of two 2^-112 (m) / 2^-96 (v) is folded into the block
// reciprocal, r' = fl(1 / absmax) * 2^-112, so t = x * r' is the code's own float32 (the subnormal
// codes float32 subnormals) and only the integer round-to-nearest-even of its 20 low bits is
// left: 6 ops (v) / 9 ops (m) per 8 values instead of 11 / 14. It differs from the exact encoding
// only by double rounding in the subnormal-code range (t is first rounded to the float32 subnormal
// grid, 2^-20 of a code step). Blocks whose r' is not a normal float (absmax >= 2^14 for m,
// >= 2^30 for v) use the exact encoding.
template <bool SIGNED>
LF_INLINE __m256i encode8_fast(__m256 t) {
  const __m256i bits = _mm256_castps_si256(t);
  const __m256i a = SIGNED ? _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)) : bits;  // v >= +0
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i k = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF)), odd), 20);
  if (SIGNED) k = _mm256_or_si256(k, _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(128)));
  return k;
}

template <bool SIGNED>
LF_INLINE void quantize256_fast(const float* x, float rf, uint8_t* out) {
  const __m256 r = _mm256_set1_ps(rf);
  for (int64_t i = 0; i < BS; i += 32)
    store_codes32(encode8_fast<SIGNED>(_mm256_mul_ps(_mm256_load_ps(x + i), r)),
                  encode8_fast<SIGNED>(_mm256_mul_ps(_mm256_load_ps(x + i + 8), r)),
                  encode8_fast<SIGNED>(_mm256_mul_ps(_mm256_load_ps(x + i + 16), r)),
                  encode8_fast<SIGNED>(_mm256_mul_ps(_mm256_load_ps(x + i + 24), r)), out + i);
}

template <bool SIGNED>
LF_INLINE void quantize256(const float* x, float rf, uint8_t* out) {
  const __m256 r = _mm256_set1_ps(rf);
  for (int64_t i = 0; i < BS; i += 32)
    store_codes32(encode8<SIGNED, false>(_mm256_mul_ps(_mm256_load_ps(x + i), r)),
                  encode8<SIGNED, false>(_mm256_mul_ps(_mm256_load_ps(x + i + 8), r)),
                  encode8<SIGNED, false>(_mm256_mul_ps(_mm256_load_ps(x + i + 16), r)),
                  encode8<SIGNED, false>(_mm256_mul_ps(_mm256_load_ps(x + i + 24), r)), out + i);
}

LF_INLINE uint32_t reduce_max(__m256i m) {
  __m128i x = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return (uint32_t)_mm_cvtsi128_si32(x);
}

template <int V>
int64_t block_avx2(const Args& a, int64_t b) {
  const int64_t off = b * BS;
  alignas(32) float mb[BS], vb[BS], pb[BS];
  const float am = a.ma[b], av = a.va[b];
  const __m256 vam = _mm256_set1_ps(am), vav = _mm256_set1_ps(av);
  const __m256 vfloor = _mm256_set1_ps(V_FLOOR_FRAC * av);
  const Scalars& s = a.s;
  const __m256 gs = _mm256_set1_ps(s.grad_scale), gwd = _mm256_set1_ps(s.grad_wd);
  const __m256 b1 = _mm256_set1_ps(s.beta1), omb1 = _mm256_set1_ps(s.omb1);
  const __m256 b2 = _mm256_set1_ps(s.beta2), omb2 = _mm256_set1_ps(s.omb2);
  const __m256 bc2 = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 decay = _mm256_set1_ps(s.decay), lr = _mm256_set1_ps(s.lr);
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i mxm = _mm256_setzero_si256(), mxv = _mm256_setzero_si256(), mxp = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int64_t i = 0; i < BS; i += 8) {
    __m256 m, v;
    if (V & 1) {
      m = _mm256_mul_ps(vam, _mm256_set1_ps(0.5f));
      v = _mm256_mul_ps(vav, _mm256_set1_ps(0.5f));
    } else {
      if (V & 8) {
        m = _mm256_mul_ps(decode8_select<true>(a.mc + off + i), vam);
        v = _mm256_mul_ps(decode8_select<false>(a.vc + off + i), vav);
      } else {
        m = _mm256_mul_ps(decode8<true>(a.mc + off + i), vam);
        v = _mm256_mul_ps(decode8<false>(a.vc + off + i), vav);
      }
      v = _mm256_max_ps(vfloor, v);  // v < floor ? floor : v (a NaN v stays NaN)
    }
    __m256 p = _mm256_loadu_ps(a.p + off + i);
    __m256 g = _mm256_loadu_ps(a.g + off + i);
    g = _mm256_mul_ps(g, gs);
    g = _mm256_add_ps(g, _mm256_mul_ps(gwd, p));
    m = _mm256_add_ps(_mm256_mul_ps(b1, m), _mm256_mul_ps(omb1, g));
    v = _mm256_add_ps(_mm256_mul_ps(b2, v), _mm256_mul_ps(omb2, _mm256_mul_ps(g, g)));
    __m256 upd;
    if (V & 4) {
      const __m256 denom = _mm256_add_ps(_mm256_mul_ps(v, bc2), eps);
      upd = _mm256_mul_ps(m, denom);
    } else {
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
      upd = _mm256_div_ps(m, denom);
    }
    p = _mm256_mul_ps(p, decay);
    p = _mm256_sub_ps(p, _mm256_mul_ps(lr, upd));
    _mm256_store_ps(mb + i, m);
    _mm256_store_ps(vb + i, v);
    _mm256_store_ps(pb + i, p);
    mxm = _mm256_max_epu32(mxm, _mm256_and_si256(_mm256_castps_si256(m), absmask));
    mxv = _mm256_max_epu32(mxv, _mm256_and_si256(_mm256_castps_si256(v), absmask));
    mxp = _mm256_max_epu32(mxp, _mm256_and_si256(_mm256_castps_si256(p), absmask));
  }
  const uint32_t bm = reduce_max(mxm), bv = reduce_max(mxv), bp = reduce_max(mxp);
  if (std::max(bm, std::max(bv, bp)) >= INF_BITS) return 1;
  for (int64_t i = 0; i < BS; i += 8) _mm256_storeu_ps(a.p + off + i, _mm256_load_ps(pb + i));
  const float nm = u2f(bm), nv = u2f(bv);
  a.ma[b] = nm;
  a.va[b] = nv;
  if (!(V & 2)) {
    const float rm = block_reciprocal(nm), rv = block_reciprocal(nv);
    if (V & 16) {
      const float rmf = rm * 1.92592994438723585306e-34f, rvf = rv * 1.26217744835361888865e-29f;  // 2^-112, 2^-96
      if (rmf >= FLT_MIN_NORMAL) quantize256_fast<true>(mb, rmf, a.mc + off);
      else quantize256<true>(mb, rm, a.mc + off);
      if (rvf >= FLT_MIN_NORMAL) quantize256_fast<false>(vb, rvf, a.vc + off);
      else quantize256<false>(vb, rv, a.vc + off);
    } else {
      const __m256 vrm = _mm256_set1_ps(rm), vrv = _mm256_set1_ps(rv);
      for (int64_t i = 0; i < BS; i += 32) {
        store_codes32(encode8<true, false>(_mm256_mul_ps(_mm256_load_ps(mb + i), vrm)),
                      encode8<true, false>(_mm256_mul_ps(_mm256_load_ps(mb + i + 8), vrm)),
                      encode8<true, false>(_mm256_mul_ps(_mm256_load_ps(mb + i + 16), vrm)),
                      encode8<true, false>(_mm256_mul_ps(_mm256_load_ps(mb + i + 24), vrm)), a.mc + off + i);
        store_codes32(encode8<false, false>(_mm256_mul_ps(_mm256_load_ps(vb + i), vrv)),
                      encode8<false, false>(_mm256_mul_ps(_mm256_load_ps(vb + i + 8), vrv)),
                      encode8<false, false>(_mm256_mul_ps(_mm256_load_ps(vb + i + 16), vrv)),
                      encode8<false, false>(_mm256_mul_ps(_mm256_load_ps(vb + i + 24), vrv)), a.vc + off + i);
      }
    }
  }
  return 0;
}
#endif

using BlockFn = int64_t (*)(const Args&, int64_t);

template <int V>
BlockFn pick(bool simd) {
#ifdef LF_AVX2
  if (simd) return &block_avx2<V>;
#endif
  (void)simd;
  return &block_scalar<V>;
}

BlockFn pick_variant(int64_t variant, bool simd) {
  switch (variant) {
    case 0: return pick<0>(simd);
    case 1: return pick<1>(simd);
    case 2: return pick<2>(simd);
    case 3: return pick<3>(simd);
    case 4: return pick<4>(simd);
    case 5: return pick<5>(simd);
    case 6: return pick<6>(simd);
    case 7: return pick<7>(simd);
    case 8: return pick<8>(simd);
    case 16: return pick<16>(simd);
    case 18: return pick<18>(simd);
    default: TORCH_CHECK(false, "lookup_free: variant must be 0..8, 16 or 18, got ", variant);
  }
}

void check_f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "lookup_free: ", name, " must be a contiguous CPU float32 tensor of ", n, " values");
}
void check_u8(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous() && t.numel() == n,
              "lookup_free: ", name, " must be a contiguous CPU uint8 tensor of ", n, " values");
}

int64_t adam_(at::Tensor p, const at::Tensor& g, at::Tensor m_codes, at::Tensor v_codes, at::Tensor m_absmax,
              at::Tensor v_absmax, double lr, double beta1, double beta2, double eps, double weight_decay, double bc1,
              double bc2_sqrt, int64_t variant, bool simd, double grad_scale, double grad_wd) {
  const int64_t n = p.numel();
  TORCH_CHECK(n % BS == 0, "lookup_free: n must be a multiple of ", BS, ", got ", n);
  const int64_t nb = n / BS;
  check_f32(p, n, "p");
  check_f32(g, n, "g");
  check_u8(m_codes, n, "m_codes");
  check_u8(v_codes, n, "v_codes");
  check_f32(m_absmax, nb, "m_absmax");
  check_f32(v_absmax, nb, "v_absmax");
  Args a;
  a.p = p.data_ptr<float>();
  a.g = g.data_ptr<float>();
  a.mc = m_codes.data_ptr<uint8_t>();
  a.vc = v_codes.data_ptr<uint8_t>();
  a.ma = m_absmax.data_ptr<float>();
  a.va = v_absmax.data_ptr<float>();
  // The same float32 scalars dist8's Scalars.for_adam(lr=lr / bc1, ..., decay=1 - lr * wd) hands its kernel.
  a.s = Scalars{(float)(lr / bc1), (float)beta1, (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2),
                (float)eps,        (float)(1.0 - lr * weight_decay), (float)bc2_sqrt, (float)grad_scale,
                (float)grad_wd};
  const BlockFn fn = pick_variant(variant, simd);
  std::atomic<int64_t> skipped{0};
  at::parallel_for(0, nb, GRAIN_BLOCKS, [&](int64_t b0, int64_t b1) {
    int64_t s = 0;
    for (int64_t b = b0; b < b1; ++b) s += fn(a, b);
    if (s) skipped += s;
  });
  return skipped.load();
}

// Elementwise code <-> float (no absmax, no floor): for the exactness tests of the coding.
at::Tensor encode(const at::Tensor& y, bool is_signed, bool simd) {
  const int64_t n = y.numel();
  check_f32(y, n, "y");
  at::Tensor out = at::empty({n}, y.options().dtype(at::kByte));
  const float* src = y.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  int64_t i = 0;
#ifdef LF_AVX2
  if (simd)
    for (; i + 32 <= n; i += 32) {
      if (is_signed)
        store_codes32(encode8<true>(_mm256_loadu_ps(src + i)), encode8<true>(_mm256_loadu_ps(src + i + 8)),
                      encode8<true>(_mm256_loadu_ps(src + i + 16)), encode8<true>(_mm256_loadu_ps(src + i + 24)),
                      dst + i);
      else
        store_codes32(encode8<false>(_mm256_loadu_ps(src + i)), encode8<false>(_mm256_loadu_ps(src + i + 8)),
                      encode8<false>(_mm256_loadu_ps(src + i + 16)), encode8<false>(_mm256_loadu_ps(src + i + 24)),
                      dst + i);
    }
#endif
  for (; i < n; ++i) dst[i] = encode1(src[i], is_signed ? M_CODE : V_CODE);
  return out;
}

at::Tensor decode(const at::Tensor& codes, bool is_signed, bool simd) {
  const int64_t n = codes.numel();
  check_u8(codes, n, "codes");
  at::Tensor out = at::empty({n}, codes.options().dtype(at::kFloat));
  const uint8_t* src = codes.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  int64_t i = 0;
#ifdef LF_AVX2
  if (simd)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, is_signed ? decode8<true>(src + i) : decode8<false>(src + i));
#endif
  for (; i < n; ++i) dst[i] = decode1(src[i], is_signed ? M_CODE : V_CODE);
  return out;
}

std::string features() {
#ifdef LF_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace lookup_free

TORCH_LIBRARY(lookup_free, m) {
  m.def("adam_(Tensor(a!) p, Tensor g, Tensor(b!) m_codes, Tensor(c!) v_codes, Tensor(d!) m_absmax, "
        "Tensor(e!) v_absmax, float lr, float beta1, float beta2, float eps, float weight_decay, float bc1, "
        "float bc2_sqrt, int variant=0, bool simd=True, float grad_scale=1.0, float grad_wd=0.0) -> int");
  m.def("encode(Tensor y, bool is_signed, bool simd=True) -> Tensor");
  m.def("decode(Tensor codes, bool is_signed, bool simd=True) -> Tensor");
  m.def("features() -> str", &lookup_free::features);
}

TORCH_LIBRARY_IMPL(lookup_free, CPU, m) {
  m.impl("adam_", &lookup_free::adam_);
  m.impl("encode", &lookup_free::encode);
  m.impl("decode", &lookup_free::decode);
}
