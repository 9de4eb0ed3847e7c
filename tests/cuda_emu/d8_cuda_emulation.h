// d8_cuda_emulation.h -- the CUDA features csrc/cuda/dist8_cuda.cu uses, emulated on the
// CPU so that its kernels' logic (indexing, chunked multi-tensor launches, partial blocks,
// block reductions) is tested on machines without a GPU (tests/test_kernels.py, the emulated-* backends).
//
// A launch runs its thread blocks one after another on the calling thread; each block
// runs as blockDim.x fibers. __syncthreads is a block barrier and a warp
// shuffle a warp barrier: a fiber yields to the scheduler, which releases the barrier
// once every fiber of the block (warp) has arrived, computing shuffle results and votes
// before resuming anyone. `__shared__` variables become function statics: one block runs
// at a time, so the block's fibers share them. Arithmetic is the host's (dist8_rules.h
// without __CUDA_ARCH__), so this checks the kernels' logic, not nvcc's code generation.
//
// Fibers switch with a few instructions on x86-64 (callee-saved registers pushed, stack
// pointers swapped: switch_stack below); ucontext elsewhere, whose swapcontext makes two
// sigprocmask system calls per switch, about half of the emulated kernels' time.
#pragma once

#if defined(__x86_64__)
#define D8EMU_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

#if D8EMU_FAST_SWITCH
// switch_stack(&save, load): push rbp, rbx, r12-r15 (the System V callee-saved registers; MXCSR
// and the x87 control word are left as the fibers never change them), store the stack pointer
// in *save, load `load`, pop the same registers and return on that stack.
extern "C" void d8emu_switch_stack(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .hidden d8emu_switch_stack
  .type d8emu_switch_stack, @function
d8emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size d8emu_switch_stack, .-d8emu_switch_stack
)");
#endif

namespace d8emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class State { RUNNABLE, BLOCK_BARRIER, WARP_BARRIER, DONE };

struct Fiber {
#if D8EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::RUNNABLE;
  uint32_t vote = 0, shfl_in = 0, shfl_out = 0;
  int shfl_src = 0;
  std::vector<char> stack;
};

struct Block {
  std::vector<Fiber> fibers;
#if D8EMU_FAST_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  int current = 0;
  uint32_t vote_result = 0;
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<double> dynamic_smem;  // double: 8-byte alignment like CUDA's
  const std::function<void()>* body = nullptr;
};

inline Block& block() {
  static thread_local Block b;
  return b;
}
inline Fiber& self() { return block().fibers[block().current]; }
inline Dim3 thread_idx() { return Dim3{(unsigned)block().current, 0, 0}; }

inline void yield(State s) {
  Fiber& f = self();
  f.state = s;
#if D8EMU_FAST_SWITCH
  d8emu_switch_stack(&f.sp, block().scheduler_sp);
#else
  swapcontext(&f.ctx, &block().scheduler);
#endif
}

inline void fiber_entry() {
  (*block().body)();
  self().state = State::DONE;
#if D8EMU_FAST_SWITCH
  d8emu_switch_stack(&self().sp, block().scheduler_sp);  // never resumed
  __builtin_trap();
#endif  // else uc_link returns to the scheduler
}

#if D8EMU_FAST_SWITCH
// A fresh fiber's stack as switch_stack leaves a switched-out one: six registers, then
// fiber_entry as the return address, then a zero return address of fiber_entry's own, so
// that it starts with the stack alignment of a called function (rsp % 16 == 8).
inline void* fresh_stack(std::vector<char>& stack) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  auto* words = reinterpret_cast<void**>(top);
  words[-1] = nullptr;
  words[-2] = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 3; i <= 8; ++i) words[-i] = nullptr;
  return &words[-8];
}
#endif

