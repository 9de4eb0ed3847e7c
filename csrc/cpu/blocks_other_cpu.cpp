// blocks_other_cpu.cpp -- the block loops of RMSprop (with and without momentum), Adagrad and Lion.
#include "blocks_cpu.h"

namespace dist8 {
template void run_blocks<RMSPROP, 0>(const Update&, int64_t, int64_t);
template void run_blocks<RMSPROP_MOMENTUM, 0>(const Update&, int64_t, int64_t);
template void run_blocks<ADAGRAD, 0>(const Update&, int64_t, int64_t);
template void run_blocks<LION, 0>(const Update&, int64_t, int64_t);
}  // namespace dist8
