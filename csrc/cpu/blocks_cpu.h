// blocks_cpu.h -- the fused block loop: per quantization block, dequantize the states with
// the old absmax, apply the rule (dist8_rules.h) in fp32, reduce the new absmax, requantize
// to the exact nearest code (quant_cpu.h) and write the parameter (or the update direction
// for LAMB/LARS). Included only by the blocks_*_cpu.cpp files, which instantiate
// run_blocks for their rules.
//
// Benchmark-only ablations (bench/step_phases.py; never in a normal build, and `dist8 info` says
// so): DIST8_ABLATE_ENCODE stores the scaled values' top bytes instead of computing codes,
// DIST8_ABLATE_DECODE leaves the previous block's values in the stash instead of dequantizing.
// The results are wrong; they measure what the rest of the step costs.
//
// Software pipelining: the rule is bound by the divider (sqrt and two divisions
// per value for Adam) and quantization by table loads, so each thread runs them
// side by side -- while it dequantizes and updates block b, 64 values at a time,
// it quantizes block b-1 from a small fp32 stash. Done one after the other, the
// two phases of a block were each limited by a different unit and took ~1.5x as
// long. The last, partial block of a tensor goes through the same primitives
// without the pipeline.
#pragma once

#include <algorithm>
#include <vector>

#include "update_cpu.h"

