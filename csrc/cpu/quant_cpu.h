// quant_cpu.h -- block-wise quantization primitives for the CPU kernels.
//
// Exact nearest code with one table load per value. The nearest code is a
// monotone step function of x, so it is fixed by 256 thresholds in the order of
// the monotone integer key of x (float_key): T_0 where NaN's code 255 (below
// -inf in key order) turns into code 0 at -inf, and T_k, the smallest key with
// code >= k, for k = 1..255. The thresholds are found by bisection with the
// reference algorithm itself, so the table reproduces searchsorted + the tie
// rule exactly. A bucket is the top `bits` bits of the key; `bits` is the
// smallest width for which no bucket holds two thresholds. Each bucket's uint32
// entry is E = (c + 1) * 2^24 - t - s (mod 2^32), where c is the code at the
// bucket start s (a key), and t the low key bits of the threshold inside the
// bucket (2^24 when there is none). Then, for a key k = s + l in the bucket,
//     code = low 8 bits of ((E + k) >> 24) = low 8 bits of ((c + 1) * 2^24 + l - t) >> 24
// is c + 1 when l >= t and c otherwise (c = 255 wraps to 0 for the -inf
// threshold): one load, one add, no compare. Maps for which no such table
// exists (unsorted, repeated entries, infinities) use the per-value binary
// search of dist8_rules.h.
//
// The fp8 maps (dist8.quant.maps.fp8_map) need no table at all: a code is the
// float's bits with the mantissa rounded to 3 bits and the exponent rebiased, and
// a value is the code's bits shifted back (Fp8Codec). build_qtable recognises such
// a map by checking the codec against it -- every value, and the code on both sides
// of every threshold -- and the AVX2 and AVX-512 paths then compute instead of loading.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "dist8_rules.h"
#include "runs_cpu.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>
#define D8_AVX512 1
#if defined(__AVX512VBMI__)
#define D8_VBMI 1
#endif
#elif defined(__AVX2__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>
#define D8_AVX2 1  // AMD Zen 1-3, Intel client cores: 8-lane table lookups for codes and dequantization
#endif

#if defined(__GNUC__)
#define D8_INLINE inline __attribute__((always_inline))
#else
#define D8_INLINE inline
#endif

namespace dist8 {

// Codes of an fp8 map from the float bits (dist8.quant.maps.fp8_map). A magnitude k has
// exponent field k >> 3 and 3 mantissa bits; k < 8 are subnormal codes k * 2^-(bias + 2).
// Signed maps (e4m3, bias 15): code 128 + k is +mag(k), 128 - k is -mag(k) (k <= 128).
// Unsigned maps (e5m3, bias 31): code k. Rounding: to the nearest code, ties to the smaller
// magnitude (dist8's tie rule); NaN -> 255, beyond the ends -> the end codes.
struct Fp8Codec {
  bool is_signed = false;
  uint32_t rebias = 0;      // (127 - bias) << 3: normal k = (bits rounded to 3 mantissa bits >> 20) - rebias
  uint32_t normal_min = 0;  // float bits of the smallest normal code, mag(8) = 2^(1 - bias)
  float to_sub = 0.f;       // 2^(bias + 2): a subnormal code's k is round(|y| * to_sub)
  float from_sub = 0.f;     // 2^-(bias + 2)
  int kmax_pos = 0, kmax_neg = 0;

  static Fp8Codec make(bool is_signed) {
    Fp8Codec c;
    const int bias = is_signed ? 15 : 31;
    c.is_signed = is_signed;
    c.rebias = uint32_t(127 - bias) << 3;
    c.normal_min = uint32_t(128 - bias) << 23;
    c.to_sub = std::ldexp(1.0f, bias + 2);
    c.from_sub = std::ldexp(1.0f, -(bias + 2));
    c.kmax_pos = is_signed ? 127 : 255;
    c.kmax_neg = is_signed ? 128 : 0;
    return c;
  }

  uint8_t encode(float y) const {
    const uint32_t b = f2u(y), ab = b & 0x7FFFFFFFu;
    if (ab > 0x7F800000u) return 255;  // NaN
    const bool neg = (b >> 31) != 0;
    if (neg && !is_signed) return 0;
    int k;
    if (ab < normal_min) {
      // |y| * to_sub is exact; ceil(t - 0.5) rounds half down (t - 0.5 is exact where it matters, t >= 0.25)
      k = (int)std::ceil(fsub(fmul(u2f(ab), to_sub), 0.5f));
    } else {
      k = (int)((ab + 0x7FFFFu) >> 20) - (int)rebias;  // round the 20 dropped mantissa bits, half down
    }
    k = std::min(k, neg ? kmax_neg : kmax_pos);
    return (uint8_t)(is_signed ? (neg ? 128 - k : 128 + k) : k);
  }