// Release whatever barriers every participant has reached; false if none could be released.
inline bool release(Block& b) {
  bool released = false;
  const int n = (int)b.fibers.size();
  for (int w = 0; w < n; w += 32) {
    const int end = std::min(n, w + 32);
    bool all = true;
    for (int i = w; i < end && all; ++i) all = b.fibers[i].state == State::WARP_BARRIER;
    if (!all) continue;
    for (int i = w; i < end; ++i) b.fibers[i].shfl_out = b.fibers[w + b.fibers[i].shfl_src].shfl_in;
    for (int i = w; i < end; ++i) b.fibers[i].state = State::RUNNABLE;
    released = true;
  }
  bool all = true, any = false;
  uint32_t vote = 0;
  for (Fiber& f : b.fibers) {
    if (f.state == State::DONE) continue;
    any = true;
    all = all && f.state == State::BLOCK_BARRIER;
    vote |= f.vote;
  }
  if (any && all) {
    b.vote_result = vote;
    for (Fiber& f : b.fibers)
      if (f.state != State::DONE) f.state = State::RUNNABLE;
    released = true;
  }
  return released;
}

inline void run_block(const Dim3& idx, const Dim3& grid, unsigned threads, size_t smem,
                      const std::function<void()>& body) {
  Block& b = block();
  constexpr size_t STACK = 64 * 1024;
  b.fibers.resize(threads);
  b.block_idx = idx;
  b.grid_dim = grid;
  b.block_dim = Dim3{threads, 1, 1};
  b.dynamic_smem.assign((smem + sizeof(double) - 1) / sizeof(double) + 1, 0.0);
  b.body = &body;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack.resize(STACK);
    f.state = State::RUNNABLE;
    f.vote = 0;
#if D8EMU_FAST_SWITCH
    f.sp = fresh_stack(f.stack);
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
  }
  for (;;) {
    bool ran = false, done = true;
    for (unsigned t = 0; t < threads; ++t) {
      if (b.fibers[t].state != State::RUNNABLE) continue;
      b.current = (int)t;
      ran = true;
#if D8EMU_FAST_SWITCH
      d8emu_switch_stack(&b.scheduler_sp, b.fibers[t].sp);
#else
      swapcontext(&b.scheduler, &b.fibers[t].ctx);
#endif
    }
    for (const Fiber& f : b.fibers) done = done && f.state == State::DONE;
    if (done) return;
    if (!release(b) && !ran) throw std::runtime_error("d8emu: threads of a block wait on different barriers");
  }
}

// kernel<<<grid, threads, smem>>>(args...): every block in turn.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, size_t smem, Args&&... args) {
  std::tuple<std::decay_t<Params>...> packed(std::forward<Args>(args)...);
  const std::function<void()> body = [&]() { std::apply(kernel, packed); };
  for (unsigned g = 0; g < grid; ++g) run_block(Dim3{g, 0, 0}, Dim3{grid, 1, 1}, threads, smem, body);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block().dynamic_smem.data());
}

}  // namespace d8emu

#define threadIdx (d8emu::thread_idx())
#define blockIdx (d8emu::block().block_idx)
#define blockDim (d8emu::block().block_dim)
#define gridDim (d8emu::block().grid_dim)

inline void __syncthreads() {
  d8emu::self().vote = 0;
  d8emu::yield(d8emu::State::BLOCK_BARRIER);
}

inline int __syncthreads_or(int predicate) {
  d8emu::self().vote = predicate != 0;
  d8emu::yield(d8emu::State::BLOCK_BARRIER);
  return d8emu::block().vote_result != 0;
}

inline uint32_t __shfl_xor_sync(unsigned /*mask*/, uint32_t v, int lane_mask) {
  d8emu::Fiber& f = d8emu::self();
  f.shfl_in = v;
  f.shfl_src = (d8emu::block().current & 31) ^ lane_mask;
  d8emu::yield(d8emu::State::WARP_BARRIER);
  return d8emu::self().shfl_out;
}

inline int atomicOr(int* address, int v) {  // fibers never preempt each other
  const int old = *address;
  *address = old | v;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long v) {
  const unsigned long long old = *address;
  *address = old + v;
  return old;
}

// cuda_fp16.h, as far as the kernels use it (c10::Half converts with round-to-nearest-even)
struct __half {
  uint16_t x;
};
inline __half __ushort_as_half(uint16_t bits) { return __half{bits}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
