// update_cpu.h -- one fused update call as the CPU ops hand it to the block loops.
//
// The ops (dist8_cpu.cpp) validate their tensors into an Update and pick the
// block loop of the rule; the block loops (blocks_cpu.h) are compiled in
// blocks_*_cpu.cpp, a few rules per file, so that the build's translation units
// compile side by side (one file held every rule's loops: ~80 s of one core).
// Needs only c10's dtype headers, not ATen.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "dist8_rules.h"
#include "quant_cpu.h"

#if defined(__F16C__) && defined(__AVX2__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>
#define D8_F16C 1
#endif

// `omp simd`: element i only reads and writes index i, so the loop is safe to
// vectorise even when out == p (in-place fp32 param); without it the compiler's
// runtime alias check would send the in-place case down the scalar loop.
#if defined(_OPENMP)
#define D8_SIMD_LOOP _Pragma("omp simd")
#else
#define D8_SIMD_LOOP _Pragma("GCC ivdep")
#endif

namespace dist8 {

constexpr int64_t CHUNK = 64;     // values per step of the block loop (block sizes are multiples)
constexpr int64_t PREFETCH = 2;   // blocks ahead to prefetch param, grad and codes

// ---- dtype conversions -------------------------------------------------------
inline void load_f32(const void* src, at::ScalarType st, int64_t off, int64_t n, float* dst) {
  if (st == at::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
  } else if (st == at::kHalf) {
    const c10::Half* s = static_cast<const c10::Half*>(src) + off;
    int64_t i = 0;
#ifdef D8_F16C
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  } else {
    memcpy(dst, static_cast<const float*>(src) + off, n * sizeof(float));
  }
}

inline void store_from_f32(const float* src, int64_t n, void* dst, at::ScalarType st, int64_t off) {
  if (st == at::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
  } else if (st == at::kHalf) {
    c10::Half* d = static_cast<c10::Half*>(dst) + off;
    int64_t i = 0;
#ifdef D8_F16C
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) d[i] = c10::Half(src[i]);
  } else {
    memcpy(static_cast<float*>(dst) + off, src, n * sizeof(float));
  }
}

// ---- one call's arguments ------------------------------------------------------
struct StateArg {
  bool q8 = false;
  bool floored = false;   // read back with the floor (second-moment-like 8-bit state)
  float floor_frac = 0.f;
  uint8_t* codes = nullptr;
  float* f32 = nullptr;
  float* absmax = nullptr;
  const QTable* table = nullptr;
};

struct Update {
  int64_t n = 0, block_size = 0;
  int nstates = 0;
  StateArg st[MAX_STATES];
  Scalars c;
  void* param = nullptr;
  const void* grad = nullptr;
  void* out = nullptr;  // param, or update_out for LAMB/LARS
  at::ScalarType pt = at::kFloat, gt = at::kFloat, ot = at::kFloat;
  bool writes_update = false;
  int64_t* skipped = nullptr;  // += blocks not committed (non-finite new state or output), if set
  void* corr = nullptr;  // master-weight correction (int8 or int16), or none
  int corr_bits = 0;     // 8, 16, or 0: no correction
  MasterFormat mf{};
};

// The block loop of rule R (FL: its compile-time flags) over blocks [b0, b1) of one tensor;
// defined in blocks_cpu.h, instantiated in blocks_*_cpu.cpp.
template <int R, int FL>
void run_blocks(const Update& u, int64_t b0, int64_t b1);
using BlocksFn = void (*)(const Update&, int64_t, int64_t);

}  // namespace dist8
