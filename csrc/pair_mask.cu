// pair_mask on CUDA: one thread per (layer, token, k) pair, all layers in one launch, no host sync.
// Out-of-range ids/domains cannot raise from device code without a sync; they yield False here (memory-safe),
// and desmoe.ext.pair_mask validates ranges on the host side unless told not to.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace desmoe {
namespace {

template <typename id_t, typename dom_t>
__global__ void pair_mask_kernel(const dom_t* __restrict__ dom_T, const id_t* __restrict__ ids_LTK,
                                 const bool* __restrict__ mask, bool* __restrict__ out_LTK, int64_t T, int64_t K,
                                 int64_t M, int64_t E, int64_t mask_stride_L, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t lt = i / K;
    const int64_t l = lt / T, t = lt % T;
    const int64_t d = static_cast<int64_t>(dom_T[t]);
    const int64_t e = static_cast<int64_t>(ids_LTK[i]);
    const bool ok = d >= 0 && d < M && e >= 0 && e < E;
    out_LTK[i] = ok ? mask[l * mask_stride_L + d * E + e] : false;
  }
}

}  // namespace

at::Tensor pair_mask_cuda(const at::Tensor& token_domains_T, const at::Tensor& topk_ids_LTK,
                          const at::Tensor& mask_LME) {
  check_pair_mask_args(token_domains_T, topk_ids_LTK, mask_LME, c10::DeviceType::CUDA);
  DESMOE_CHECK_ARG(token_domains_T.device() == topk_ids_LTK.device() && mask_LME.device() == topk_ids_LTK.device(),
                   "token_domains_T", "all inputs must be on one device, got ", token_domains_T.device(), ", ",
                   topk_ids_LTK.device(), ", ", mask_LME.device());
  const int64_t L = topk_ids_LTK.size(0), T = topk_ids_LTK.size(1), K = topk_ids_LTK.size(2);
  const int64_t M = mask_LME.size(-2), E = mask_LME.size(-1);
  const int64_t mask_stride_L = mask_LME.dim() == 3 ? M * E : 0;
  at::Tensor out_LTK = at::empty({L, T, K}, topk_ids_LTK.options().dtype(at::kBool));
  const int64_t n = out_LTK.numel();
  if (n == 0) return out_LTK;
  c10::cuda::CUDAGuard guard(topk_ids_LTK.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, threads), 65535 * 8));
  AT_DISPATCH_INDEX_TYPES(topk_ids_LTK.scalar_type(), "pair_mask_cuda", [&] {
    using id_t = index_t;
    AT_DISPATCH_INDEX_TYPES(token_domains_T.scalar_type(), "pair_mask_cuda_domains", [&] {
      pair_mask_kernel<id_t, index_t><<<blocks, threads, 0, stream.stream()>>>(
          token_domains_T.data_ptr<index_t>(), topk_ids_LTK.data_ptr<id_t>(), mask_LME.data_ptr<bool>(),
          out_LTK.data_ptr<bool>(), T, K, M, E, mask_stride_L, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out_LTK;
}

}  // namespace desmoe

TORCH_LIBRARY_IMPL(desmoe, CUDA, m) {
  m.impl("pair_mask", &desmoe::pair_mask_cuda);
}