  float decode(uint8_t code) const {
    int k = code;
    uint32_t sign = 0;
    if (is_signed) {
      k = code >= 128 ? code - 128 : 128 - code;
      sign = code < 128 ? 0x80000000u : 0u;
    }
    const float mag = k < 8 ? fmul((float)k, from_sub) : u2f(((uint32_t)k + rebias) << 20);
    return u2f(f2u(mag) | sign);
  }
};

struct QTable {
  alignas(64) float q[256];
  alignas(64) uint8_t planes[4][256];  // byte k of every q[i] (for VBMI table lookups)
  bool fast = false;
  float floor_frac = 0.f;  // state_floor_fraction(q): floor of second-moment-like states
  int shift = 32;
  uint32_t lowmask = 0;
  std::vector<uint32_t> lut;
  bool fp8 = false;  // q is an fp8 map: codec computes codes and values (AVX2 and AVX-512 paths)
  Fp8Codec codec;
  bool runs = false;  // AVX-512: codes computed from the map's linear runs (runs_cpu.h), the key table's
  RunCodec rc;        // exact codes where they are too close to call

  // The 64-value quantizer of this build has a vector path for this map.
  bool simd_codes() const {
#if defined(D8_AVX2) || defined(D8_AVX512)
    return fast || fp8;
#else
    return fast;
#endif
  }

  // Code of one normalised value (bit-identical to dist8.quant.nearest_code).
  inline uint8_t code(float y) const {
    if (!fast) return (uint8_t)nearest_code(y, q);
    const uint32_t k = float_key(y);
    return (uint8_t)((lut[k >> shift] + k) >> 24);
  }
};

inline void build_qtable(QTable& t, const float* qmap) {
  memcpy(t.q, qmap, sizeof(t.q));
  t.floor_frac = state_floor_fraction(t.q);
  for (int i = 0; i < 256; ++i) {
    uint32_t u;
    memcpy(&u, &t.q[i], 4);
    for (int k = 0; k < 4; ++k) t.planes[k][i] = (uint8_t)(u >> (8 * k));
  }
  t.fast = false;
  const float* q = t.q;
  for (int i = 0; i < 256; ++i)
    if (!std::isfinite(q[i]) || (i && !(q[i - 1] < q[i]))) return;  // needs strictly increasing, finite
  const uint32_t kmin = float_key(-INFINITY), kmax = float_key(INFINITY);
  auto code_at = [&](uint32_t k) { return nearest_code(key_float(k), q); };
  if (code_at(kmin) != 0 || code_at(kmax) != 255) return;
  std::vector<uint32_t> thr(256);  // thr[k]: key where the code becomes k (thr[0]: -inf)
  thr[0] = kmin;
  for (int k = 1; k < 256; ++k) {
    uint32_t lo = kmin, hi = kmax;  // code(lo) < k <= code(hi)
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (code_at(mid) >= k) hi = mid;
      else lo = mid;
    }
    thr[k] = hi;
    if (thr[k] <= thr[k - 1]) return;  // a code that is never nearest
  }
  // An fp8 map: the codec must give every value, and the code on both sides of every
  // threshold (both are monotone step functions in key order), NaN and the infinities.
  for (const bool is_signed : {true, false}) {
    const Fp8Codec c = Fp8Codec::make(is_signed);
    bool same = true;
    for (int i = 0; i < 256 && same; ++i) same = f2u(c.decode((uint8_t)i)) == f2u(q[i]);
    auto agrees = [&](uint32_t k) { return c.encode(key_float(k)) == (uint8_t)code_at(k); };
    for (int k = 0; k < 256 && same; ++k) same = agrees(thr[k]) && agrees(thr[k] - 1);
    for (float y : {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f}) same = same && c.encode(y) == nearest_code(y, q);
    if (same) {
      t.fp8 = true;
      t.codec = c;
    }
  }
  int bits = -1;
  for (int b = 9; b <= 20 && bits < 0; ++b) {
    bool ok = true;
    for (int k = 1; k < 256 && ok; ++k) ok = (thr[k] >> (32 - b)) != (thr[k - 1] >> (32 - b));
    if (ok) bits = b;
  }
  if (bits < 0) return;
  t.shift = 32 - bits;
  t.lowmask = (1u << t.shift) - 1;
  const size_t nb = size_t(1) << bits;
  t.lut.assign(nb, 0);
  size_t passed = 0;  // thresholds <= bucket start
  for (size_t b = 0; b < nb; ++b) {
    const uint32_t start = uint32_t(b << t.shift);
    while (passed < 256 && thr[passed] <= start) ++passed;
    const uint32_t c = passed == 0 ? 255u : uint32_t(passed - 1);
    uint32_t low = 1u << 24;  // no threshold inside this bucket
    if (passed < 256 && (thr[passed] >> t.shift) == b) low = thr[passed] & t.lowmask;
    t.lut[b] = uint32_t(((uint64_t(c) + 1) << 24) - low - start);
  }
  // Check the table where it can go wrong: both sides of every threshold and bucket edge.
  t.fast = true;
  auto agrees = [&](uint32_t k) { return t.code(key_float(k)) == (uint8_t)code_at(k); };
  for (int k = 0; k < 256 && t.fast; ++k) t.fast = agrees(thr[k]) && agrees(thr[k] - 1);
  for (size_t b = 0; b < nb && t.fast; ++b) {
    const uint32_t start = uint32_t(b << t.shift);
    t.fast = agrees(start) && agrees(start | t.lowmask);
  }
#ifdef D8_AVX512
  if (t.fast && !t.fp8) {
    t.rc = RunCodec::make(q, thr, [&](float y) { return nearest_code(y, q); });
    t.runs = t.rc.ok;
  }
#endif
}

