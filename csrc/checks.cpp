// Argument checks shared by the CPU and CUDA implementations: every input is checked for device, dtype,
// contiguity and shape, with a message naming the argument.
#include "desmoe.h"

namespace desmoe {
namespace {

bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt;
}

void check_device(const at::Tensor& t, const char* name, c10::DeviceType device) {
  DESMOE_CHECK_ARG(t.device().type() == device, name, "expected a ", c10::DeviceTypeName(device),
                   " tensor, got one on ", t.device());
}

}  // namespace

void check_pair_mask_args(const at::Tensor& token_domains_T, const at::Tensor& topk_ids_LTK,
                          const at::Tensor& mask_LME, c10::DeviceType device) {
  check_device(token_domains_T, "token_domains_T", device);
  check_device(topk_ids_LTK, "topk_ids_LTK", device);
  check_device(mask_LME, "domain_expert_mask_LME", device);
  DESMOE_CHECK_ARG(token_domains_T.dim() == 1, "token_domains_T", "expected shape [T], got ",
                   token_domains_T.sizes());
  DESMOE_CHECK_ARG(is_index_dtype(token_domains_T), "token_domains_T", "expected int32 or int64, got ",
                   token_domains_T.scalar_type());
  DESMOE_CHECK_ARG(topk_ids_LTK.dim() == 3, "topk_ids_LTK", "expected shape [L, T, K], got ",
                   topk_ids_LTK.sizes());
  DESMOE_CHECK_ARG(is_index_dtype(topk_ids_LTK), "topk_ids_LTK", "expected int32 or int64, got ",
                   topk_ids_LTK.scalar_type());
  DESMOE_CHECK_ARG(topk_ids_LTK.size(1) == token_domains_T.size(0), "topk_ids_LTK",
                   "expected T = ", token_domains_T.size(0), " tokens (token_domains_T), got shape ",
                   topk_ids_LTK.sizes());
  DESMOE_CHECK_ARG(mask_LME.scalar_type() == at::kBool, "domain_expert_mask_LME", "expected bool, got ",
                   mask_LME.scalar_type());
  DESMOE_CHECK_ARG(mask_LME.dim() == 2 || mask_LME.dim() == 3, "domain_expert_mask_LME",
                   "expected shape [M, E] or [L, M, E], got ", mask_LME.sizes());
  if (mask_LME.dim() == 3) {
    DESMOE_CHECK_ARG(mask_LME.size(0) == topk_ids_LTK.size(0), "domain_expert_mask_LME", "expected L = ",
                     topk_ids_LTK.size(0), " layers (topk_ids_LTK), got shape ", mask_LME.sizes());
  }
  DESMOE_CHECK_ARG(token_domains_T.is_contiguous(), "token_domains_T", "expected a contiguous tensor");
  DESMOE_CHECK_ARG(topk_ids_LTK.is_contiguous(), "topk_ids_LTK", "expected a contiguous tensor");
  DESMOE_CHECK_ARG(mask_LME.is_contiguous(), "domain_expert_mask_LME", "expected a contiguous tensor");
}

void check_routing_stats_args(const at::Tensor& topk_ids_LTK, const at::Tensor& token_domains_T, int64_t M,
                              int64_t E, const c10::optional<at::Tensor>& topk_weights_LTK,
                              const c10::optional<at::Tensor>& valid_T, c10::DeviceType device) {
  check_device(topk_ids_LTK, "topk_ids_LTK", device);
  check_device(token_domains_T, "token_domains_T", device);
  DESMOE_CHECK_ARG(M >= 1, "num_domains", "expected >= 1, got ", M);
  DESMOE_CHECK_ARG(E >= 1, "num_experts", "expected >= 1, got ", E);
  DESMOE_CHECK_ARG(topk_ids_LTK.dim() == 3, "topk_ids_LTK", "expected shape [L, T, K], got ",
                   topk_ids_LTK.sizes());
  DESMOE_CHECK_ARG(is_index_dtype(topk_ids_LTK), "topk_ids_LTK", "expected int32 or int64, got ",
                   topk_ids_LTK.scalar_type());
  DESMOE_CHECK_ARG(topk_ids_LTK.is_contiguous(), "topk_ids_LTK", "expected a contiguous tensor");
  DESMOE_CHECK_ARG(token_domains_T.dim() == 1 && token_domains_T.size(0) == topk_ids_LTK.size(1),
                   "token_domains_T", "expected shape [T] with T = ", topk_ids_LTK.size(1),
                   " (topk_ids_LTK), got ", token_domains_T.sizes());
  DESMOE_CHECK_ARG(is_index_dtype(token_domains_T), "token_domains_T", "expected int32 or int64, got ",
                   token_domains_T.scalar_type());
  DESMOE_CHECK_ARG(token_domains_T.is_contiguous(), "token_domains_T", "expected a contiguous tensor");
  if (topk_weights_LTK.has_value()) {
    const at::Tensor& w = *topk_weights_LTK;
    check_device(w, "topk_weights_LTK", device);
    DESMOE_CHECK_ARG(w.sizes() == topk_ids_LTK.sizes(), "topk_weights_LTK", "expected shape ",
                     topk_ids_LTK.sizes(), " (topk_ids_LTK), got ", w.sizes());
    DESMOE_CHECK_ARG(w.scalar_type() == at::kFloat, "topk_weights_LTK", "expected float32, got ",
                     w.scalar_type());
    DESMOE_CHECK_ARG(w.is_contiguous(), "topk_weights_LTK", "expected a contiguous tensor");
  }
  if (valid_T.has_value()) {
    const at::Tensor& v = *valid_T;
    check_device(v, "valid_T", device);
    DESMOE_CHECK_ARG(v.dim() == 1 && v.size(0) == topk_ids_LTK.size(1), "valid_T", "expected shape [T] with T = ",
                     topk_ids_LTK.size(1), ", got ", v.sizes());
    DESMOE_CHECK_ARG(v.scalar_type() == at::kBool, "valid_T", "expected bool, got ", v.scalar_type());
    DESMOE_CHECK_ARG(v.is_contiguous(), "valid_T", "expected a contiguous tensor");
  }
}

