/* Stand-in for <cuda_fp16.h> under gncodegen's host emulation of CUDA. */
#include "gn_cuda_emulation.h"