// How the vector paths load table entries: the AVX2 path the 8 entries of 8 lanes (the code table
// in quantization, the map in dequantization), the AVX-512 path the 16 entries of the code table
// (its dequantization uses VBMI permutes, or gathers without VBMI). HW_GATHER: one vpgatherdd; fast
// on Intel (Haswell on), microcoded and slow on AMD Zen 1-3, slow on Zen 4. SCALAR: scalar loads
// into the lanes, which run on the load ports and the shuffle units; measured 1.3-1.4x faster per
// lookup than the gather on a Zen 3 EPYC, and the AVX-512 step 2-18% faster on a Zen 4 EPYC. Default:
// SCALAR on AMD, HW_GATHER elsewhere; DIST8_CPU_GATHER=hw|scalar overrides (read at each op call,
// so a benchmark can compare both in one process). Bit-identical either way. The portable path has
// no vectors.
enum LookupMode : int { LOOKUP_HW_GATHER = 0, LOOKUP_SCALAR = 1 };

// The CPU's vendor and family (cpuid leaves 0 and 1), read once: in a VM cpuid traps to the hypervisor.
struct CpuId {
  bool amd = false, hygon = false;  // "AuthenticAMD"; "HygonGenuine" (Zen 1)
  unsigned family = 0;              // base family, plus the extended family when the base is 0xF
};

inline CpuId read_cpu_id() {
  CpuId id;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return id;
  id.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
  id.hygon = b == 0x6f677948u && d == 0x6e65476eu && c == 0x656e6975u;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const unsigned base = (a >> 8) & 0xF;
    id.family = base == 0xF ? base + ((a >> 20) & 0xFF) : base;
  }
#endif
  return id;
}

inline const CpuId& this_cpu() {
  static const CpuId id = read_cpu_id();
  return id;
}

// A kernel switch read at each op call: whether the variable `name` picks `b` (rather than `a`), or
// `fallback` (the CPU's default) when it is unset or empty; any other value is an error naming the
// variable (a typo is not a silent default).
inline bool env_picks_b(const char* name, const char* a, const char* b, bool fallback) {
  const char* e = std::getenv(name);
  if (!e || !*e) return fallback;
  const std::string v(e);
  if (v == a || v == b) return v == b;
  throw std::invalid_argument(std::string("dist8: ") + name + " must be '" + a + "' or '" + b + "', got '" + v + "'");
}

inline int default_lookup_mode() {
  return (this_cpu().amd || this_cpu().hygon) ? LOOKUP_SCALAR : LOOKUP_HW_GATHER;
}

inline std::atomic<int>& lookup_mode_ref() {
  static std::atomic<int> mode{default_lookup_mode()};
  return mode;
}

inline int lookup_mode() { return lookup_mode_ref().load(std::memory_order_relaxed); }

// Whether the AVX-512 path computes the codes of maps made of linear runs (runs_cpu.h) or looks
// them up in the key table like any other map. Bit-identical either way; which is faster depends on
// the core's 512-bit permutes: measured 0.72-0.84x the step time on AMD Zen 5 (bench/lookup_modes.py),
// not measured elsewhere, so the default is "runs" on AMD family 26 on (Zen 5) and "table" on other
// CPUs. DIST8_CPU_CODES=runs|table overrides, read at each op call like DIST8_CPU_GATHER.
inline bool default_run_codes() { return this_cpu().amd && this_cpu().family >= 0x1A; }

inline std::atomic<bool>& run_codes_ref() {
  static std::atomic<bool> on{default_run_codes()};
  return on;
}

inline bool run_codes_enabled() { return run_codes_ref().load(std::memory_order_relaxed); }

