// dist8_cpu.cpp -- the CPU ops of the fused 8-bit optimizer kernels.
//
// Validates each op's tensors, gathers them into an Update (update_cpu.h) and
// splits the blocks over threads with at::parallel_for; the per-block work (the
// fused dequantize / rule / requantize loop) is blocks_cpu.h, compiled in
// blocks_*_cpu.cpp. Also the blockwise quantize/dequantize ops, the finite
// checks and LAMB/LARS's trust step. Bit-identical to
// dist8.kernels.reference.ReferenceBackend.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "update_cpu.h"

namespace dist8 {
namespace {

// One table per distinct qmap, built on first use and cached.
const QTable* get_table(const at::Tensor& qmap) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<QTable>> cache;
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256, "dist8: qmap must be float32[256]");
  at::Tensor qc = qmap.contiguous();
  std::string key(reinterpret_cast<const char*>(qc.data_ptr<float>()), 256 * sizeof(float));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  auto t = std::make_unique<QTable>();
  build_qtable(*t, reinterpret_cast<const float*>(key.data()));
  const QTable* out = t.get();
  if (cache.size() > 64) cache.clear();  // pathological: many distinct maps
  cache.emplace(std::move(key), std::move(t));
  return out;
}


template <int R>
BlocksFn with_flags(int flags) {  // momentum rules: first-step and Nesterov flags are compile-time
  switch (flags & 3) {
    case 0: return &run_blocks<R, 0>;
    case 1: return &run_blocks<R, 1>;
    case 2: return &run_blocks<R, 2>;
    default: return &run_blocks<R, 3>;
  }
}

BlocksFn pick_blocks_fn(int rule, int flags) {
  switch (rule) {
    case ADAM: return &run_blocks<ADAM, 0>;
    case LAMB: return &run_blocks<LAMB, 0>;
    case RMSPROP: return &run_blocks<RMSPROP, 0>;
    case ADAGRAD: return &run_blocks<ADAGRAD, 0>;
    case LION: return &run_blocks<LION, 0>;
    case ADEMAMIX: return &run_blocks<ADEMAMIX, 0>;
    case RMSPROP_MOMENTUM: return &run_blocks<RMSPROP_MOMENTUM, 0>;
    case SGD: return with_flags<SGD>(flags);
    case LARS: return with_flags<LARS>(flags);
    default: TORCH_CHECK(false, "dist8: unknown rule ", rule);
  }
}

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