namespace dist8 {

// The rules with one state (momentum, square average, sum, Lion's m).
template <int R, int FL>
D8_INLINE float one_state_rule(float p, float g, float& state, const Scalars& c) {
  if constexpr (R == SGD || R == LARS) return rule_momentum<R == LARS>(p, g, state, c, FL);
  else if constexpr (R == RMSPROP) return rule_rmsprop(p, g, state, c);
  else if constexpr (R == ADAGRAD) return rule_adagrad(p, g, state, c);
  else {
    static_assert(R == LION, "unknown rule");
    return rule_lion(p, g, state, c);
  }
}

template <int R, int FL>
D8_INLINE void apply_rule_n(const float* p, const float* g, float* s1, float* s2, float* out, int64_t n,
                         const Scalars& cs, float* s3 = nullptr) {
  const Scalars c = cs;
  if constexpr (R == ADEMAMIX) {
    D8_SIMD_LOOP
    for (int64_t i = 0; i < n; ++i) {
      float m1 = s1[i], nu = s2[i], m2 = s3[i];
      out[i] = rule_ademamix(p[i], g[i], m1, nu, m2, c);
      s1[i] = m1;
      s2[i] = nu;
      s3[i] = m2;
    }
  } else if constexpr (R == RMSPROP_MOMENTUM) {
    D8_SIMD_LOOP
    for (int64_t i = 0; i < n; ++i) {
      float v = s1[i], buf = s2[i];
      out[i] = rule_rmsprop_momentum(p[i], g[i], v, buf, c);
      s1[i] = v;
      s2[i] = buf;
    }
  } else if constexpr (R == ADAM || R == LAMB) {
    D8_SIMD_LOOP
    for (int64_t i = 0; i < n; ++i) {
      float m = s1[i], v = s2[i];
      out[i] = rule_adam<R == LAMB>(p[i], g[i], m, v, c);
      s1[i] = m;
      s2[i] = v;
    }
  } else {
    D8_SIMD_LOOP
    for (int64_t i = 0; i < n; ++i) {
      float state = s1[i];
      out[i] = one_state_rule<R, FL>(p[i], g[i], state, c);
      s1[i] = state;
    }
  }
}

// Scratch for one thread: fp32 copies of non-fp32 param/grad values, the new outputs of
// the block being updated (written to the parameter once the block is known finite) and,
// per state, the new values of two blocks (the one being updated, the one being quantized).
struct Scratch {
  std::vector<float> mem;
  float *pbuf, *gbuf, *obuf, *stash[MAX_STATES][2];
  explicit Scratch(int64_t span) : mem((3 + 2 * MAX_STATES) * span + 16) {
    float* base = mem.data();
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64 / sizeof(float);
    pbuf = base;
    gbuf = pbuf + span;
    obuf = gbuf + span;
    for (int s = 0; s < MAX_STATES; ++s)
      for (int k = 0; k < 2; ++k) stash[s][k] = obuf + span * (1 + 2 * s + k);
  }
};

// fp32 views of the values [off, off+len) of one chunk or block: states dequantized (8-bit,
// floored where the rule says so) or copied (32-bit) into the stash, where the rule writes
// their new values; O (in the block's output buffer) is where it writes the outputs.
struct Span {
  float* P = nullptr;
  const float* G = nullptr;
  float* S[MAX_STATES] = {nullptr, nullptr, nullptr};
  float* O = nullptr;
};

D8_INLINE void floor_n(float* v, int64_t n, float floor) {
  for (int64_t i = 0; i < n; ++i) v[i] = floored(v[i], floor);
}

// Master weights: the rule sees decode(param, correction) and the committed outputs are
// re-encoded into both (dist8_rules.h master_decode / master_encode).
// The parameter format is a template argument so that the loops vectorise without a select per value.
template <typename C, bool HALF>
D8_INLINE void master_decode_loop(const uint16_t* pb, const C* c, int64_t len, float* dst) {
  const MasterFormat f = master_format(HALF, 8 * (int)sizeof(C));
  D8_SIMD_LOOP
  for (int64_t i = 0; i < len; ++i) dst[i] = master_decode(pb[i], (int32_t)c[i], f);
}

template <typename C>
D8_INLINE void master_decode_n(const Update& u, int64_t off, int64_t len, float* dst) {
  const uint16_t* pb = static_cast<const uint16_t*>(u.param) + off;
  const C* c = static_cast<const C*>(u.corr) + off;
  if (u.mf.half) master_decode_loop<C, true>(pb, c, len, dst);
  else master_decode_loop<C, false>(pb, c, len, dst);
}

template <typename C, bool HALF>
D8_INLINE void master_encode_loop(const float* src, int64_t len, uint16_t* pb, C* c) {
  const MasterFormat f = master_format(HALF, 8 * (int)sizeof(C));
  D8_SIMD_LOOP
  for (int64_t i = 0; i < len; ++i) {
    int32_t ci;
    pb[i] = master_encode(src[i], f, ci);
    c[i] = (C)ci;
  }
}

template <typename C>
D8_INLINE void master_encode_n(const Update& u, const float* src, int64_t off, int64_t len) {
  uint16_t* pb = static_cast<uint16_t*>(u.param) + off;
  C* c = static_cast<C*>(u.corr) + off;
  if (u.mf.half) master_encode_loop<C, true>(src, len, pb, c);
  else master_encode_loop<C, false>(src, len, pb, c);
}

template <int CODEC = CODEC_ANY>
D8_INLINE Span prepare_span(const Update& u, int64_t off, int64_t len, const float* old_absmax, float* const* stash,
                            Scratch& w, float* out) {
  Span sp;
  sp.P = u.pt == at::kFloat ? static_cast<float*>(u.param) + off : w.pbuf;
  if (u.pt != at::kFloat) load_f32(u.param, u.pt, off, len, w.pbuf);
  if (u.corr_bits == 8) master_decode_n<int8_t>(u, off, len, w.pbuf);
  else if (u.corr_bits == 16) master_decode_n<int16_t>(u, off, len, w.pbuf);
  sp.G = u.gt == at::kFloat ? static_cast<const float*>(u.grad) + off : w.gbuf;
  if (u.gt != at::kFloat) load_f32(u.grad, u.gt, off, len, w.gbuf);
  for (int s = 0; s < u.nstates; ++s) {
    if (u.st[s].q8) {
      sp.S[s] = stash[s];
#ifdef DIST8_ABLATE_DECODE
      if (len == CHUNK) continue;
#endif
      if (len == CHUNK) dequantize64<CODEC>(u.st[s].codes + off, old_absmax[s], *u.st[s].table, sp.S[s]);
      else dequantize_block(u.st[s].codes + off, len, old_absmax[s], *u.st[s].table, sp.S[s]);
      if (u.st[s].floored) floor_n(sp.S[s], len, fmul(u.st[s].floor_frac, old_absmax[s]));
    } else {
      sp.S[s] = stash[s];
      memcpy(sp.S[s], u.st[s].f32 + off, len * sizeof(float));
    }
  }
  sp.O = out;
  return sp;
}

template <int R, int FL>
D8_INLINE void rule_span(const Update& u, const Span& sp, int64_t j, int64_t len) {
  apply_rule_n<R, FL>(sp.P + j, sp.G + j, sp.S[0] + j, sp.S[1] ? sp.S[1] + j : nullptr, sp.O + j, len, u.c,
                      sp.S[2] ? sp.S[2] + j : nullptr);
}

// The outputs of a block: its new values once committed, zeros (LAMB/LARS: no update) when skipped.
D8_INLINE void commit_out(const Update& u, float* obuf, int64_t off, int64_t len, bool ok) {
  if (!ok) {
    if (!u.writes_update) return;  // the parameter keeps its values
    std::fill(obuf, obuf + len, 0.0f);
  }
  if (u.corr_bits && !u.writes_update) {  // the new master into param + correction
    if (u.corr_bits == 8) master_encode_n<int8_t>(u, obuf, off, len);
    else master_encode_n<int16_t>(u, obuf, off, len);
    return;
  }
  store_from_f32(obuf, len, u.out, u.ot, off);
}

D8_INLINE void prefetch_block(const Update& u, int64_t off) {
  if (PREFETCH == 0 || off + CHUNK > u.n) return;
  const char* p = static_cast<const char*>(u.param) + off * c10::elementSize(u.pt);
  const char* g = static_cast<const char*>(u.grad) + off * c10::elementSize(u.gt);
  for (int64_t l = 0; l < CHUNK * (int64_t)c10::elementSize(u.pt); l += 64) __builtin_prefetch(p + l, 0);
  for (int64_t l = 0; l < CHUNK * (int64_t)c10::elementSize(u.gt); l += 64) __builtin_prefetch(g + l, 0);
  for (int s = 0; s < u.nstates; ++s) {
    if (u.st[s].q8) __builtin_prefetch(u.st[s].codes + off, 0);
    else for (int64_t l = 0; l < CHUNK * 4; l += 64) __builtin_prefetch(u.st[s].f32 + off + l / 4, 0);
  }
}

// One block (full or partial) at a time: dequantize, rule, absmax, then commit (requantize,
// write the outputs) if every new value is finite. Any state layout (8- or 32-bit, any map);
// also the last, partial block. Returns 1 if the block was skipped.
template <int R, int FL>
int64_t run_block_simple(const Update& u, int64_t blk, Scratch& w) {
  const int64_t off = blk * u.block_size, len = std::min(u.block_size, u.n - off);
  float old_am[MAX_STATES] = {0.f, 0.f, 0.f};
  for (int s = 0; s < u.nstates; ++s)
    if (u.st[s].q8) old_am[s] = u.st[s].absmax[blk];
  float* stash[MAX_STATES] = {w.stash[0][0], w.stash[1][0], w.stash[2][0]};
  const Span sp = prepare_span(u, off, len, old_am, stash, w, w.obuf);
  rule_span<R, FL>(u, sp, 0, len);
  uint32_t bits = absmax_bits_n(w.obuf, len, 0u);
  uint32_t state_bits[MAX_STATES] = {0u, 0u, 0u};
  for (int s = 0; s < u.nstates; ++s) {
    state_bits[s] = absmax_bits_n(stash[s], len, 0u);
    bits = std::max(bits, state_bits[s]);
  }
  const bool ok = bits < D8_INF_BITS;
  commit_out(u, w.obuf, off, len, ok);
  if (!ok) return 1;
  for (int s = 0; s < u.nstates; ++s) {
    if (!u.st[s].q8) {
      memcpy(u.st[s].f32 + off, stash[s], len * sizeof(float));
      continue;
    }
    const float am = absmax_from_bits(state_bits[s]);
    u.st[s].absmax[blk] = am;
    quantize_block(stash[s], len, block_reciprocal(am), *u.st[s].table, u.st[s].codes + off);
  }
  return 0;
}

#if defined(D8_AVX512) || defined(D8_AVX2)
#ifdef DIST8_ABLATE_ENCODE
// Stand-in words for 16 values: a byte of each scaled value's bits (not its code).
D8_INLINE Words16 ablated_words16(const float* v, Recip recip) {
#ifdef D8_AVX512
  return _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(v), recip));