// Called at the start of each op: DIST8_CPU_GATHER and DIST8_CPU_CODES, else the CPU's defaults. Every
// build checks the variables; only the AVX2 and AVX-512 paths use the lookup mode, only AVX-512 the codes.
inline void refresh_lookup_mode() {
  const bool scalar = env_picks_b("DIST8_CPU_GATHER", "hw", "scalar", default_lookup_mode() == LOOKUP_SCALAR);
  lookup_mode_ref().store(scalar ? LOOKUP_SCALAR : LOOKUP_HW_GATHER, std::memory_order_relaxed);
  run_codes_ref().store(!env_picks_b("DIST8_CPU_CODES", "runs", "table", !default_run_codes()),
                        std::memory_order_relaxed);
}

inline const char* lookup_mode_name() {
  return lookup_mode() == LOOKUP_SCALAR ? "scalar-load lookups" : "gather lookups";
}

// ---- scalar primitives (any length; the tails of the SIMD paths) -------------
inline void dequantize_n(const uint8_t* codes, int64_t n, float absmax, const QTable& t, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fmul(t.q[codes[i]], absmax);
}

inline void quantize_n(const float* v, int64_t n, float recip, const QTable& t, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = t.code(fmul(v[i], recip));
}

inline uint32_t absmax_bits_n(const float* v, int64_t n, uint32_t m) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = abs_bits(v[i]);
    m = b > m ? b : m;
  }
  return m;
}

// ---- 64-value primitives (the block loop works in chunks of 64) --------------
// How a primitive finds codes and values: decided per call (CODEC_ANY: a branch on the table),
// or compiled in (the block pipeline, which instantiates one loop per codec: with the branch
// inside its loop the default's step measured ~8% slower on a Zen 4 once the fp8 codec was
// inlined next to the key table).
enum Codec : int { CODEC_ANY = -1, CODEC_TABLE = 0, CODEC_FP8 = 1, CODEC_RUNS = 2 };

#ifdef D8_AVX512
// Fp8Codec for 16 lanes, bit-identical to its scalar encode/decode (and to the AVX2 fp8_codes8 /
// fp8_values8, op for op, with masks where AVX2 has blends and _mm256_sign_epi32).
struct Fp8Simd {
  bool is_signed = false;
  __m512i rebias, normal_min, kmax_pos, kmax_neg;
  __m512 to_sub, from_sub;
  Fp8Simd() = default;
  explicit Fp8Simd(const Fp8Codec& c)
      : is_signed(c.is_signed),
        rebias(_mm512_set1_epi32((int)c.rebias)),
        normal_min(_mm512_set1_epi32((int)c.normal_min)),
        kmax_pos(_mm512_set1_epi32(c.kmax_pos)),
        kmax_neg(_mm512_set1_epi32(c.kmax_neg)),
        to_sub(_mm512_set1_ps(c.to_sub)),
        from_sub(_mm512_set1_ps(c.from_sub)) {}
};

// Codes (one per lane) of 16 normalised values.
D8_INLINE __m512i fp8_codes16(__m512 y, const Fp8Simd& f) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i ab = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(ab, _mm512_set1_epi32(0x7FFFF)), 20), f.rebias);
  const __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_castsi512_ps(ab), f.to_sub), _mm512_set1_ps(0.5f));
  const __m512i sub = _mm512_cvttps_epi32(_mm512_roundscale_ps(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  __m512i k = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(f.normal_min, ab), normal, sub);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(b, _mm512_setzero_si512());  // sign bit set
  __m512i code;
  if (f.is_signed) {
    k = _mm512_min_epi32(k, _mm512_mask_blend_epi32(neg, f.kmax_pos, f.kmax_neg));
    const __m512i mid = _mm512_set1_epi32(128);
    code = _mm512_mask_sub_epi32(_mm512_add_epi32(mid, k), neg, mid, k);  // negative: 128 - k
  } else {
    code = _mm512_maskz_min_epi32((__mmask16)~neg, k, f.kmax_pos);  // negative: 0
  }
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(ab, _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(255));  // NaN: 255
}

// Values of 16 codes (one per lane).
D8_INLINE __m512 fp8_values16(__m512i c, const Fp8Simd& f) {
  __m512i k = c, sign = _mm512_setzero_si512();
  if (f.is_signed) {
    const __m512i d = _mm512_sub_epi32(c, _mm512_set1_epi32(128));
    k = _mm512_abs_epi32(d);
    sign = _mm512_and_si512(d, _mm512_set1_epi32((int)0x80000000u));
  }
  const __m512i normal = _mm512_slli_epi32(_mm512_add_epi32(k, f.rebias), 20);
  const __m512i sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(k), f.from_sub));
  const __m512i mag = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32(8), k), normal, sub);
  return _mm512_castsi512_ps(_mm512_or_si512(mag, sign));
}

