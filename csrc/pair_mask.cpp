// pair_mask on CPU: pair[l, t, k] = mask[l, dom[t], ids[l, t, k]] for every layer in one call; dom < 0
// (padding / unlabelled token) gives False. Out-of-range ids or domains raise, naming the position.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "desmoe.h"

namespace desmoe {

at::Tensor pair_mask_cpu(const at::Tensor& token_domains_T, const at::Tensor& topk_ids_LTK,
                         const at::Tensor& mask_LME) {
  check_pair_mask_args(token_domains_T, topk_ids_LTK, mask_LME, c10::DeviceType::CPU);
  const int64_t L = topk_ids_LTK.size(0), T = topk_ids_LTK.size(1), K = topk_ids_LTK.size(2);
  const int64_t M = mask_LME.size(-2), E = mask_LME.size(-1);
  // A [M, E] mask is shared by every layer: layer stride 0.
  const int64_t mask_stride_L = mask_LME.dim() == 3 ? M * E : 0;
  at::Tensor out_LTK = at::empty({L, T, K}, topk_ids_LTK.options().dtype(at::kBool));
  if (out_LTK.numel() == 0) return out_LTK;
  const bool* mask = mask_LME.data_ptr<bool>();
  bool* out = out_LTK.data_ptr<bool>();
  AT_DISPATCH_INDEX_TYPES(topk_ids_LTK.scalar_type(), "pair_mask_cpu", [&] {
    const index_t* ids = topk_ids_LTK.data_ptr<index_t>();
    using id_t = index_t;
    AT_DISPATCH_INDEX_TYPES(token_domains_T.scalar_type(), "pair_mask_cpu_domains", [&] {
      const index_t* dom = token_domains_T.data_ptr<index_t>();
      // Threads only for >= 64K pairs per task: below that, waking OpenMP workers costs more than the loop.
      at::parallel_for(0, L * T, std::max<int64_t>(256, 65536 / K), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t l = i / T, t = i % T;
          const int64_t d = static_cast<int64_t>(dom[t]);
          const id_t* ids_K = ids + i * K;
          bool* out_K = out + i * K;
          TORCH_CHECK(d < M, "desmoe: argument 'token_domains_T': domain id ", d, " at token ", t,
                      " is out of range for a mask with M = ", M, " domains");
          if (d < 0) {
            for (int64_t k = 0; k < K; ++k) out_K[k] = false;
            continue;
          }
          const bool* row = mask + l * mask_stride_L + d * E;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t e = static_cast<int64_t>(ids_K[k]);
            TORCH_CHECK(e >= 0 && e < E, "desmoe: argument 'topk_ids_LTK': expert id ", e, " at [", l, ", ", t,
                        ", ", k, "] is out of range [0, ", E, ")");
            out_K[k] = row[e];
          }
        }
      });
    });
  });
  return out_LTK;
}

}  // namespace desmoe