#else
  return {_mm256_srli_epi32(_mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(v), recip)), 24),
          _mm256_srli_epi32(_mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(v + 8), recip)), 24)};
#endif
}
#endif

// Full blocks [b0, b1) whose states are all 8-bit with a table (the common case),
// pipelined: quantize block b-1 while updating block b, interleaved 16 values at a
// time so that the scheduler always holds both divider work (the rule) and table
// loads (quantization); in runs of 64 the rule's divisions filled it and the two
// took turns. Prologue (first block: update only) and epilogue (last block:
// quantize only) are the same chunk code with one half compiled out. A block is committed
// (absmax, outputs, and its codes while the next block is updated) only if all its new
// values are finite: the absmax reduction of the states and one more of the outputs say so.
// CODEC: every state's codes and values come from the key table (CODEC_TABLE), the fp8 codec
// (CODEC_FP8), or codes from the map's runs and values from the table (CODEC_RUNS), compiled in.
template <int R, int FL, int CODEC>
struct Pipeline {
  static constexpr int NS = R == ADEMAMIX ? 3 : (R == ADAM || R == LAMB || R == RMSPROP_MOMENTUM) ? 2 : 1;
  const Update& u;
  Scratch& w;
  QTableSimd qs[NS];
  MaxBits mx[NS];  // absmax bits of the block being updated
  MaxBits mo;       // magnitude bits of its outputs
  Recip recip[NS];  // reciprocal of the new absmax of the block being quantized
  bool prev_ok = true;  // the block being quantized is committed
  int64_t skips = 0;
  float old_am[NS];