struct QTableSimd {
  const QTable* t = nullptr;
  __m128i shift = _mm_setzero_si128();
  bool scalar = false;  // LOOKUP_SCALAR: the code table's entries by scalar loads (lookup16_scalar)
  Fp8Simd fp8;          // t->fp8: codes computed, no table
  bool runs = false;    // t->runs and DIST8_CPU_CODES allows: codes computed from the runs
  RunSimd rs;
  QTableSimd() = default;
  explicit QTableSimd(const QTable& tab)
      : t(&tab), shift(_mm_cvtsi32_si128(tab.shift)), scalar(lookup_mode() == LOOKUP_SCALAR), fp8(tab.codec),
        runs(tab.runs && run_codes_enabled()), rs(tab.rc) {}
};

D8_INLINE __m512i float_key16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  // b ^ ((b >> 31) | 0x80000000): flip all bits of negatives, the sign bit of the rest
  return _mm512_ternarylogic_epi32(b, _mm512_srai_epi32(b, 31), _mm512_set1_epi32((int)0x80000000u), 0x1E);
}

// L[idx] for the four lanes of idx with scalar loads; the indices leave the vector through two
// 64-bit extracts. Integer inserts, where the AVX2 path's lookup4 uses insertps: with insertps this
// path's scalar mode measured ~3% slower on a Zen 4 EPYC (bench/lookup_modes.py, three runs each).
D8_INLINE __m128i lookup4_u32(const uint32_t* L, __m128i idx) {
  const uint64_t a = (uint64_t)_mm_cvtsi128_si64(idx), b = (uint64_t)_mm_extract_epi64(idx, 1);
  __m128i x = _mm_cvtsi32_si128((int)L[(uint32_t)a]);
  x = _mm_insert_epi32(x, (int)L[a >> 32], 1);
  x = _mm_insert_epi32(x, (int)L[(uint32_t)b], 2);
  return _mm_insert_epi32(x, (int)L[b >> 32], 3);
}

// L[idx] for 16 lanes with scalar loads (LOOKUP_SCALAR): on AMD Zen 4 the step is a few percent
// faster than with vpgatherdd (bench/lookup_modes.py).
D8_INLINE __m512i lookup16_scalar(const uint32_t* L, __m512i idx) {
  const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(lookup4_u32(L, _mm512_castsi512_si128(idx))),
                                             lookup4_u32(L, _mm512_extracti32x4_epi32(idx, 1)), 1);
  const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(lookup4_u32(L, _mm512_extracti32x4_epi32(idx, 2))),
                                             lookup4_u32(L, _mm512_extracti32x4_epi32(idx, 3)), 1);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// E + key for 16 normalised values: the code is the top byte of each lane.
D8_INLINE __m512i code_words16(__m512 y, const QTableSimd& s) {
  const __m512i key = float_key16(y);
  const __m512i idx = _mm512_srl_epi32(key, s.shift);
  const __m512i entry = s.scalar ? lookup16_scalar(s.t->lut.data(), idx) : _mm512_i32gather_epi32(idx, s.t->lut.data(), 4);
  return _mm512_add_epi32(entry, key);
}

// Four vectors of code words (top bytes) to 64 codes.
D8_INLINE void store_codes64(__m512i w0, __m512i w1, __m512i w2, __m512i w3, uint8_t* out) {
#ifdef D8_VBMI
  // Top byte of every lane of two vectors at once: byte 4i+3 of (a, b) for i < 32.
  const __m512i top = _mm512_set_epi8(127, 123, 119, 115, 111, 107, 103, 99, 95, 91, 87, 83, 79, 75, 71, 67, 63,
                                      59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3, 127, 123, 119, 115,
                                      111, 107, 103, 99, 95, 91, 87, 83, 79, 75, 71, 67, 63, 59, 55, 51, 47, 43, 39,
                                      35, 31, 27, 23, 19, 15, 11, 7, 3);
  const __m512i lo = _mm512_permutex2var_epi8(w0, top, w1), hi = _mm512_permutex2var_epi8(w2, top, w3);
  _mm512_storeu_si512(out, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w0, 24)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w1, 24)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w2, 24)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 48), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w3, 24)));
#endif
}

// The key table's codes for the lanes of c marked in `slow` (a few lanes in a thousand).
__attribute__((noinline, cold)) inline __m512i exact_lanes16(__m512i c, __m512 y, __mmask16 slow, const QTable& t) {
  alignas(64) int32_t codes[16];
  alignas(64) float ys[16];
  _mm512_store_si512(codes, c);
  _mm512_store_ps(ys, y);
  for (unsigned m = slow; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    codes[l] = t.code(ys[l]);
  }
  return _mm512_load_si512(codes);
}

