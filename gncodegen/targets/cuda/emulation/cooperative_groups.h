/* Stand-in for <cooperative_groups.h> under gncodegen's host emulation of CUDA. */
#include "gn_cuda_emulation.h"
