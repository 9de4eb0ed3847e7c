// dist8_cpu.cpp -- fused 8-bit optimizer kernels for the CPU.
//
// One pass per quantization block: dequantize the states with the old absmax
// into small fp32 buffers, apply the rule (dist8_rules.h), reduce the new
// absmax, requantize to the exact nearest code and write the parameter (or the
// update direction for LAMB/LARS). Blocks are distributed over threads with
// at::parallel_for. Bit-identical to dist8.kernels.reference.ReferenceBackend.
//
// Exact nearest code, fast: the nearest code is a monotone function of x, so it
// is determined by 255 thresholds (the smallest float with code >= k). A
// lookup table indexed by the top bits of a monotone integer key of x (sign,
// exponent and a few mantissa bits) gives the code at the start of x's bucket;
// the bucket width is chosen per qmap so that a bucket holds at most one
// threshold, so one comparison with the next threshold finishes the job. The
// thresholds are found by bisection with the reference algorithm itself, so the
// table reproduces searchsorted + the tie rule exactly. Maps for which no such
// width exists (e.g. unsorted) fall back to the per-element binary search.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dist8_rules.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>
#define D8_AVX512 1
#endif
#if defined(__F16C__) && defined(__AVX2__) && !defined(DIST8_NO_SIMD)
#include <immintrin.h>
#define D8_F16C 1
#endif

namespace dist8 {
namespace {

// ---------------------------------------------------------------------------
// Quantization tables (one per distinct qmap, cached)
// ---------------------------------------------------------------------------
struct QTable {
  alignas(64) float q[256];
  alignas(64) float thr[257 + 15];  // thr[k]: smallest float with code >= k (NaN: none)
  bool fast = false;
  int shift = 32;
  std::vector<uint8_t> lut;  // code at the start of each bucket, +4 bytes padding

  inline int code(float x) const {
    if (!fast) return nearest_code(x, q);
    if (x != x) return 255;
    const int c = lut[float_key(x) >> shift];
    return c + (x >= thr[c + 1] ? 1 : 0);
  }
};

static void build_table(QTable& t) {
  const float* q = t.q;
  bool sorted = true;
  for (int i = 0; i < 256; ++i) {
    if (q[i] != q[i]) sorted = false;
    if (i && !(q[i - 1] <= q[i])) sorted = false;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int i = 0; i < 257 + 15; ++i) t.thr[i] = nan;
  if (!sorted) return;
  const uint32_t kmin = float_key(-INFINITY), kmax = float_key(INFINITY);
  auto code_at = [&](uint32_t k) { return nearest_code(key_float(k), q); };
  const int cmin = code_at(kmin), cmax = code_at(kmax);
  // Thresholds T_k for k in (cmin, cmax]: smallest key with code >= k.
  std::vector<uint32_t> tk;  // tk[j] = key of T_{cmin + 1 + j}
  for (int k = cmin + 1; k <= cmax; ++k) {
    uint32_t lo = kmin, hi = kmax;  // code(lo) < k <= code(hi)
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (code_at(mid) >= k) hi = mid;
      else lo = mid;
    }
    tk.push_back(hi);
  }
  // Verify monotonicity at the thresholds (cheap sanity check).
  for (size_t j = 0; j < tk.size(); ++j)
    if (code_at(tk[j]) < cmin + 1 + (int)j || code_at(tk[j] - 1) >= cmin + 1 + (int)j) return;
  int bits = -1;
  for (int b = 8; b <= 20; ++b) {
    const int s = 32 - b;
    bool ok = true;
    for (size_t j = 1; j < tk.size() && ok; ++j) ok = (tk[j] >> s) != (tk[j - 1] >> s);
    if (ok) {
      bits = b;
      break;
    }
  }
  if (bits < 0) return;
  t.shift = 32 - bits;
  const size_t nb = size_t(1) << bits;
  t.lut.assign(nb + 4, 255);
  size_t j = 0;
  for (size_t b = 0; b < nb; ++b) {
    const uint64_t start = uint64_t(b) << t.shift;
    const uint64_t end = ((uint64_t(b) + 1) << t.shift) - 1;
    if (end < kmin || start > kmax) continue;  // only NaN keys
    const uint32_t ks = (uint32_t)std::max<uint64_t>(start, kmin);
    while (j < tk.size() && tk[j] <= ks) ++j;
    t.lut[b] = (uint8_t)(cmin + (int)j);
  }
  for (size_t jj = 0; jj < tk.size(); ++jj) t.thr[cmin + 1 + jj] = key_float(tk[jj]);
  // Thresholds at or below cmin are never consulted (lut >= cmin).
  t.fast = true;
}

static const QTable* get_table(const at::Tensor& qmap) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<QTable>> cache;
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256, "dist8: qmap must be float32[256]");
  at::Tensor qc = qmap.contiguous();
  std::string key(reinterpret_cast<const char*>(qc.data_ptr<float>()), 256 * sizeof(float));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  auto t = std::make_unique<QTable>();
  memcpy(t->q, key.data(), sizeof(t->q));
  build_table(*t);
  const QTable* out = t.get();
  if (cache.size() > 64) cache.clear();  // pathological: many distinct maps
  cache.emplace(std::move(key), std::move(t));
  return out;
}