// Code words of 16 values v * recip (CODEC_TABLE: the table must be fast; CODEC_FP8: an fp8 map;
// CODEC_RUNS: a map with runs).
template <int CODEC = CODEC_ANY>
D8_INLINE __m512i quant_words16(const float* v, __m512 recip, const QTableSimd& s) {
  const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(v), recip);
  const bool fp8 = CODEC == CODEC_FP8 || (CODEC == CODEC_ANY && s.t->fp8);  // folded when CODEC is fixed
  if (fp8) return _mm512_slli_epi32(fp8_codes16(y, s.fp8), 24);
  if (CODEC == CODEC_RUNS || (CODEC == CODEC_ANY && s.runs)) {
    __mmask16 slow;
    __m512i c = run_codes16<CODEC == CODEC_RUNS>(y, s.rs, slow);  // the pipeline keeps finite blocks' codes only
    if (__builtin_expect(slow != 0, 0)) c = exact_lanes16(c, y, slow, *s.t);
    return _mm512_slli_epi32(c, 24);
  }
  return code_words16(y, s);
}

D8_INLINE void quantize64(const float* v, float recip, const QTableSimd& s, uint8_t* out) {
  if (!s.t->simd_codes()) return quantize_n(v, 64, recip, *s.t, out);
  const __m512 r = _mm512_set1_ps(recip);
  store_codes64(quant_words16(v, r, s), quant_words16(v + 16, r, s), quant_words16(v + 32, r, s),
                quant_words16(v + 48, r, s), out);
}

D8_INLINE __m512i absmax_bits16(const float* v, __m512i m) {
  return _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(v)), _mm512_set1_epi32(0x7FFFFFFF)));
}

// What the block pipeline (dist8_cpu.cpp) needs, named alike for AVX-512 and AVX2.
using Words16 = __m512i;  // quant_words16 of 16 values
using MaxBits = __m512i;  // running absmax bits
using Recip = __m512;     // broadcast reciprocal
D8_INLINE MaxBits maxbits_zero() { return _mm512_setzero_si512(); }
D8_INLINE uint32_t maxbits_reduce(MaxBits m) { return _mm512_reduce_max_epu32(m); }
D8_INLINE Recip recip_set(float r) { return _mm512_set1_ps(r); }

D8_INLINE void dequantize64_fp8(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  const __m512 a = _mm512_set1_ps(absmax);
  const Fp8Simd f(t.codec);
  for (int j = 0; j < 64; j += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(fp8_values16(c, f), a));
  }
}

D8_INLINE void dequantize64_table(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  const __m512 a = _mm512_set1_ps(absmax);
#ifdef D8_VBMI
  // Table lookup in registers: each byte plane of q is 4 zmm; vpermt2b picks from
  // 128 entries by the low 7 bits, a blend on the top bit picks the half. Codes are
  // permuted up front (4-byte groups transposed) so that the byte/word unpacks
  // below leave the 64 floats in order.
  const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i c = _mm512_permutexvar_epi32(perm, _mm512_loadu_si512(codes));
  const __mmask64 upper = _mm512_movepi8_mask(c);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const uint8_t* p = t.planes[k];
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(p), c, _mm512_load_si512(p + 64));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(p + 128), c, _mm512_load_si512(p + 192));
    b[k] = _mm512_mask_blend_epi8(upper, lo, hi);
  }
  const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l)), a));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l)), a));
  _mm512_storeu_ps(out + 32, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h)), a));
  _mm512_storeu_ps(out + 48, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h)), a));
#else
  for (int j = 0; j < 64; j += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_i32gather_ps(c, t.q, 4), a));
  }
#endif
}
#elif defined(D8_AVX2)
// Fp8Codec for 8 lanes, bit-identical to its scalar encode/decode.
struct Fp8Simd {
  bool is_signed = false;
  __m256i rebias, normal_min, kmax_pos, kmax_neg;
  __m256 to_sub, from_sub;
  Fp8Simd() = default;
  explicit Fp8Simd(const Fp8Codec& c)
      : is_signed(c.is_signed),
        rebias(_mm256_set1_epi32((int)c.rebias)),
        normal_min(_mm256_set1_epi32((int)c.normal_min)),
        kmax_pos(_mm256_set1_epi32(c.kmax_pos)),
        kmax_neg(_mm256_set1_epi32(c.kmax_neg)),
        to_sub(_mm256_set1_ps(c.to_sub)),
        from_sub(_mm256_set1_ps(c.from_sub)) {}
};

// Codes (one per lane) of 8 normalised values.
D8_INLINE __m256i fp8_codes8(__m256 y, const Fp8Simd& f) {
  const __m256i b = _mm256_castps_si256(y);
  const __m256i ab = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_add_epi32(ab, _mm256_set1_epi32(0x7FFFF)), 20), f.rebias);
  const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_castsi256_ps(ab), f.to_sub), _mm256_set1_ps(0.5f));
  const __m256i sub = _mm256_cvttps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  __m256i k = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(f.normal_min, ab));
  __m256i code;
  if (f.is_signed) {
    k = _mm256_min_epi32(k, _mm256_blendv_epi8(f.kmax_pos, f.kmax_neg, _mm256_srai_epi32(b, 31)));
    code = _mm256_add_epi32(_mm256_set1_epi32(128), _mm256_sign_epi32(k, b));  // b < 0: 128 - k
  } else {
    code = _mm256_andnot_si256(_mm256_srai_epi32(b, 31), _mm256_min_epi32(k, f.kmax_pos));  // negative: 0
  }
  const __m256i nan = _mm256_cmpgt_epi32(ab, _mm256_set1_epi32(0x7F800000));
  return _mm256_max_epi32(code, _mm256_and_si256(nan, _mm256_set1_epi32(255)));  // NaN: 255
}