int64_t grain_blocks(int64_t block_size) { return std::max<int64_t>(1, 32768 / block_size); }

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
// Validates one tensor's arguments and gathers them (shared by the single and the multi-tensor op).
Update make_update(int64_t rule, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                   const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                   const QTable* const* tables, const Scalars& c, int64_t block_size, const at::Tensor& update_out,
                   const at::Tensor& state3, const at::Tensor& absmax3, const at::Tensor& correction) {
  Update u;
  u.nstates = rule_num_states((int)rule);
  u.n = param.numel();
  u.block_size = block_size;
  u.c = c;
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "dist8: param/grad must be contiguous");
  TORCH_CHECK(grad.numel() == u.n, "dist8: grad size mismatch");
  TORCH_CHECK(is_supported_float(param.scalar_type()) && is_supported_float(grad.scalar_type()),
              "dist8: param/grad must be float32, bfloat16 or float16");
  u.writes_update = update_out.defined() && update_out.numel() > 0;
  const at::Tensor& out_t = u.writes_update ? update_out : param;
  TORCH_CHECK(out_t.is_contiguous() && out_t.numel() == u.n && is_supported_float(out_t.scalar_type()),
              "dist8: bad update_out");
  const at::Tensor* states[MAX_STATES] = {&state1, &state2, &state3};
  const at::Tensor* absmaxes[MAX_STATES] = {&absmax1, &absmax2, &absmax3};
  const int64_t nblocks = (u.n + block_size - 1) / block_size;
  for (int s = 0; s < u.nstates; ++s) {
    const at::Tensor& S = *states[s];
    TORCH_CHECK(S.is_contiguous() && S.numel() == u.n, "dist8: state", s + 1, " must be contiguous with ", u.n,
                " elements");
    const at::Tensor& A = *absmaxes[s];
    if (A.defined() && A.numel() > 0) {
      TORCH_CHECK(S.scalar_type() == at::kByte, "dist8: 8-bit state", s + 1, " must be uint8");
      TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.numel() == nblocks,
                  "dist8: absmax", s + 1, " must be float32 with ", nblocks, " entries");
      TORCH_CHECK(tables[s] != nullptr, "dist8: 8-bit state", s + 1, " needs qmap", s + 1);
      u.st[s].q8 = true;
      u.st[s].codes = S.data_ptr<uint8_t>();
      u.st[s].absmax = A.data_ptr<float>();
      u.st[s].table = tables[s];
      u.st[s].floored = rule_state_floored((int)rule, s);
      u.st[s].floor_frac = tables[s]->floor_frac;
    } else {
      TORCH_CHECK(S.scalar_type() == at::kFloat, "dist8: 32-bit state", s + 1, " must be float32");
      u.st[s].f32 = S.data_ptr<float>();
    }
  }
  u.param = param.data_ptr();
  u.grad = grad.data_ptr();
  u.out = out_t.data_ptr();
  u.pt = param.scalar_type();
  u.gt = grad.scalar_type();
  u.ot = out_t.scalar_type();
  if (correction.defined() && correction.numel() > 0) {
    const at::ScalarType ct = correction.scalar_type();
    TORCH_CHECK(ct == at::kChar || ct == at::kShort,
                "dist8: correction must be int8 (24-bit master) or int16 (32-bit), got ", ct);
    TORCH_CHECK(u.pt == at::kBFloat16 || u.pt == at::kHalf,
                "dist8: a master-weight correction needs a bfloat16/float16 param, got ", u.pt);
    TORCH_CHECK(correction.is_contiguous() && correction.numel() == u.n,
                "dist8: correction must be contiguous with the param's ", u.n, " elements");
    u.corr = correction.data_ptr();
    u.corr_bits = ct == at::kChar ? 8 : 16;
    u.mf = master_format(u.pt == at::kHalf, u.corr_bits);
  }
  return u;
}

Scalars scalars_from(c10::ArrayRef<double> scalars) {
  TORCH_CHECK(scalars.size() == NUM_SCALARS, "dist8: expected ", NUM_SCALARS, " scalars, got ", scalars.size());
  Scalars c;
  float* cf = reinterpret_cast<float*>(&c);
  for (int i = 0; i < NUM_SCALARS; ++i) cf[i] = static_cast<float>(scalars[i]);
  return c;
}

void check_rule_and_block(int64_t rule, int64_t block_size) {
  TORCH_CHECK(rule >= 0 && rule < NUM_RULES, "dist8: unknown rule ", rule);
  TORCH_CHECK(block_size >= 64 && (block_size & (block_size - 1)) == 0, "dist8: bad block_size ", block_size);
}

// Where a tensor's skipped blocks are counted: element i of `skipped` (int64), or nowhere when it is empty.
int64_t* skipped_counter(const at::Tensor& skipped, int64_t i) {
  if (!skipped.defined() || skipped.numel() == 0) return nullptr;
  TORCH_CHECK(skipped.scalar_type() == at::kLong && skipped.is_contiguous() && skipped.numel() > i,
              "dist8: skipped must be a contiguous int64 tensor with one element per tensor");
  return skipped.data_ptr<int64_t>() + i;
}

const QTable* table_or_null(const at::Tensor& qmap) { return qmap.defined() && qmap.numel() > 0 ? get_table(qmap) : nullptr; }