// ---------------------------------------------------------------------------
// Block primitives
// ---------------------------------------------------------------------------
static inline float block_absmax(const float* v, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = abs_bits(v[i]);
    m = b > m ? b : m;
  }
  return absmax_from_bits(m);
}

static void quantize_block(const float* v, int64_t n, float scale, const QTable& t, uint8_t* out) {
#ifdef D8_AVX512
  if (t.fast) {
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512i signbit = _mm512_set1_epi32((int)0x80000000u);
    const __m512i ff = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1), c255 = _mm512_set1_epi32(255);
    const __m128i sh = _mm_cvtsi32_si128(t.shift);
    const void* lut = t.lut.data();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
      const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(m, v + i), vs);
      const __m512i b = _mm512_castps_si512(x);
      const __m512i key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), signbit));
      const __m512i idx = _mm512_srl_epi32(key, sh);
      __m512i c = _mm512_and_si512(_mm512_i32gather_epi32(idx, lut, 1), ff);
      const __m512 th = _mm512_i32gather_ps(_mm512_add_epi32(c, one), t.thr, 4);
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(x, th, _CMP_GE_OQ), c, one);
      c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), c255);
      _mm512_mask_cvtepi32_storeu_epi8(out + i, m, c);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = (uint8_t)t.code(fdiv(v[i], scale));
}

static void dequantize_block(const uint8_t* codes, int64_t n, float absmax, const QTable& t, float* out) {
#ifdef D8_AVX512
  const __m512 va = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + i));
    const __m512 qv = _mm512_i32gather_ps(c, t.q, 4);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(qv, va));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = fmul(t.q[codes[i]], absmax);
#endif
}

// Quantize the block state `v` in place of codes/absmax (new absmax from v).
static inline void requantize(const float* v, int64_t n, const QTable& t, uint8_t* codes, float* absmax) {
  const float am = block_absmax(v, n);
  *absmax = am;
  quantize_block(v, n, block_scale(am), t, codes);
}

// ---- dtype conversions -------------------------------------------------------
static void load_f32(const void* src, at::ScalarType st, int64_t off, int64_t n, float* dst) {
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

static void store_from_f32(const float* src, int64_t n, void* dst, at::ScalarType st, int64_t off) {
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

// ---- rule loops over one block (vectorised; `out` may alias `p`) -----------
// `omp simd`: element i only reads and writes index i, so the loops are safe to
// vectorise even when out == p (in-place fp32 param); without it the compiler's
// runtime alias check would send the in-place case down the scalar loop.
#if defined(_OPENMP)
#define D8_SIMD_LOOP _Pragma("omp simd")
#else
#define D8_SIMD_LOOP _Pragma("GCC ivdep")
#endif
template <bool IS_LAMB>
static void loop_adam(const float* p, const float* g, float* m, float* v, float* out, int64_t n, const Scalars& cs) {
  const Scalars c = cs;
D8_SIMD_LOOP
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i];
    out[i] = rule_adam<IS_LAMB>(p[i], g[i], mi, vi, c);
    m[i] = mi;
    v[i] = vi;
  }
}

template <bool IS_LARS, int FLAGS>
static void loop_momentum(const float* p, const float* g, float* m, float* out, int64_t n, const Scalars& cs) {
  const Scalars c = cs;
D8_SIMD_LOOP
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i];
    out[i] = rule_momentum<IS_LARS>(p[i], g[i], mi, c, FLAGS);
    m[i] = mi;
  }
}

template <bool IS_LARS>
static void loop_momentum_flags(const float* p, const float* g, float* m, float* out, int64_t n, const Scalars& c,
                                int flags) {
  switch (flags & 3) {
    case 0: return loop_momentum<IS_LARS, 0>(p, g, m, out, n, c);
    case 1: return loop_momentum<IS_LARS, 1>(p, g, m, out, n, c);
    case 2: return loop_momentum<IS_LARS, 2>(p, g, m, out, n, c);
    default: return loop_momentum<IS_LARS, 3>(p, g, m, out, n, c);
  }
}