// Values of 8 codes (one per lane).
D8_INLINE __m256 fp8_values8(__m256i c, const Fp8Simd& f) {
  __m256i k = c, sign = _mm256_setzero_si256();
  if (f.is_signed) {
    const __m256i d = _mm256_sub_epi32(c, _mm256_set1_epi32(128));
    k = _mm256_abs_epi32(d);
    sign = _mm256_and_si256(d, _mm256_set1_epi32((int)0x80000000u));
  }
  const __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, f.rebias), 20));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(k), f.from_sub);
  const __m256 mag = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), k)));
  return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
}

struct QTableSimd {
  const QTable* t = nullptr;
  __m128i shift = _mm_setzero_si128();
  bool scalar = false;  // LOOKUP_SCALAR
  Fp8Simd fp8;          // t->fp8: codes computed, no table
  QTableSimd() = default;
  explicit QTableSimd(const QTable& tab)
      : t(&tab), shift(_mm_cvtsi32_si128(tab.shift)), scalar(lookup_mode() == LOOKUP_SCALAR), fp8(tab.codec) {}
};

// Four table entries L[i], i = the low and high halves of a and b, as the lanes of one vector.
D8_INLINE __m128 lookup4(const float* L, uint64_t a, uint64_t b) {
  __m128 x = _mm_load_ss(L + (uint32_t)a);
  x = _mm_insert_ps(x, _mm_load_ss(L + (a >> 32)), 0x10);
  x = _mm_insert_ps(x, _mm_load_ss(L + (uint32_t)b), 0x20);
  return _mm_insert_ps(x, _mm_load_ss(L + (b >> 32)), 0x30);
}

// L[idx] for 8 lanes with scalar loads; the indices leave the vector through two 64-bit extracts
// per half (shuffle unit and ALUs) rather than a store and 8 reloads, which would take the load
// ports the table loads need.
D8_INLINE __m256 lookup8_scalar(const float* L, __m256i idx) {
  const __m128i i0 = _mm256_castsi256_si128(idx), i1 = _mm256_extracti128_si256(idx, 1);
  const __m128 lo = lookup4(L, (uint64_t)_mm_cvtsi128_si64(i0), (uint64_t)_mm_extract_epi64(i0, 1));
  const __m128 hi = lookup4(L, (uint64_t)_mm_cvtsi128_si64(i1), (uint64_t)_mm_extract_epi64(i1, 1));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// Code of 8 normalised values in the low byte of each lane (CODEC_TABLE: the table must be fast;
// CODEC_FP8: an fp8 map).
template <int CODEC = CODEC_ANY>
D8_INLINE __m256i codes8(const float* v, __m256 recip, const QTableSimd& s) {
  if (CODEC == CODEC_FP8 || (CODEC == CODEC_ANY && s.t->fp8))  // folded when CODEC is fixed
    return fp8_codes8(_mm256_mul_ps(_mm256_loadu_ps(v), recip), s.fp8);
  const __m256i b = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(v), recip));
  // monotone key: b ^ ((b >> 31) | 0x80000000), as float_key
  const __m256i key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32((int)0x80000000u)));
  const __m256i idx = _mm256_srl_epi32(key, s.shift);
  const __m256i entry =
      s.scalar ? _mm256_castps_si256(lookup8_scalar(reinterpret_cast<const float*>(s.t->lut.data()), idx))
               : _mm256_i32gather_epi32(reinterpret_cast<const int*>(s.t->lut.data()), idx, 4);
  return _mm256_srli_epi32(_mm256_add_epi32(entry, key), 24);
}

// 32 codes: pack four vectors of one code per lane to bytes, in order.
D8_INLINE void store_codes32(__m256i a, __m256i b, __m256i c, __m256i d, uint8_t* out) {
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  // per 128-bit lane the bytes are a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, order));
}

D8_INLINE void quantize64(const float* v, float recip, const QTableSimd& s, uint8_t* out) {
  if (!s.t->simd_codes()) return quantize_n(v, 64, recip, *s.t, out);
  const __m256 r = _mm256_set1_ps(recip);
  for (int j = 0; j < 64; j += 32)
    store_codes32(codes8(v + j, r, s), codes8(v + j + 8, r, s), codes8(v + j + 16, r, s), codes8(v + j + 24, r, s),
                  out + j);
}

