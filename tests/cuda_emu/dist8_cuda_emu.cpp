// The CUDA kernels of csrc/cuda/dist8_cuda.cu compiled as C++ with d8_cuda_emulation.h:
// registered as CPU ops in the `dist8_cuda_emu` namespace (tests/_cuda_emulation.py).
#define DIST8_CUDA_EMULATION 1
#include "../../csrc/cuda/dist8_cuda.cu"
