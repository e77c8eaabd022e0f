// The `fusedtrain._C` Python module. It holds no functions of its own: importing it loads this
// shared library, whose static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks register the
// `torch.ops.fusedtrain.*` schemas and kernels. Plain C API under Py_LIMITED_API, so one abi3 wheel
// serves every CPython >= 3.10 of a given torch version.
#include <Python.h>

static struct PyModuleDef fusedtrain_module = {
    PyModuleDef_HEAD_INIT, "_C", "fusedtrain compiled kernels (ops live in torch.ops.fusedtrain)", -1,
    nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusedtrain_module); }