// The block pipeline's primitives (see the AVX-512 ones): 16 values are two 8-lane vectors.
struct Words16 {
  __m256i lo, hi;  // one code per lane
};
using MaxBits = __m256i;
using Recip = __m256;
D8_INLINE MaxBits maxbits_zero() { return _mm256_setzero_si256(); }
D8_INLINE uint32_t maxbits_reduce(MaxBits m) {
  __m128i x = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return (uint32_t)_mm_cvtsi128_si32(x);
}
D8_INLINE Recip recip_set(float r) { return _mm256_set1_ps(r); }
D8_INLINE MaxBits absmax_bits16(const float* v, MaxBits m) {
  const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
  m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(v)), mask));
  return _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(v + 8)), mask));
}
template <int CODEC = CODEC_ANY>
D8_INLINE Words16 quant_words16(const float* v, Recip recip, const QTableSimd& s) {
  return {codes8<CODEC>(v, recip, s), codes8<CODEC>(v + 8, recip, s)};
}
D8_INLINE void store_codes64(Words16 w0, Words16 w1, Words16 w2, Words16 w3, uint8_t* out) {
  store_codes32(w0.lo, w0.hi, w1.lo, w1.hi, out);
  store_codes32(w2.lo, w2.hi, w3.lo, w3.hi, out + 32);
}

D8_INLINE void dequantize64_fp8(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  const __m256 a = _mm256_set1_ps(absmax);
  const Fp8Simd f(t.codec);
  for (int j = 0; j < 64; j += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(fp8_values8(c, f), a));
  }
}

D8_INLINE void dequantize64_table(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  const __m256 a = _mm256_set1_ps(absmax);
  if (lookup_mode() == LOOKUP_SCALAR) {
    // Byte loads as indices (the codes are in L1 after the prefetch); 8 values per vector.
    const float* q = t.q;
    for (int j = 0; j < 64; j += 8) {
      const uint8_t* c = codes + j;
      __m128 lo = _mm_load_ss(q + c[0]);
      lo = _mm_insert_ps(lo, _mm_load_ss(q + c[1]), 0x10);
      lo = _mm_insert_ps(lo, _mm_load_ss(q + c[2]), 0x20);
      lo = _mm_insert_ps(lo, _mm_load_ss(q + c[3]), 0x30);
      __m128 hi = _mm_load_ss(q + c[4]);
      hi = _mm_insert_ps(hi, _mm_load_ss(q + c[5]), 0x10);
      hi = _mm_insert_ps(hi, _mm_load_ss(q + c[6]), 0x20);
      hi = _mm_insert_ps(hi, _mm_load_ss(q + c[7]), 0x30);
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1), a));
    }
    return;
  }
  for (int j = 0; j < 64; j += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(t.q, c, 4), a));
  }
}
#else  // portable
struct QTableSimd {
  const QTable* t = nullptr;
  QTableSimd() = default;
  explicit QTableSimd(const QTable& tab) : t(&tab) {}
};
D8_INLINE void quantize64(const float* v, float recip, const QTableSimd& s, uint8_t* out) {
  quantize_n(v, 64, recip, *s.t, out);
}
template <int CODEC = CODEC_ANY>
D8_INLINE void dequantize64(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  dequantize_n(codes, 64, absmax, t, out);
}
#endif

#if defined(D8_AVX512) || defined(D8_AVX2)
// Values of 64 codes times absmax (CODEC_TABLE / CODEC_FP8 as for quant_words16).
template <int CODEC = CODEC_ANY>
D8_INLINE void dequantize64(const uint8_t* codes, float absmax, const QTable& t, float* out) {
  if (CODEC == CODEC_FP8 || (CODEC == CODEC_ANY && t.fp8)) dequantize64_fp8(codes, absmax, t, out);  // folded
  else dequantize64_table(codes, absmax, t, out);
}
#endif

// Whole arrays (quantize_blockwise / dequantize_blockwise ops and partial blocks).
inline void quantize_block(const float* v, int64_t n, float recip, const QTable& t, uint8_t* out) {
  int64_t i = 0;
#if defined(D8_AVX512) || defined(D8_AVX2)
  const QTableSimd s(t);
  for (; i + 64 <= n; i += 64) quantize64(v + i, recip, s, out + i);
#endif
  quantize_n(v + i, n - i, recip, t, out + i);
}

inline void dequantize_block(const uint8_t* codes, int64_t n, float absmax, const QTable& t, float* out) {
  int64_t i = 0;
#if defined(D8_AVX512) || defined(D8_AVX2)
  for (; i + 64 <= n; i += 64) dequantize64(codes + i, absmax, t, out + i);
#endif
  dequantize_n(codes + i, n - i, absmax, t, out + i);
}

}  // namespace dist8