void fused_update_cpu(int64_t rule, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                      const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                      const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                      int64_t flags, int64_t block_size, const at::Tensor& update_out, const at::Tensor& skipped,
                      const at::Tensor& state3, const at::Tensor& absmax3, const at::Tensor& correction) {
  refresh_lookup_mode();  // AVX2/AVX-512: gather or scalar-load table lookups (quant_cpu.h)
  check_rule_and_block(rule, block_size);
  const Scalars c = scalars_from(scalars);
  const QTable* tables[MAX_STATES] = {nullptr, nullptr, nullptr};
  const int nstates = rule_num_states((int)rule);
  if (absmax1.defined() && absmax1.numel() > 0) tables[0] = table_or_null(qmap1);
  if (nstates > 1 && absmax2.defined() && absmax2.numel() > 0) tables[1] = table_or_null(qmap2);
  if (nstates > 2 && absmax3.defined() && absmax3.numel() > 0) tables[2] = table_or_null(qmap1);  // state 3: qmap1
  Update u = make_update(rule, param, grad, state1, state2, absmax1, absmax2, tables, c, block_size, update_out,
                         state3, absmax3, correction);
  u.skipped = skipped_counter(skipped, 0);
  if (u.n == 0) return;
  const int64_t nblocks = (u.n + block_size - 1) / block_size;
  const BlocksFn fn = pick_blocks_fn((int)rule, (int)flags);
  at::parallel_for(0, nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) { fn(u, b0, b1); });
}

