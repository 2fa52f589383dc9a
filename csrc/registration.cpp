// The exgrpo_native op library: schemas (the dispatcher's contract), and the Python module stub that lets
// `import exgrpo_kernels._C` load this shared object (its static initialisers register the ops).
// CPU kernels: rows.cpp, pack.cpp. CUDA implementations (the Triton kernels) and, when this library is not built,
// the schemas and torch-twin CPU implementations are registered from Python: kernels/_native.py, whose SCHEMAS
// must equal the strings below (tests/test_native.py checks).
#include <Python.h>
#include <torch/library.h>

#include "isa.h"

TORCH_LIBRARY(exgrpo_native, m) {
  m.def("row_stats(Tensor z, Tensor t, float inv_tau, float pre, float cap, bool with_entropy) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("row_grad_(Tensor z, Tensor t, Tensor lse, Tensor? ent, Tensor c_l, Tensor? c_h, float inv_tau, float pre, "
        "float cap, int col0, Tensor(a!) out) -> ()");
  m.def("row_stats_grad_(Tensor(a!) z, Tensor t, Tensor c_l, float inv_tau, float pre, float cap) -> "
        "(Tensor, Tensor)");
  m.def("grpo_token_rows_(Tensor(a!) z, Tensor t, Tensor sid, Tensor adv, Tensor w_seq, Tensor? seq_isw, "
        "Tensor? old, Tensor? ref, Tensor? gen, Tensor? ext, float inv_tau, float pre, float cap, float eps_low, "
        "float eps_high, float delta, float beta, float is_cap, int kl_est, int is_mode, bool with_entropy, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("pack(Tensor tokens, Tensor cu, Tensor? token_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "exgrpo_native ops (CPU); see kernels/_native.py", -1,
                            nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m != nullptr && (PyModule_AddStringConstant(m, "ISA", exgrpo_native::cpu_isa()) != 0 ||
                       PyModule_AddStringConstant(m, "ISA_ERROR", exgrpo_native::isa_error()) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
