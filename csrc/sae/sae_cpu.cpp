// The CPU backend of the SAE ops: the kernels of sae_cpu.h.
#include "sae_cpu.h"

#include "../common/backend.h"

namespace fusedtrain {
namespace sae {

constexpr Kernels kCpuKernels{
    topk_cpu, column_cutoff_cpu, global_cutoff_cpu, count_kept_cpu, fill_kept_cpu, gather_rows_cpu, sampled_dot_cpu, segment_sum_cpu, csc_cpu};

}  // namespace sae
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::sae::kCpuKernels)
