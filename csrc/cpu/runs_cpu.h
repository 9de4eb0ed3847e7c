// runs_cpu.h -- exact codes of a map made of a few linear runs, computed instead of looked up
// (the AVX-512 path; the dynamic tree map is 9 runs unsigned, 8 per sign signed).
//
// A run is a stretch of codes lo..hi whose values are equally spaced (step d): in a run the
// nearest code is about lo + (y - (q[lo] - d/2)) / d, so a code is one fused multiply-add and
// a floor once the run is known. The run of y comes from its float exponent: a 32-entry table
// gives the run at the start of each octave 2^-31..2^0 and the one run boundary (an exact
// switch point of the map) inside that octave, if any, and one compare settles it. The guess is
// computed in fixed point, T = floor(fma(|y|, A, B)) with A, B scaled by 2^16, so the code is
// T >> 16; where T lies within `guard` of a multiple of 2^16 (y near a switch point), or y is
// NaN, the lane is marked and the caller takes the key table's exact code for it instead (a few
// lanes in a thousand). Negative values mirror the non-negative side (signed maps: code
// 2z - c, z the code of 0, at least 0) or take code 0 (maps without negative values).
//
// Why the guess is exact wherever it is not marked: within a run T is a monotone function of y
// (fma, floor and the clamp are monotone), and so is the exact code. make() checks, at the two
// keys on either side of every switch point of the run, that T is already past the switch's
// guard band going up and not yet past it going down; between two switch points T then stays
// inside one code's unmarked band or in a marked one. The mirror and the run choice are checked
// the same way at every switch point of both sides. A map that fails any check (or needs more
// than 16 runs or two boundaries in an octave) keeps the key table. tests/test_run_codes.py puts
// all 2^32 float32 inputs through this path and the key table.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dist8_rules.h"

namespace dist8 {

struct RunCodec {
  static constexpr int FRAC_BITS = 16;   // fixed-point fraction bits of T
  static constexpr int MAX_RUNS = 16;    // one zmm of run parameters
  static constexpr int OCTAVE_LO = 96;   // float exponent field of the first octave entry (2^-31)
  bool ok = false;
  int zero_code = 0;      // code of 0.0
  bool mirrored = false;  // negative y: max(2 * zero_code - code(|y|), 0); else code 0
  int guard = 0;          // marked: T within guard of a multiple of 2^FRAC_BITS
  int nruns = 0;
  alignas(64) float A[MAX_RUNS] = {};   // 2^16 / step
  alignas(64) float B[MAX_RUNS] = {};   // 2^16 * (lo + 0.5 - q[lo] / step)
  alignas(64) int32_t hi[MAX_RUNS] = {};  // last code of the run
  alignas(64) int32_t run_at[32] = {};    // run at the start of octave i (exponent OCTAVE_LO + i)
  alignas(64) float next_start[32] = {};  // the run boundary inside octave i (2 when none)

  static inline int octave_of(float ay) {
    return std::max((int)(f2u(ay) >> 23), OCTAVE_LO) - OCTAVE_LO;
  }

  // Fixed-point guess for |y| <= 1 (run r), as the vector path computes it.
  inline int32_t fixed(float ay, int r) const { return (int32_t)std::floor(std::fmaf(ay, A[r], B[r])); }
  inline int run_of(float ay) const {
    const int i = octave_of(ay);
    return run_at[i] + (ay >= next_start[i] ? 1 : 0);
  }

