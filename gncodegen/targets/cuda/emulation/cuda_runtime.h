/* Stand-in for <cuda_runtime.h> under gncodegen's host emulation of CUDA. */
#include "gn_cuda_emulation.h"