static void loop_rmsprop(const float* p, const float* g, float* v, float* out, int64_t n, const Scalars& cs) {
  const Scalars c = cs;
D8_SIMD_LOOP
  for (int64_t i = 0; i < n; ++i) {
    float vi = v[i];
    out[i] = rule_rmsprop(p[i], g[i], vi, c);
    v[i] = vi;
  }
}

static void loop_adagrad(const float* p, const float* g, float* s, float* out, int64_t n, const Scalars& cs) {
  const Scalars c = cs;
D8_SIMD_LOOP
  for (int64_t i = 0; i < n; ++i) {
    float si = s[i];
    out[i] = rule_adagrad(p[i], g[i], si, c);
    s[i] = si;
  }
}

static void loop_lion(const float* p, const float* g, float* m, float* out, int64_t n, const Scalars& cs) {
  const Scalars c = cs;
D8_SIMD_LOOP
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i];
    out[i] = rule_lion(p[i], g[i], mi, c);
    m[i] = mi;
  }
}

static void run_rule(int rule, int flags, const Scalars& c, const float* p, const float* g, float* s1, float* s2,
                     float* out, int64_t n) {
  switch (rule) {
    case ADAM: return loop_adam<false>(p, g, s1, s2, out, n, c);
    case LAMB: return loop_adam<true>(p, g, s1, s2, out, n, c);
    case SGD: return loop_momentum_flags<false>(p, g, s1, out, n, c, flags);
    case LARS: return loop_momentum_flags<true>(p, g, s1, out, n, c, flags);
    case RMSPROP: return loop_rmsprop(p, g, s1, out, n, c);
    case ADAGRAD: return loop_adagrad(p, g, s1, out, n, c);
    case LION: return loop_lion(p, g, s1, out, n, c);
    default: TORCH_CHECK(false, "dist8: unknown rule ", rule);
  }
}

static bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

