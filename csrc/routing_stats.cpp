// routing_stats and affinity_ema_ on CPU.
//
// routing_stats: per layer l, over valid tokens t (valid_T[t], default all) and their K selections e:
//   load[l, e]         += 1                      (every valid token)
//   counts[l, dom, e]  += 1, mass[l, dom, e] += w (valid tokens with dom >= 0)
// Integer counts and 32.32 fixed-point mass make the result independent of the thread split, and equal bitwise
// to the CUDA kernel's.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

#include "desmoe.h"

namespace desmoe {

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_stats_cpu(
    const at::Tensor& topk_ids_LTK, const at::Tensor& token_domains_T, int64_t M, int64_t E,
    const c10::optional<at::Tensor>& topk_weights_LTK, const c10::optional<at::Tensor>& valid_T) {
  check_routing_stats_args(topk_ids_LTK, token_domains_T, M, E, topk_weights_LTK, valid_T,
                           c10::DeviceType::CPU);
  const int64_t L = topk_ids_LTK.size(0), T = topk_ids_LTK.size(1), K = topk_ids_LTK.size(2);
  auto opts = topk_ids_LTK.options().dtype(at::kLong);
  at::Tensor counts_LME = at::zeros({L, M, E}, opts);
  at::Tensor mass_fixed_LME = at::zeros({L, M, E}, opts);
  at::Tensor load_LE = at::zeros({L, E}, opts);
  if (L * T * K > 0) {
    const float* w = topk_weights_LTK.has_value() ? topk_weights_LTK->data_ptr<float>() : nullptr;
    const bool* valid = valid_T.has_value() ? valid_T->data_ptr<bool>() : nullptr;
    int64_t* counts = counts_LME.data_ptr<int64_t>();
    int64_t* mass = mass_fixed_LME.data_ptr<int64_t>();
    int64_t* load = load_LE.data_ptr<int64_t>();
    AT_DISPATCH_INDEX_TYPES(topk_ids_LTK.scalar_type(), "routing_stats_cpu", [&] {
      const index_t* ids = topk_ids_LTK.data_ptr<index_t>();
      using id_t = index_t;
      AT_DISPATCH_INDEX_TYPES(token_domains_T.scalar_type(), "routing_stats_cpu_domains", [&] {
        const index_t* dom = token_domains_T.data_ptr<index_t>();
        // Layers write disjoint slices of the outputs: parallel over layers, no atomics; threads only for
        // >= 256K pairs per task (waking OpenMP workers costs more than a small layer's loop).
        const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, T * K));
        at::parallel_for(0, L, grain, [&](int64_t lo, int64_t hi) {
          for (int64_t l = lo; l < hi; ++l) {
            for (int64_t t = 0; t < T; ++t) {
              if (valid != nullptr && !valid[t]) continue;
              const int64_t d = static_cast<int64_t>(dom[t]);
              TORCH_CHECK(d < M, "desmoe: argument 'token_domains_T': domain id ", d, " at token ", t,
                          " is out of range for num_domains = ", M);
              for (int64_t k = 0; k < K; ++k) {
                const int64_t i = (l * T + t) * K + k;
                const int64_t e = static_cast<int64_t>(ids[i]);
                TORCH_CHECK(e >= 0 && e < E, "desmoe: argument 'topk_ids_LTK': expert id ", e, " at [", l, ", ",
                            t, ", ", k, "] is out of range [0, ", E, ")");
                load[l * E + e] += 1;
                if (d < 0) continue;
                counts[(l * M + d) * E + e] += 1;
                if (w != nullptr) {
                  mass[(l * M + d) * E + e] += static_cast<int64_t>(std::nearbyint(static_cast<double>(w[i]) * kMassScale));
                }
              }
            }
          }
        });
      });
    });
  }
  at::Tensor mass_LME = mass_fixed_LME.to(at::kDouble).div_(kMassScale).to(at::kFloat);
  return {counts_LME, mass_LME, load_LE};
}

void affinity_ema_cpu(const at::Tensor& A_LME, const at::Tensor& counts_LME, double momentum) {
  check_affinity_args(A_LME, counts_LME, momentum, c10::DeviceType::CPU);
  const int64_t rows = A_LME.size(0) * A_LME.size(1), E = A_LME.size(2);
  if (rows * E == 0) return;
  const int64_t* counts = counts_LME.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(A_LME.scalar_type(), "affinity_ema_cpu", [&] {
    scalar_t* A = A_LME.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / E), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t* c = counts + r * E;
        int64_t total = 0;
        for (int64_t e = 0; e < E; ++e) total += c[e];
        if (total == 0) continue;  // no evidence this step: keep the row
        const double total_d = static_cast<double>(total);
        scalar_t* a = A + r * E;
        for (int64_t e = 0; e < E; ++e) {
          a[e] = static_cast<scalar_t>(momentum * static_cast<double>(a[e]) +
                                       (1.0 - momentum) * (static_cast<double>(c[e]) / total_d));
        }
      }
    });
  });
}

}  // namespace desmoe
