// desmoe C++/CUDA extension: shared declarations and argument checks.
//
// Ops (schemas in bindings.cpp, registered as torch.ops.desmoe.*):
//   mask_expert_grads_(Tensor(a!)[] grads, Tensor[] masks, float scale) -> ()
//   pair_mask(Tensor token_domains_T, Tensor topk_ids_LTK, Tensor mask_LME) -> Tensor   bool [L, T, K]
//   routing_stats(Tensor topk_ids_LTK, Tensor token_domains_T, int M, int E, Tensor? topk_weights_LTK,
//                 Tensor? valid_T) -> (Tensor counts_LME, Tensor mass_LME, Tensor load_LE)
//   affinity_ema_(Tensor(a!) A_LME, Tensor counts_LME, float momentum) -> ()
//
// Routing mass is accumulated in 32.32 fixed point (int64) on CPU and CUDA alike: integer addition is
// associative, so the result does not depend on thread/block scheduling, CPU and CUDA agree bitwise, and the
// fixed-point partials are exactly all-reducible across ranks before the final conversion to float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace desmoe {

// 2^32: one unit of routing mass in fixed point.
constexpr double kMassScale = 4294967296.0;

#define DESMOE_CHECK_ARG(cond, name, ...) TORCH_CHECK((cond), "desmoe: argument '", name, "': ", __VA_ARGS__)

// Validates the shared shape/dtype contract of pair_mask; returns nothing, throws on bad input.
void check_pair_mask_args(const at::Tensor& token_domains_T, const at::Tensor& topk_ids_LTK,
                          const at::Tensor& mask_LME, c10::DeviceType device);
void check_routing_stats_args(const at::Tensor& topk_ids_LTK, const at::Tensor& token_domains_T, int64_t M,
                              int64_t E, const c10::optional<at::Tensor>& topk_weights_LTK,
                              const c10::optional<at::Tensor>& valid_T, c10::DeviceType device);
void check_mask_grads_args(at::TensorList grads, at::TensorList masks,
                           c10::DeviceType device);
void check_affinity_args(const at::Tensor& A_LME, const at::Tensor& counts_LME, double momentum,
                         c10::DeviceType device);

// CPU kernels (csrc/*.cpp).
void mask_expert_grads_cpu(at::TensorList grads, at::TensorList masks, double scale);
at::Tensor pair_mask_cpu(const at::Tensor& token_domains_T, const at::Tensor& topk_ids_LTK,
                         const at::Tensor& mask_LME);
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_stats_cpu(
    const at::Tensor& topk_ids_LTK, const at::Tensor& token_domains_T, int64_t M, int64_t E,
    const c10::optional<at::Tensor>& topk_weights_LTK, const c10::optional<at::Tensor>& valid_T);
void affinity_ema_cpu(const at::Tensor& A_LME, const at::Tensor& counts_LME, double momentum);

}  // namespace desmoe
