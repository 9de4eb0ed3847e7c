// Every float32 bit pattern through the fp8 codec (scalar, and the vector path this file is
// compiled for: AVX2 or AVX-512) against the map's exact nearest code (dist8_rules.h nearest_code
// on the map the codec decodes to), both maps; and every code through the vector decoder.
// Built and run by tests/test_fp8_exhaustive.py (pytest -m slow) once per vector path the CPU
// has; prints the path and the mismatch counts.
#include <cstdio>
#include <thread>
#include <vector>

#include "quant_cpu.h"

using namespace dist8;

#if defined(D8_AVX512)
constexpr int LANES = 16;
static const char* PATH = "avx512";
static void vector_codes(const float* y, const Fp8Simd& f, int32_t* out) {
  _mm512_storeu_si512(out, fp8_codes16(_mm512_loadu_ps(y), f));
}
static void vector_values(const int32_t* c, const Fp8Simd& f, float* out) {
  _mm512_storeu_ps(out, fp8_values16(_mm512_loadu_si512(c), f));
}
#elif defined(D8_AVX2)
constexpr int LANES = 8;
static const char* PATH = "avx2";
static void vector_codes(const float* y, const Fp8Simd& f, int32_t* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), fp8_codes8(_mm256_loadu_ps(y), f));
}
static void vector_values(const int32_t* c, const Fp8Simd& f, float* out) {
  _mm256_storeu_ps(out, fp8_values8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), f));
}
#else
constexpr int LANES = 8;
static const char* PATH = "none";
#endif

int main() {
  const unsigned nthreads = std::max(1u, std::thread::hardware_concurrency());
  int failed = 0;
  for (bool is_signed : {true, false}) {
    const Fp8Codec c = Fp8Codec::make(is_signed);
    float q[256];
    for (int i = 0; i < 256; ++i) q[i] = c.decode((uint8_t)i);
    uint64_t bad_values = 0;
#if defined(D8_AVX512) || defined(D8_AVX2)
    {
      const Fp8Simd f(c);
      for (int i = 0; i < 256; i += LANES) {
        int32_t codes[LANES];
        float values[LANES];
        for (int j = 0; j < LANES; ++j) codes[j] = i + j;
        vector_values(codes, f, values);
        for (int j = 0; j < LANES; ++j) bad_values += f2u(values[j]) != f2u(q[i + j]);
      }
    }
#endif
    std::vector<uint64_t> bad_scalar(nthreads), bad_simd(nthreads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < nthreads; ++t)
      pool.emplace_back([&, t] {
#if defined(D8_AVX512) || defined(D8_AVX2)
        const Fp8Simd f(c);
        float y[LANES];
        int32_t out[LANES];
#endif
        const uint64_t span = (1ull << 32) / nthreads, lo = t * span, hi = t + 1 == nthreads ? (1ull << 32) : lo + span;
        uint64_t bs = 0, bv = 0;  // local: per-thread slots of one vector share cache lines
        for (uint64_t u = lo; u < hi; u += LANES) {
#if defined(D8_AVX512) || defined(D8_AVX2)
          for (int j = 0; j < LANES; ++j) y[j] = u2f((uint32_t)(u + j));
          vector_codes(y, f, out);
#endif
          for (int j = 0; j < LANES && u + j < hi; ++j) {
            const float x = u2f((uint32_t)(u + j));
            const int want = nearest_code(x, q);
            bs += c.encode(x) != want;
#if defined(D8_AVX512) || defined(D8_AVX2)
            bv += out[j] != want;
#endif
          }
        }
        bad_scalar[t] = bs;
        bad_simd[t] = bv;
      });
    for (auto& th : pool) th.join();
    uint64_t bs = 0, bv = 0;
    for (unsigned t = 0; t < nthreads; ++t) bs += bad_scalar[t], bv += bad_simd[t];
    printf("%s map: scalar mismatches %llu, %s mismatches %llu, %s value mismatches %llu\n",
           is_signed ? "signed" : "unsigned", (unsigned long long)bs, PATH, (unsigned long long)bv, PATH,
           (unsigned long long)bad_values);
    failed |= bs != 0 || bv != 0 || bad_values != 0;
  }
#if !defined(D8_AVX512) && !defined(D8_AVX2)
  printf("built without AVX2 or AVX-512: the vector codec was not checked\n");
#endif
  return failed;
}
