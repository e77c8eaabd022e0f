// The CUDA backend of the SAE ops: the kernels of sae_cuda.cuh, and sae.cpp's torch-op CSC.
#include "sae_cuda.cuh"

#include "../common/backend.h"

namespace fusedtrain {
namespace sae {

constexpr Kernels kCudaKernels{
    topk_cuda, column_cutoff_cuda, global_cutoff_cuda, count_kept_cuda, fill_kept_cuda, gather_rows_cuda, sampled_dot_cuda, segment_sum_cuda, csc_torch};

}  // namespace sae
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::sae::kCudaKernels)
