// Every float32 bit pattern through the fp8 codec (scalar and AVX2) against the map's exact
// nearest code (dist8_rules.h nearest_code on the map the codec decodes to), both maps.
// Built and run by tests/test_fp8_exhaustive.py (pytest -m slow); prints the mismatch counts.
#include <cstdio>
#include <thread>
#include <vector>

#include "quant_cpu.h"

using namespace dist8;

int main() {
  const unsigned nthreads = std::max(1u, std::thread::hardware_concurrency());
  int failed = 0;
  for (bool is_signed : {true, false}) {
    const Fp8Codec c = Fp8Codec::make(is_signed);
    float q[256];
    for (int i = 0; i < 256; ++i) q[i] = c.decode((uint8_t)i);
    std::vector<uint64_t> bad_scalar(nthreads), bad_simd(nthreads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < nthreads; ++t)
      pool.emplace_back([&, t] {
#ifdef D8_AVX2
        const Fp8Simd f(c);
        alignas(32) float y[8];
        alignas(32) int32_t out[8];
#endif
        const uint64_t span = (1ull << 32) / nthreads, lo = t * span, hi = t + 1 == nthreads ? (1ull << 32) : lo + span;
        uint64_t bs = 0, bv = 0;  // local: per-thread slots of one vector share cache lines
        for (uint64_t u = lo; u < hi; u += 8) {
#ifdef D8_AVX2
          for (int j = 0; j < 8; ++j) y[j] = u2f((uint32_t)(u + j));
          _mm256_store_si256(reinterpret_cast<__m256i*>(out), fp8_codes8(_mm256_load_ps(y), f));
#endif
          for (int j = 0; j < 8 && u + j < hi; ++j) {
            const float x = u2f((uint32_t)(u + j));
            const int want = nearest_code(x, q);
            bs += c.encode(x) != want;
#ifdef D8_AVX2
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
    printf("%s map: scalar mismatches %llu, avx2 mismatches %llu\n", is_signed ? "signed" : "unsigned",
           (unsigned long long)bs, (unsigned long long)bv);
    failed |= bs != 0 || bv != 0;
  }
#ifndef D8_AVX2
  printf("built without AVX2: the vector codec was not checked\n");
#endif
  return failed;
}
