// Registers the ops as torch.ops.desmoe.* (TORCH_LIBRARY: schemas + CPU kernels; the CUDA kernels register
// themselves in the .cu files) and exposes build information through the pybind11 module desmoe.ops._C.
// Fake (meta) implementations live in Python (one per op under desmoe/ops/, registered by the loader
// desmoe/ops/extension.py), the module named by set_python_module so that
// torch.compile imports it on demand.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "desmoe.h"

#ifdef DESMOE_WITH_CUDA
namespace desmoe {
std::string cuda_build_arch_list();  // grad_mask.cu
std::string cuda_build_version();
}  // namespace desmoe
#endif

TORCH_LIBRARY(desmoe, m) {
  m.set_python_module("desmoe.ops.extension");
  m.def("mask_expert_grads_(Tensor(a!)[] grads, Tensor[] masks, float scale) -> ()");
  m.def("pair_mask(Tensor token_domains_T, Tensor topk_ids_LTK, Tensor domain_expert_mask_LME) -> Tensor");
  m.def(
      "routing_stats(Tensor topk_ids_LTK, Tensor token_domains_T, int num_domains, int num_experts, "
      "Tensor? topk_weights_LTK, Tensor? valid_T) -> (Tensor, Tensor, Tensor)");
  m.def("affinity_ema_(Tensor(a!) A_LME, Tensor counts_LME, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(desmoe, CPU, m) {
  m.impl("mask_expert_grads_", &desmoe::mask_expert_grads_cpu);
  m.impl("pair_mask", &desmoe::pair_mask_cpu);
  m.impl("routing_stats", &desmoe::routing_stats_cpu);
  m.impl("affinity_ema_", &desmoe::affinity_ema_cpu);
}

namespace {

std::string compiler_string() {
  std::string s;
#if defined(__clang__)
  s = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  s = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  s = "msvc " + std::to_string(_MSC_VER);
#else
  s = "unknown";
#endif
#ifdef DESMOE_WITH_CUDA
  s += "; nvcc " + desmoe::cuda_build_version();
#endif
  return s;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "desmoe C++/CUDA extension: ops are registered as torch.ops.desmoe.*";
#ifdef DESMOE_WITH_CUDA
  mod.attr("cuda") = true;
  mod.attr("cuda_arch_list") = desmoe::cuda_build_arch_list();
#else
  mod.attr("cuda") = false;
  mod.attr("cuda_arch_list") = "";
#endif
#ifdef _OPENMP
  mod.attr("openmp") = true;
#else
  mod.attr("openmp") = false;
#endif
  mod.attr("compiler") = compiler_string();
  mod.attr("ops") = pybind11::make_tuple("mask_expert_grads_", "pair_mask", "routing_stats", "affinity_ema_");
}