  Pipeline(const Update& up, Scratch& wk) : u(up), w(wk) {
    for (int s = 0; s < NS; ++s) qs[s] = QTableSimd(*u.st[s].table);
  }

  template <bool CUR, bool PREV>
  D8_INLINE void chunk(int64_t b, int64_t i) {
    const int64_t B = u.block_size, off = b * B + i;
    Span sp;
    float* cur_stash[MAX_STATES] = {w.stash[0][b & 1] + i, w.stash[1][b & 1] + i, w.stash[2][b & 1] + i};
    if constexpr (CUR) {
      prefetch_block(u, off + PREFETCH * B);
      sp = prepare_span<CODEC>(u, off, CHUNK, old_am, cur_stash, w, w.obuf + i);
    }
    Words16 words[NS][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if constexpr (CUR) {
        rule_span<R, FL>(u, sp, 16 * j, 16);
        for (int s = 0; s < NS; ++s) mx[s] = absmax_bits16(cur_stash[s] + 16 * j, mx[s]);
        mo = absmax_bits16(sp.O + 16 * j, mo);
      }
      if constexpr (PREV)
        for (int s = 0; s < NS; ++s)
#ifdef DIST8_ABLATE_ENCODE
          words[s][j] = ablated_words16(w.stash[s][(b - 1) & 1] + i + 16 * j, recip[s]);
#else
          words[s][j] = quant_words16<CODEC>(w.stash[s][(b - 1) & 1] + i + 16 * j, recip[s], qs[s]);
#endif
    }
    if constexpr (PREV)
      if (prev_ok)
        for (int s = 0; s < NS; ++s)
          store_codes64(words[s][0], words[s][1], words[s][2], words[s][3], u.st[s].codes + (b - 1) * B + i);
  }

