// Every finite float32 master value through the kernels' own master_encode / master_decode
// (dist8_rules.h), for bf16 and fp16 parameters with 8- and 16-bit corrections. FlashOptim checks
// its error-correction code this way (test/test_ecc_invariants.py, every mantissa of every
// exponent); these are dist8's invariants, counted per format (all must be 0):
//   bound     |decode - m| <= u/2, u = 2^(E(p) - shift) (<= u where the correction saturated)
//   exact     m representable in the parameter dtype: correction 0, decode == m bit for bit
//   wider     the 16-bit correction's error <= the 8-bit one's (same parameter dtype)
//   sign      a nonzero decode has m's sign
//   finite    a finite m decodes finite
// Values beyond the parameter dtype's largest finite saturate (tested in test_master_weights.py).
// Built and run by tests/test_master_exhaustive.py: every value under pytest -m slow, every 65537th
// (argv[1]) in the default run.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "dist8_rules.h"

using namespace dist8;

struct Counts {
  std::atomic<unsigned long long> values{0}, bound{0}, exact{0}, wider{0}, sign{0}, finite{0};
};

static void check(uint64_t lo, uint64_t hi, uint64_t stride, bool half, Counts& n) {
  const MasterFormat f8 = master_format(half, 8), f16 = master_format(half, 16);
  unsigned long long values = 0, bound = 0, exact = 0, wider = 0, sign = 0, finite = 0;
  for (uint64_t b = lo; b < hi; b += stride) {
    const float m = u2f((uint32_t)b);
    if (!(std::fabs(m) <= f8.max_finite)) continue;  // NaN, inf, beyond the dtype's range
    ++values;
    double err[2];
    int k = 0;
    for (const MasterFormat* f : {&f8, &f16}) {
      int32_t c = 0;
      const uint16_t p = master_encode(m, *f, c);
      const float back = master_decode(p, c, *f);
      const double e = std::fabs((double)back - (double)m);
      const double u = std::ldexp(1.0, master_exponent(p, *f) - f->shift);
      const bool saturated = c == (int32_t)(f->q - 1.0f) || c == -(int32_t)f->q;
      bound += e > (saturated ? u : u / 2);
      const float pf = master_param_float(p, *f);
      if (f2u(pf) == (uint32_t)b) exact += c != 0 || f2u(back) != (uint32_t)b;
      sign += back != 0.0f && std::signbit(back) != std::signbit(m);
      finite += !std::isfinite(back);
      err[k++] = e;
    }
    wider += err[1] > err[0];
  }
  n.values += values;
  n.bound += bound;
  n.exact += exact;
  n.wider += wider;
  n.sign += sign;
  n.finite += finite;
}

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;  // 1: every value
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  int failed = 0;
  for (bool half : {false, true}) {
    Counts n;
    std::vector<std::thread> pool;
    const uint64_t total = 1ull << 32, chunk = total / threads;
    for (unsigned t = 0; t < threads; ++t) {
      const uint64_t lo = t * chunk, hi = t + 1 == threads ? total : lo + chunk;
      pool.emplace_back([=, &n] { check(lo, hi, stride, half, n); });
    }
    for (auto& th : pool) th.join();
    const unsigned long long bad = n.bound + n.exact + n.wider + n.sign + n.finite;
    std::printf("%s: values %llu, bound %llu, exact %llu, wider %llu, sign %llu, finite %llu\n",
                half ? "fp16" : "bf16", n.values.load(), n.bound.load(), n.exact.load(), n.wider.load(),
                n.sign.load(), n.finite.load());
    failed += bad != 0;
  }
  return failed;
}
