// blocks_adam_cpu.cpp -- the block loops of the Adam family (Adam/AdamW, LAMB's phase 1, AdEMAMix).
#include "blocks_cpu.h"

namespace dist8 {
template void run_blocks<ADAM, 0>(const Update&, int64_t, int64_t);
template void run_blocks<LAMB, 0>(const Update&, int64_t, int64_t);
template void run_blocks<ADEMAMIX, 0>(const Update&, int64_t, int64_t);
}  // namespace dist8
