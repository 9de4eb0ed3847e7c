// blocks_lars_cpu.cpp -- the block loops of LARS's phase 1 (momentum of the update direction),
// one per compile-time flag combination (first step, Nesterov).
#include "blocks_cpu.h"

namespace dist8 {
template void run_blocks<LARS, 0>(const Update&, int64_t, int64_t);
template void run_blocks<LARS, 1>(const Update&, int64_t, int64_t);
template void run_blocks<LARS, 2>(const Update&, int64_t, int64_t);
template void run_blocks<LARS, 3>(const Update&, int64_t, int64_t);
}  // namespace dist8