  template <bool CUR, bool PREV>
  D8_INLINE void block(int64_t b) {
    if constexpr (CUR)
      for (int s = 0; s < NS; ++s) {
        old_am[s] = u.st[s].absmax[b];
        mx[s] = maxbits_zero();
      }
    if constexpr (CUR) mo = maxbits_zero();
    for (int64_t i = 0; i < u.block_size; i += CHUNK) chunk<CUR, PREV>(b, i);
    if constexpr (CUR) {
      uint32_t bits = maxbits_reduce(mo), state_bits[NS];
      for (int s = 0; s < NS; ++s) {
        state_bits[s] = maxbits_reduce(mx[s]);
        bits = std::max(bits, state_bits[s]);
      }
      prev_ok = bits < D8_INF_BITS;
      skips += prev_ok ? 0 : 1;
      commit_out(u, w.obuf, b * u.block_size, u.block_size, prev_ok);
      if (prev_ok)
        for (int s = 0; s < NS; ++s) {
          const float am = absmax_from_bits(state_bits[s]);
          u.st[s].absmax[b] = am;
          recip[s] = recip_set(block_reciprocal(am));
        }
    }
  }

  void run(int64_t b0, int64_t b1) {
    if (b0 >= b1) return;
    prev_ok = true;
    block<true, false>(b0);
    for (int64_t b = b0 + 1; b < b1; ++b) block<true, true>(b);
    block<false, true>(b1);
  }
};
#endif

#if defined(D8_AVX512) || defined(D8_AVX2)
template <typename P>
int64_t run_pipeline(const Update& u, Scratch& w, int64_t b0, int64_t b1) {
  P pipe(u, w);
  pipe.run(b0, b1);
  return pipe.skips;
}
#endif

template <int R, int FL>
void run_blocks(const Update& u, int64_t b0, int64_t b1) {
  const int64_t nfull = u.n / u.block_size;
  Scratch w(u.block_size);
  bool pipelined = false;
  int64_t skips = 0;
#if defined(D8_AVX512) || defined(D8_AVX2)
  // Pipelined when every state is 8-bit with one vector codec, the same for all (one quant_map per
  // optimizer); anything else (32-bit state, maps without a key table, mixed codecs) block by block.
  bool all_fp8 = true, all_table = true, all_runs = true;
  for (int s = 0; s < u.nstates; ++s) {
    const bool q8 = u.st[s].q8;
    all_fp8 = all_fp8 && q8 && u.st[s].table->fp8;
    all_table = all_table && q8 && !u.st[s].table->fp8 && u.st[s].table->fast;
    all_runs = all_runs && q8 && u.st[s].table->runs;
  }
  pipelined = all_fp8 || all_table;
  const int64_t e = std::min(b1, nfull);
  if (all_fp8) skips += run_pipeline<Pipeline<R, FL, CODEC_FP8>>(u, w, b0, e);
#ifdef D8_AVX512
  else if (all_runs && run_codes_enabled()) skips += run_pipeline<Pipeline<R, FL, CODEC_RUNS>>(u, w, b0, e);
#endif
  else if (all_table) skips += run_pipeline<Pipeline<R, FL, CODEC_TABLE>>(u, w, b0, e);
#endif
  for (int64_t b = pipelined ? std::max(b0, nfull) : b0; b < b1; ++b) skips += run_block_simple<R, FL>(u, b, w);
  if (skips && u.skipped) __atomic_fetch_add(u.skipped, skips, __ATOMIC_RELAXED);
}

}  // namespace dist8
