// blocks_sgd_cpu.cpp -- the block loops of SGD with momentum, one per compile-time flag
// combination (first step, Nesterov).
#include "blocks_cpu.h"

namespace dist8 {
template void run_blocks<SGD, 0>(const Update&, int64_t, int64_t);
template void run_blocks<SGD, 1>(const Update&, int64_t, int64_t);
template void run_blocks<SGD, 2>(const Update&, int64_t, int64_t);
template void run_blocks<SGD, 3>(const Update&, int64_t, int64_t);
}  // namespace dist8
