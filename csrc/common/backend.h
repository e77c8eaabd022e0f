// How a family's backends are bound to its device-independent driver.
//
// A family declares one plain struct of kernel function pointers, `Kernels`, with a static
// `impl_ops(torch::Library&)` that its driver (<family>.cpp) defines as the m.impl calls of its ops.
// Each backend file (<family>_cpu.cpp, <family>_cuda.cu) fills one table and registers it:
//
//   constexpr Kernels kCpuKernels{rows_cpu, scale_cpu};      // in the family's namespace
//   FT_REGISTER_BACKEND(CPU, fusedtrain::spherical::kCpuKernels)  // at global scope
//
// which stores the table for that device and registers the driver's ops under the device's
// dispatch key, so a build without the CUDA file has no CUDA kernels for any op. The driver checks
// its arguments, then takes the table of its tensors' device: `backend<Kernels>(tensor).rows(...)`.
// The tables live in function-local statics: a backend's static registration never reads
// another translation unit's globals, and the ops run only after every registration.
#pragma once

#include "checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace fusedtrain {

namespace detail {

template <typename Kernels>
struct BackendTables {
  Kernels cpu{}, cuda{};
  bool has_cpu = false, has_cuda = false;
};

template <typename Kernels>
BackendTables<Kernels>& backend_tables() {
  static BackendTables<Kernels> tables;
  return tables;
}

}  // namespace detail

// Stores `kernels` as the family's kernels on `device` and registers the family's ops in `m`
// (a TORCH_LIBRARY_IMPL block of that device's dispatch key).
template <typename Kernels>
void register_backend(torch::Library& m, c10::DeviceType device, const Kernels& kernels) {
  auto& tables = detail::backend_tables<Kernels>();
  if (device == c10::DeviceType::CUDA) {
    tables.cuda = kernels;
    tables.has_cuda = true;
  } else {
    tables.cpu = kernels;
    tables.has_cpu = true;
  }
  Kernels::impl_ops(m);
}

// The family's kernels for tensors on `device`.
template <typename Kernels>
const Kernels& backend(const c10::Device& device) {
  const auto& tables = detail::backend_tables<Kernels>();
  const bool cuda = device.is_cuda();
  FT_CHECK(cuda ? tables.has_cuda : (device.is_cpu() && tables.has_cpu), "fusedtrain has no kernels for ",
           device, " tensors in this build");
  return cuda ? tables.cuda : tables.cpu;
}

template <typename Kernels>
const Kernels& backend(const at::Tensor& t) {
  return backend<Kernels>(t.device());
}

// For the scope of an op: makes `t`'s device the current one when it is a CUDA tensor (what
// c10::cuda::CUDAGuard does), nothing for a CPU tensor.
class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor& t) {
    if (t.is_cuda()) guard_.reset_device(t.device());
  }

 private:
  c10::OptionalDeviceGuard guard_;
};

}  // namespace fusedtrain

// Registers a backend's table (a constant of type <family>::Kernels) for DEVICE (CPU or CUDA).
#define FT_REGISTER_BACKEND(DEVICE, TABLE)                                           \
  TORCH_LIBRARY_IMPL(fusedtrain, DEVICE, m) {                                        \
    ::fusedtrain::register_backend(m, c10::DeviceType::DEVICE, TABLE);               \
  }