static int64_t grain_blocks(int64_t block_size) { return std::max<int64_t>(1, 32768 / block_size); }

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
void fused_update_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                      const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                      const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                      int64_t flags, int64_t block_size, const at::Tensor& update_out) {
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES, "dist8: unknown rule ", rule);
  TORCH_CHECK(scalars.size() == NUM_SCALARS, "dist8: expected ", NUM_SCALARS, " scalars, got ", scalars.size());
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
  const int nstates = rule_num_states((int)rule);
  const int64_t n = param.numel();
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "dist8: param/grad must be contiguous");
  TORCH_CHECK(grad.numel() == n, "dist8: grad size mismatch");
  TORCH_CHECK(is_supported_float(param.scalar_type()) && is_supported_float(grad.scalar_type()),
              "dist8: param/grad must be float32, bfloat16 or float16");
  const bool writes_update = update_out.defined() && update_out.numel() > 0;
  const at::Tensor& out_t = writes_update ? update_out : param;
  TORCH_CHECK(out_t.is_contiguous() && out_t.numel() == n && is_supported_float(out_t.scalar_type()),
              "dist8: bad update_out");

  Scalars c;
  float* cf = reinterpret_cast<float*>(&c);
  for (int i = 0; i < NUM_SCALARS; ++i) cf[i] = static_cast<float>(scalars[i]);

  struct StateArg {
    bool q8 = false;
    uint8_t* codes = nullptr;
    float* f32 = nullptr;
    float* absmax = nullptr;
    const QTable* table = nullptr;
  } st[2];
  const at::Tensor* states[2] = {&state1, &state2};
  const at::Tensor* absmaxes[2] = {&absmax1, &absmax2};
  const at::Tensor* qmaps[2] = {&qmap1, &qmap2};
  const int64_t nblocks = (n + block_size - 1) / block_size;
  for (int s = 0; s < nstates; ++s) {
    const at::Tensor& S = *states[s];
    TORCH_CHECK(S.is_contiguous() && S.numel() == n, "dist8: state", s + 1, " must be contiguous with ", n,
                " elements");
    const at::Tensor& A = *absmaxes[s];
    if (A.defined() && A.numel() > 0) {
      TORCH_CHECK(S.scalar_type() == at::kByte, "dist8: 8-bit state", s + 1, " must be uint8");
      TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.numel() == nblocks,
                  "dist8: absmax", s + 1, " must be float32 with ", nblocks, " entries");
      st[s].q8 = true;
      st[s].codes = S.data_ptr<uint8_t>();
      st[s].absmax = A.data_ptr<float>();
      st[s].table = get_table(*qmaps[s]);
    } else {
      TORCH_CHECK(S.scalar_type() == at::kFloat, "dist8: 32-bit state", s + 1, " must be float32");
      st[s].f32 = S.data_ptr<float>();
    }
  }
  if (n == 0) return;

  const at::ScalarType pt = param.scalar_type(), gt = grad.scalar_type(), ot = out_t.scalar_type();
  void* pptr = param.data_ptr();
  const void* gptr = grad.data_ptr();
  void* optr = out_t.data_ptr();
  const int r = (int)rule, fl = (int)flags;

  at::parallel_for(0, nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(5 * block_size + 64);
    float* pbuf = buf.data();
    float* gbuf = pbuf + block_size;
    float* obuf = gbuf + block_size;
    float* sbuf[2] = {obuf + block_size, obuf + 2 * block_size};
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t off = blk * block_size;
      const int64_t len = std::min(block_size, n - off);
      float* P;
      if (pt == at::kFloat) P = static_cast<float*>(pptr) + off;
      else { load_f32(pptr, pt, off, len, pbuf); P = pbuf; }
      const float* G;
      if (gt == at::kFloat) G = static_cast<const float*>(gptr) + off;
      else { load_f32(gptr, gt, off, len, gbuf); G = gbuf; }
      float* S[2] = {nullptr, nullptr};
      for (int s = 0; s < nstates; ++s) {
        if (st[s].q8) {
          dequantize_block(st[s].codes + off, len, st[s].absmax[blk], *st[s].table, sbuf[s]);
          S[s] = sbuf[s];
        } else {
          S[s] = st[s].f32 + off;
        }
      }
      float* O;
      if (ot == at::kFloat) O = static_cast<float*>(optr) + off;
      else if (!writes_update) O = P;  // param buffer, converted back below
      else O = obuf;
      run_rule(r, fl, c, P, G, S[0], S[1], O, len);
      if (ot != at::kFloat) store_from_f32(O, len, optr, ot, off);
      for (int s = 0; s < nstates; ++s)
        if (st[s].q8) requantize(S[s], len, *st[s].table, st[s].codes + off, st[s].absmax + blk);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& qmap,
                                                          int64_t block_size) {
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
  TORCH_CHECK(is_supported_float(x.scalar_type()), "dist8: x must be float32, bfloat16 or float16");
  at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const int64_t nblocks = (n + block_size - 1) / block_size;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  const QTable* t = get_table(qmap);
  const void* xp = xc.data_ptr();
  const at::ScalarType xt = xc.scalar_type();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(block_size);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t off = blk * block_size, len = std::min(block_size, n - off);
      const float* v;
      if (xt == at::kFloat) v = static_cast<const float*>(xp) + off;
      else { load_f32(xp, xt, off, len, buf.data()); v = buf.data(); }
      requantize(v, len, *t, cp + off, ap + blk);
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                    int64_t block_size) {
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dist8: codes must be uint8");
  at::Tensor cc = codes.contiguous();
  at::Tensor ac = absmax.contiguous();
  const int64_t n = cc.numel();
  const int64_t nblocks = (n + block_size - 1) / block_size;
  TORCH_CHECK(ac.scalar_type() == at::kFloat && ac.numel() == nblocks, "dist8: absmax must be float32 with ",
              nblocks, " entries");
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const QTable* t = get_table(qmap);
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const float* ap = ac.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t off = blk * block_size, len = std::min(block_size, n - off);
      dequantize_block(cp + off, len, ap[blk], *t, op + off);
    }
  });
  return out;
}

bool all_finite_cpu(const at::Tensor& x) {
  if (!at::isFloatingType(x.scalar_type())) return true;
  if (!is_supported_float(x.scalar_type())) return at::isfinite(x).all().item<bool>();
  at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const at::ScalarType t = xc.scalar_type();
  const void* p = xc.data_ptr();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    bool found = false;
    if (t == at::kFloat) {
      const uint32_t* u = static_cast<const uint32_t*>(p);
      uint32_t acc = 0;
      for (int64_t i = i0; i < i1; ++i) acc |= ((u[i] & 0x7F800000u) == 0x7F800000u);
      found = acc != 0;
    } else {
      const uint16_t* u = static_cast<const uint16_t*>(p);
      const uint16_t e = (t == at::kHalf) ? 0x7C00 : 0x7F80;
      uint32_t acc = 0;
      for (int64_t i = i0; i < i1; ++i) acc |= ((u[i] & e) == e);
      found = acc != 0;
    }
    if (found) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

}  // namespace
}  // namespace dist8

TORCH_LIBRARY_IMPL(dist8, CPU, m) {
  m.impl("fused_update_", &dist8::fused_update_cpu);
  m.impl("quantize_blockwise", &dist8::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dist8::dequantize_blockwise_cpu);
  m.impl("all_finite", &dist8::all_finite_cpu);
}
