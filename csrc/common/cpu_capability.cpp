// `torch.ops.fusedtrain._cpu_capability()`: which vector paths the CPU kernels take ("avx2" or
// "default"), so `python -m fusedtrain info` and the tests can tell (see cpu/isa.h).
#include "cpu/isa.h"

#include <torch/library.h>

#include <string>

namespace {

std::string cpu_capability() { return fusedtrain::cpu::cpu_has_avx2() ? "avx2" : "default"; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def("_cpu_capability() -> str", &cpu_capability);
}