void check_mask_grads_args(at::TensorList grads, at::TensorList masks,
                           c10::DeviceType device) {
  DESMOE_CHECK_ARG(grads.size() == masks.size(), "masks", "expected one mask per gradient (",
                   grads.size(), "), got ", masks.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& g = grads[l];
    const at::Tensor& m = masks[l];
    DESMOE_CHECK_ARG(g.device().type() == device, "grads", "grads[", l, "]: expected a ",
                     c10::DeviceTypeName(device), " tensor, got one on ", g.device());
    DESMOE_CHECK_ARG(g.dim() >= 1, "grads", "grads[", l, "]: expected shape [E, ...], got a 0-d tensor");
    DESMOE_CHECK_ARG(at::isFloatingType(g.scalar_type()), "grads", "grads[", l,
                     "]: expected a floating dtype, got ", g.scalar_type());
    DESMOE_CHECK_ARG(g.is_contiguous(), "grads", "grads[", l, "]: expected a contiguous tensor");
    DESMOE_CHECK_ARG(m.device() == g.device(), "masks", "masks[", l, "]: expected device ", g.device(),
                     " (grads[", l, "]), got ", m.device());
    DESMOE_CHECK_ARG(m.scalar_type() == at::kBool, "masks", "masks[", l, "]: expected bool, got ",
                     m.scalar_type());
    DESMOE_CHECK_ARG(m.dim() == 1 && m.size(0) == g.size(0), "masks", "masks[", l, "]: expected shape [",
                     g.size(0), "] (grads[", l, "].shape[0]), got ", m.sizes());
    DESMOE_CHECK_ARG(m.is_contiguous(), "masks", "masks[", l, "]: expected a contiguous tensor");
  }
}

void check_affinity_args(const at::Tensor& A_LME, const at::Tensor& counts_LME, double momentum,
                         c10::DeviceType device) {
  check_device(A_LME, "A_LME", device);
  check_device(counts_LME, "counts_LME", device);
  DESMOE_CHECK_ARG(A_LME.scalar_type() == at::kFloat || A_LME.scalar_type() == at::kDouble, "A_LME",
                   "expected float32 or float64, got ", A_LME.scalar_type());
  DESMOE_CHECK_ARG(A_LME.dim() == 3, "A_LME", "expected shape [L, M, E], got ", A_LME.sizes());
  DESMOE_CHECK_ARG(A_LME.is_contiguous(), "A_LME", "expected a contiguous tensor");
  DESMOE_CHECK_ARG(counts_LME.scalar_type() == at::kLong, "counts_LME", "expected int64, got ",
                   counts_LME.scalar_type());
  DESMOE_CHECK_ARG(counts_LME.sizes() == A_LME.sizes(), "counts_LME", "expected shape ", A_LME.sizes(),
                   " (A_LME), got ", counts_LME.sizes());
  DESMOE_CHECK_ARG(counts_LME.is_contiguous(), "counts_LME", "expected a contiguous tensor");
  DESMOE_CHECK_ARG(momentum >= 0.0 && momentum <= 1.0, "momentum", "expected a value in [0, 1], got ",
                   momentum);
}

}  // namespace desmoe