// The same update for many tensors in one call (one rule, scalars, flags and block size;
// dtypes and state layouts may differ per tensor): the per-call cost is paid once and the
// blocks of all tensors are split over the threads together. No update_out (LAMB/LARS
// use the single-tensor op).
void fused_update_multi_cpu(int64_t rule, at::TensorList params, at::TensorList grads, at::TensorList state1,
                            at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                            const at::Tensor& qmap1, const at::Tensor& qmap2, c10::ArrayRef<double> scalars,
                            int64_t flags, int64_t block_size, const at::Tensor& skipped, at::TensorList state3,
                            at::TensorList absmax3, at::TensorList correction) {
  refresh_lookup_mode();  // AVX2/AVX-512: gather or scalar-load table lookups (quant_cpu.h)
  check_rule_and_block(rule, block_size);
  TORCH_CHECK(!rule_writes_update((int)rule), "dist8: fused_update_multi_ does not take LAMB/LARS");
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && state1.size() == k && state2.size() == k && absmax1.size() == k &&
                  absmax2.size() == k,
              "dist8: fused_update_multi_ needs one grad, state1, state2, absmax1, absmax2 per param");
  const bool three = rule_num_states((int)rule) > 2;
  TORCH_CHECK(three ? (state3.size() == k && absmax3.size() == k) : (state3.empty() && absmax3.empty()),
              "dist8: fused_update_multi_ needs one state3, absmax3 per param for a rule with three states, none else");
  TORCH_CHECK(correction.size() == 0 || correction.size() == k,
              "dist8: fused_update_multi_ needs no correction list or one correction per param");
  const Scalars c = scalars_from(scalars);
  const QTable* maps[MAX_STATES] = {table_or_null(qmap1), table_or_null(qmap2), table_or_null(qmap1)};
  const at::Tensor none;
  std::vector<Update> ups;
  std::vector<int64_t> first_block{0};  // prefix sums of the tensors' block counts
  ups.reserve(k);
  for (size_t i = 0; i < k; ++i) {
    ups.push_back(make_update(rule, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], maps, c,
                              block_size, none, three ? state3[i] : none, three ? absmax3[i] : none,
                              correction.size() ? correction[i] : none));
    ups.back().skipped = skipped_counter(skipped, (int64_t)i);
    first_block.push_back(first_block.back() + (ups.back().n + block_size - 1) / block_size);
  }
  const BlocksFn fn = pick_blocks_fn((int)rule, (int)flags);
  at::parallel_for(0, first_block.back(), grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    size_t t = std::upper_bound(first_block.begin(), first_block.end(), b0) - first_block.begin() - 1;
    for (; t < k && first_block[t] < b1; ++t) {
      const int64_t lo = std::max(b0, first_block[t]) - first_block[t];
      const int64_t hi = std::min(b1, first_block[t + 1]) - first_block[t];
      if (hi > lo) fn(ups[t], lo, hi);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& qmap,
                                                          int64_t block_size) {
  refresh_lookup_mode();  // AVX2/AVX-512: gather or scalar-load table lookups (quant_cpu.h)
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
      const float am = absmax_from_bits(absmax_bits_n(v, len, 0u));
      ap[blk] = am;
      quantize_block(v, len, block_reciprocal(am), *t, cp + off);
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& qmap,
                                    int64_t block_size) {
  refresh_lookup_mode();  // AVX2/AVX-512: gather or scalar-load table lookups (quant_cpu.h)
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

// Max of the magnitude bits: a value is inf/NaN iff its exponent bits are all ones,
// i.e. iff its magnitude bits reach the infinity pattern (vectorises to and + max).
// A pure read stream: prefetching 1 KiB ahead took it from 19.5 to 24.4 GB/s on two
// cores here (64M fp32 values from DRAM).
template <typename U>
bool chunk_finite(const U* u, int64_t i0, int64_t i1, U magnitude_mask, U inf_bits) {
  constexpr int64_t GROUP = 256 / sizeof(U), AHEAD = 1024 / sizeof(U);
  U m = 0;
  int64_t i = i0;
  for (; i + GROUP <= i1; i += GROUP) {
    if (i + AHEAD + GROUP <= i1)
      for (int64_t l = 0; l < GROUP; l += 64 / sizeof(U)) __builtin_prefetch(u + i + AHEAD + l, 0);
    for (int64_t k = 0; k < GROUP; ++k) {
      const U a = u[i + k] & magnitude_mask;
      m = a > m ? a : m;
    }
  }
  for (; i < i1; ++i) {
    const U a = u[i] & magnitude_mask;
    m = a > m ? a : m;
  }
  return m < inf_bits;
}

bool range_finite(const void* p, at::ScalarType t, int64_t i0, int64_t i1) {
  if (t == at::kFloat) return chunk_finite<uint32_t>(static_cast<const uint32_t*>(p), i0, i1, 0x7FFFFFFFu, 0x7F800000u);
  if (t == at::kHalf) return chunk_finite<uint16_t>(static_cast<const uint16_t*>(p), i0, i1, 0x7FFF, 0x7C00);
  return chunk_finite<uint16_t>(static_cast<const uint16_t*>(p), i0, i1, 0x7FFF, 0x7F80);
}

bool all_finite_cpu(const at::Tensor& x) {
  if (!at::isFloatingType(x.scalar_type())) return true;
  if (!is_supported_float(x.scalar_type())) return at::isfinite(x).all().item<bool>();
  at::Tensor xc = x.contiguous();
  const at::ScalarType t = xc.scalar_type();
  const void* p = xc.data_ptr();
  std::atomic<bool> bad{false};
  at::parallel_for(0, xc.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    if (!range_finite(p, t, i0, i1)) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

// all_finite of many tensors in one parallel pass (a model's gradients): one stream for
// the threads instead of a fork/join and a cold start per tensor. 1 per tensor with an inf/NaN.
std::vector<int64_t> all_finite_multi_cpu(at::TensorList xs) {
  constexpr int64_t UNIT = 1 << 16;  // values per work item
  std::vector<at::Tensor> keep;      // contiguous copies where needed
  std::vector<int64_t> first_unit{0};
  std::vector<int64_t> bad(xs.size(), 0);
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    if (!is_supported_float(x.scalar_type())) {
      if (at::isFloatingType(x.scalar_type()) && !at::isfinite(x).all().item<bool>()) bad[i] = 1;
      keep.emplace_back();
      first_unit.push_back(first_unit.back());
      continue;
    }
    keep.push_back(x.contiguous());
    first_unit.push_back(first_unit.back() + (x.numel() + UNIT - 1) / UNIT);
  }
  std::vector<std::atomic<bool>> found(xs.size());
  for (auto& f : found) f.store(false, std::memory_order_relaxed);
  at::parallel_for(0, first_unit.back(), 1, [&](int64_t u0, int64_t u1) {
    size_t t = std::upper_bound(first_unit.begin(), first_unit.end(), u0) - first_unit.begin() - 1;
    for (int64_t u = u0; u < u1; ++u) {
      while (first_unit[t + 1] <= u) ++t;
      const int64_t i0 = (u - first_unit[t]) * UNIT, i1 = std::min(keep[t].numel(), i0 + UNIT);
      if (!range_finite(keep[t].data_ptr(), keep[t].scalar_type(), i0, i1)) found[t].store(true, std::memory_order_relaxed);
    }
  });
  for (size_t i = 0; i < xs.size(); ++i) bad[i] |= found[i].load() ? 1 : 0;
  return bad;
}

// The code paths this build uses (for `dist8 info`).
std::string cpu_build_features() {
  std::string f;
#if defined(D8_AVX512) || defined(D8_AVX2)
  refresh_lookup_mode();
  const std::string mode = std::string(lookup_mode_name()) +
                           (lookup_mode() == default_lookup_mode() ? " (this CPU's default" : " (set by DIST8_CPU_GATHER") +
                           "; DIST8_CPU_GATHER=hw|scalar)";
#endif
#ifdef D8_AVX512
  const std::string codes = std::string(run_codes_enabled() ? "codes of linear-run maps computed" : "every map's codes looked up") +
                            (run_codes_enabled() == default_run_codes() ? " (this CPU's default" : " (set by DIST8_CPU_CODES") +
                            "; DIST8_CPU_CODES=runs|table)";
  f += "avx512 (one-lookup exact codes, " + mode + ", pipelined blocks, fp8 maps computed, " + codes + ")";
#ifdef D8_VBMI
  f += ", vbmi (permute dequantization)";
#else
  f += ", no vbmi (gather dequantization)";
#endif
#elif defined(D8_AVX2)
  f += "avx2 (one-lookup exact codes, pipelined blocks, table dequantization, fp8 maps computed; " + mode + ")";
#else
  f += "portable scalar quantization";
#endif
#ifdef D8_F16C
  f += ", f16c";
#endif
#if defined(DIST8_ABLATE_ENCODE) || defined(DIST8_ABLATE_DECODE)
  f += ", ABLATED (benchmark build, wrong results:";
#ifdef DIST8_ABLATE_ENCODE
  f += " no encode";
#endif
#ifdef DIST8_ABLATE_DECODE
  f += " no decode";
#endif
  f += ")";
#endif
  return f;
}

// How this build finds the codes of a map in the block loop (tests check that fp8 maps take
// the computed path): "fp8 codec" (from the float bits, no table), "linear runs" (AVX-512: computed
// from the map's linear runs, runs_cpu.h), "key table" (one load per value), or "binary search"
// (maps without a key table: unsorted or repeated entries).
std::string map_codes(const at::Tensor& qmap) {
  const QTable* t = get_table(qmap);
#if defined(D8_AVX2) || defined(D8_AVX512)
  if (t->fp8) return "fp8 codec";
#endif
  refresh_lookup_mode();
  if (t->runs && run_codes_enabled()) return "linear runs";
  return t->fast ? "key table" : "binary search";
}

// The vector run codes (runs_cpu.h) of every float32 whose key is in [first_key, last_key], against
// the key table's: [values, marked lanes (looked up), wrong codes]. All zero where this build or
// map has no run codes. tests/test_run_codes.py sweeps all 2^32 keys.
std::vector<int64_t> run_codes_check(const at::Tensor& qmap, int64_t first_key, int64_t last_key) {
  const QTable* t = get_table(qmap);
  TORCH_CHECK(0 <= first_key && first_key <= last_key && last_key <= 0xFFFFFFFFll, "run_codes_check: bad key range");
  std::atomic<int64_t> values{0}, marked{0}, wrong{0};
#ifdef D8_AVX512
  if (!t->runs) return {0, 0, 0};
  const RunSimd rs(t->rc);
  QTableSimd ts(*t);
  ts.scalar = false;  // the key table by gathers: 16 lanes at once
  const int64_t vectors = (last_key - first_key) / 16 + 1;
  at::parallel_for(0, vectors, 1 << 16, [&](int64_t v0, int64_t v1) {
    int64_t n = 0, m = 0, w = 0;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t k0 = first_key + 16 * v;
      const int lanes = (int)std::min<int64_t>(16, last_key - k0 + 1);
      const __mmask16 live = (__mmask16)((1u << lanes) - 1);
      // key_float of k0 + lane: the low half of the keys are negative floats (all bits flipped)
      const __m512i k = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)k0), lane);
      const __mmask16 pos = _mm512_movepi32_mask(k);
      const __m512 y = _mm512_castsi512_ps(_mm512_mask_and_epi32(_mm512_xor_si512(k, _mm512_set1_epi32(-1)), pos, k,
                                                                  _mm512_set1_epi32(0x7FFFFFFF)));
      __mmask16 slow;
      const __m512i got = run_codes16(y, rs, slow);
      const __m512i want = _mm512_srli_epi32(code_words16(y, ts), 24);
      n += lanes;
      m += __builtin_popcount(slow & live);
      w += __builtin_popcount(_mm512_mask_cmpneq_epi32_mask(live & (__mmask16)~slow, got, want));
    }
    values += n, marked += m, wrong += w;
  });