  // A codec for the map q (sorted, finite), whose exact codes switch at the keys thr[1..255]
  // (thr[k]: the smallest key with code >= k) and are given by exact(); ok says whether it is exact.
  template <typename Exact>
  static RunCodec make(const float* q, const std::vector<uint32_t>& thr, Exact exact) {
    RunCodec c;
    int z = -1;
    for (int i = 0; i < 256; ++i)
      if (f2u(q[i]) == 0u) z = i;  // +0.0 exactly
    if (z < 0 || q[255] != 1.0f) return c;
    c.zero_code = z;
    c.mirrored = z > 0;
    // Runs over the codes z..255, greedily: extend while the step stays the run's first step.
    std::vector<int> lo;
    for (int j = z; j < 256;) {
      if (c.nruns == MAX_RUNS) return c;
      int k = j;
      const int r = c.nruns++;
      if (j < 255) {
        const double d = (double)q[j + 1] - q[j];
        k = j + 1;
        while (k < 255 && std::fabs(((double)q[k + 1] - q[k]) - d) <= 1e-3 * d) ++k;
        c.A[r] = (float)std::ldexp(1.0 / d, FRAC_BITS);
        c.B[r] = (float)std::ldexp(j + 0.5 - q[j] / d, FRAC_BITS);
      } else {
        c.A[r] = 0.f;  // one code: T is its centre
        c.B[r] = (float)std::ldexp(j + 0.5, FRAC_BITS);
      }
      c.hi[r] = k;
      lo.push_back(j);
      j = k + 1;
    }
    for (int r = c.nruns; r < MAX_RUNS; ++r) c.hi[r] = 255;
    // Run boundaries (exact switch points, as floats) and the octave tables.
    std::vector<float> bound;
    for (int r = 1; r < c.nruns; ++r) bound.push_back(key_float(thr[lo[r]]));
    for (int i = 0; i < 32; ++i) {
      const float start = i == 0 ? 0.f : std::ldexp(1.f, OCTAVE_LO + i - 127);
      const float end = std::ldexp(1.f, OCTAVE_LO + i + 1 - 127);
      int before = 0, inside = 0;
      float next = 2.f;
      for (float b : bound) {
        if (b <= start) ++before;
        else if (b < end) ++inside, next = b;
      }
      if (inside > 1) return c;
      c.run_at[i] = before;
      c.next_start[i] = next;
    }
    // The run choice at both sides of every boundary and octave start.
    for (int r = 1; r < c.nruns; ++r) {
      const uint32_t k = thr[lo[r]];
      if (c.run_of(key_float(k)) != r || c.run_of(key_float(k - 1)) != r - 1) return c;
    }
    for (int i = 1; i < 32; ++i) {
      const float start = std::ldexp(1.f, OCTAVE_LO + i - 127);
      const float below = key_float(float_key(start) - 1);
      if (c.run_of(start) != (int)(std::upper_bound(bound.begin(), bound.end(), start) - bound.begin()) ||
          c.run_of(below) != (int)(std::upper_bound(bound.begin(), bound.end(), below) - bound.begin()))
        return c;
    }
    // The smallest guard band for which every switch point inside every run is safe.
    for (int g = 1; g <= 1 << (FRAC_BITS - 4) && !c.ok; g *= 2) {
      c.guard = g;
      bool safe = true;
      for (int r = 0; r < c.nruns && safe; ++r) {
        // from the run's first key on, the guess is past lo's band (no lower clamp: only hi's min)
        const float first = r == 0 ? 0.f : key_float(thr[lo[r]]);
        safe = c.fixed(first, r) >= (lo[r] << FRAC_BITS) - g;
        for (int k = lo[r] + 1; k <= c.hi[r] && safe; ++k) {
          const float at = key_float(thr[k]), below = key_float(thr[k] - 1);
          safe = c.fixed(at, r) >= (k << FRAC_BITS) - g && c.fixed(below, r) < (k << FRAC_BITS) + g;
        }
      }
      c.ok = safe;
    }
    if (!c.ok) return c;
    // Outside the runs' own switch points: |y| > 1 takes 1's code, and negative values mirror
    // (or take code 0). Both sides are monotone step functions of y, so agreeing on both sides
    // of every switch point of either side, and at the ends, is agreeing everywhere.
    auto mirror = [&](int code) { return c.mirrored ? std::max(2 * z - code, 0) : 0; };
    bool same = exact(1.0f) == 255 && exact(2.0f) == 255 && exact(INFINITY) == 255;
    for (int k = 1; k < 256 && same; ++k)
      for (const uint32_t key : {thr[k], thr[k] - 1}) {
        const float a = std::fabs(key_float(key));
        same = same && exact(-a) == mirror(exact(a));
      }
    for (float a : {0.0f, 1.0f, 2.0f, INFINITY}) same = same && exact(-a) == mirror(exact(a));
    c.ok = same;
    return c;
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>

struct RunSimd {
  __m512 A, B, start0, start1;
  __m512i hi, run0, run1, guard, band, zero2;
  bool mirrored = false;
  RunSimd() = default;
  explicit RunSimd(const RunCodec& c)
      : A(_mm512_load_ps(c.A)),
        B(_mm512_load_ps(c.B)),
        start0(_mm512_load_ps(c.next_start)),
        start1(_mm512_load_ps(c.next_start + 16)),
        hi(_mm512_load_si512(c.hi)),
        run0(_mm512_load_si512(c.run_at)),
        run1(_mm512_load_si512(c.run_at + 16)),
        guard(_mm512_set1_epi32(c.guard)),
        band(_mm512_set1_epi32((int)(((1u << RunCodec::FRAC_BITS) - 1) & ~(2u * c.guard - 1)))),
        zero2(_mm512_set1_epi32(2 * c.zero_code)),
        mirrored(c.mirrored) {}
};

// Codes (one per lane) of 16 normalised values; `slow` marks the lanes whose code must be looked up.
// FINITE: the caller keeps no code of a non-finite value (the block pipeline commits only finite
// blocks), so NaN lanes need no mark -- the compare and mask merge measured ~18% of this function.
template <bool FINITE = false>
inline __attribute__((always_inline)) __m512i run_codes16(__m512 y, const RunSimd& s, __mmask16& slow) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // |y| for signed maps (negatives mirrored below); max(y, +0) for maps without negative values,
  // whose negative inputs take code 0, 0's code. Clamped to 1 (beyond it: 1's code); NaN -> 1.
  const __m512 ay = s.mirrored ? _mm512_min_ps(_mm512_abs_ps(y), one) : _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), one);
  const __m512i oct = _mm512_max_epi32(_mm512_srli_epi32(_mm512_castps_si512(ay), 23),
                                       _mm512_set1_epi32(RunCodec::OCTAVE_LO));  // low 5 bits index
  __m512i run = _mm512_permutex2var_epi32(s.run0, oct, s.run1);
  const __mmask16 past = _mm512_cmp_ps_mask(ay, _mm512_permutex2var_ps(s.start0, oct, s.start1), _CMP_GE_OQ);
  run = _mm512_mask_add_epi32(run, past, run, _mm512_set1_epi32(1));
  // Rounding given explicitly (not MXCSR's): the proof in make() assumed round-to-nearest fma, floor.
  const __m512i T = _mm512_cvt_roundps_epi32(
      _mm512_fmadd_round_ps(ay, _mm512_permutexvar_ps(run, s.A), _mm512_permutexvar_ps(run, s.B),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  slow = _mm512_testn_epi32_mask(_mm512_add_epi32(T, s.guard), s.band);
  if (!FINITE) slow |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  const __m512i c = _mm512_min_epi32(_mm512_srai_epi32(T, RunCodec::FRAC_BITS), _mm512_permutexvar_epi32(run, s.hi));
  if (!s.mirrored) return c;
  const __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(y));
  return _mm512_max_epi32(_mm512_mask_sub_epi32(c, neg, s.zero2, c), _mm512_setzero_si512());
}
#endif

}  // namespace dist8
