// Launch constants and device queries shared by the CUDA kernels. Kernel launches are checked with
// C10_CUDA_KERNEL_LAUNCH_CHECK() right after the launch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace fusedtrain {
namespace cuda {

// Threads of a block in the block-per-row kernels; the block-wide helpers of reduce.cuh and
// sort.cuh are written for this block size.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int multiprocessor_count(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, device);
}

inline int max_shared_memory_per_block(int device) {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

}  // namespace cuda
}  // namespace fusedtrain