#else
  (void)t;
#endif
  return {values.load(), marked.load(), wrong.load()};
}

// LAMB/LARS phase 2 over a whole tensor: param <- rule_trust_step(param, update, lr * ratio) in
// float32, stored back in the parameter's dtype (round to nearest even, as torch's copy_). With a
// master-weight correction (int8: 24-bit, int16: 32-bit master) the step runs on the decoded master
// and the result is re-encoded into param and correction (master_decode / master_encode).
template <typename C>
void trust_step_master(uint16_t* pb, C* corr, const float* u, int64_t n, float lr_ratio, const MasterFormat& f) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int32_t c;
      pb[i] = master_encode(rule_trust_step(master_decode(pb[i], (int32_t)corr[i], f), u[i], lr_ratio), f, c);
      corr[i] = (C)c;
    }
  });
}

void trust_step_cpu(const at::Tensor& param, const at::Tensor& update, double lr_times_ratio,
                    const at::Tensor& correction) {
  TORCH_CHECK(is_supported_float(param.scalar_type()) && param.is_contiguous(),
              "dist8: trust_step_ param must be a contiguous float32/bfloat16/float16 tensor");
  TORCH_CHECK(update.scalar_type() == at::kFloat && update.is_contiguous() && update.numel() == param.numel(),
              "dist8: trust_step_ update must be a contiguous float32 tensor with the parameter's length");
  const int64_t n = param.numel();
  if (n == 0) return;
  const float lr_ratio = static_cast<float>(lr_times_ratio);  // fl32(lr * ratio), as the reference
  const at::ScalarType st = param.scalar_type();
  void* p = param.data_ptr();
  const float* u = update.data_ptr<float>();
  if (correction.defined() && correction.numel() > 0) {
    const at::ScalarType ct = correction.scalar_type();
    TORCH_CHECK((ct == at::kChar || ct == at::kShort) && st != at::kFloat && correction.is_contiguous() &&
                    correction.numel() == n,
                "dist8: trust_step_ correction must be a contiguous int8/int16 tensor with a bf16/fp16 param's length");
    const MasterFormat f = master_format(st == at::kHalf, ct == at::kChar ? 8 : 16);
    if (ct == at::kChar) trust_step_master(static_cast<uint16_t*>(p), correction.data_ptr<int8_t>(), u, n, lr_ratio, f);
    else trust_step_master(static_cast<uint16_t*>(p), correction.data_ptr<int16_t>(), u, n, lr_ratio, f);
    return;
  }
  at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 512, [&](int64_t c0, int64_t c1) {
    float buf[CHUNK];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t off = c * CHUNK, len = std::min(CHUNK, n - off);
      load_f32(p, st, off, len, buf);
      D8_SIMD_LOOP for (int64_t i = 0; i < len; ++i) buf[i] = rule_trust_step(buf[i], u[off + i], lr_ratio);
      store_from_f32(buf, len, p, st, off);
    }
  });
}

}  // namespace
}  // namespace dist8

// Build information for `dist8 info`, in a namespace of its own (dist8's ops are defined from Python).
TORCH_LIBRARY_FRAGMENT(dist8_cpu_info, m) {
  m.def("features() -> str", &dist8::cpu_build_features);
  m.def("map_codes(Tensor qmap) -> str", &dist8::map_codes);
  m.def("run_codes_check(Tensor qmap, int first_key, int last_key) -> int[]", &dist8::run_codes_check);
}

TORCH_LIBRARY_IMPL(dist8, CPU, m) {
  m.impl("fused_update_", &dist8::fused_update_cpu);
  m.impl("fused_update_multi_", &dist8::fused_update_multi_cpu);
  m.impl("quantize_blockwise", &dist8::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dist8::dequantize_blockwise_cpu);
  m.impl("all_finite", &dist8::all_finite_cpu);
  m.impl("all_finite_multi", &dist8::all_finite_multi_cpu);
  m.impl("trust_step_", &dist8::trust_step_cpu);
}
