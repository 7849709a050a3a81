// routing_stats and affinity_ema_ on CUDA, on the current stream, without host synchronisation.
//
// routing_stats: grid (token chunks, layers). Each block builds its layer's histograms for its chunk in shared
// memory (when they fit; else it adds straight to global memory) and flushes them with 64-bit integer atomics.
// Counts are integers and mass is 32.32 fixed point, so the result is deterministic and bitwise equal to the CPU
// kernel's whatever the block schedule. Out-of-range ids/domains are skipped (desmoe.ext validates on request).
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace desmoe {
namespace {

constexpr int kStatsThreads = 256;
constexpr int64_t kTokensPerBlock = 1024;
constexpr int64_t kMaxSmemBytes = 32 * 1024;

using ull = unsigned long long;

template <typename id_t, typename dom_t, bool kShared>
__global__ void __launch_bounds__(kStatsThreads)
    routing_stats_kernel(const id_t* __restrict__ ids_LTK, const dom_t* __restrict__ dom_T,
                         const float* __restrict__ w_LTK, const bool* __restrict__ valid_T, ull* __restrict__ counts_LME,
                         ull* __restrict__ mass_LME, ull* __restrict__ load_LE, int64_t T, int64_t K, int64_t M,
                         int64_t E) {
  extern __shared__ ull smem[];
  const int64_t l = blockIdx.y;
  const int64_t ME = M * E;
  ull* counts = kShared ? smem : counts_LME + l * ME;
  ull* mass = kShared ? smem + ME : mass_LME + l * ME;
  ull* load = kShared ? smem + 2 * ME : load_LE + l * E;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < 2 * ME + E; i += blockDim.x) smem[i] = 0;
    __syncthreads();
  }
  const int64_t t0 = blockIdx.x * kTokensPerBlock;
  const int64_t t1 = min(T, t0 + kTokensPerBlock);
  for (int64_t p = t0 * K + threadIdx.x; p < t1 * K; p += blockDim.x) {
    const int64_t t = p / K;
    if (valid_T != nullptr && !valid_T[t]) continue;
    const int64_t d = static_cast<int64_t>(dom_T[t]);
    const int64_t i = l * T * K + p;
    const int64_t e = static_cast<int64_t>(ids_LTK[i]);
    if (e < 0 || e >= E || d >= M) continue;
    atomicAdd(load + e, ull{1});
    if (d < 0) continue;
    atomicAdd(counts + d * E + e, ull{1});
    if (w_LTK != nullptr) {
      const long long fixed = __double2ll_rn(static_cast<double>(w_LTK[i]) * kMassScale);
      atomicAdd(mass + d * E + e, static_cast<ull>(fixed));  // two's complement: negative weights work too
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < ME; j += blockDim.x) {
      if (counts[j] != 0) atomicAdd(counts_LME + l * ME + j, counts[j]);
      if (mass[j] != 0) atomicAdd(mass_LME + l * ME + j, mass[j]);
    }
    for (int64_t j = threadIdx.x; j < E; j += blockDim.x) {
      if (load[j] != 0) atomicAdd(load_LE + l * E + j, load[j]);
    }
  }
}

// One block per (layer, domain) row: integer row sum (deterministic), then the EMA in double.
template <typename scalar_t>
__global__ void affinity_ema_kernel(scalar_t* __restrict__ A, const int64_t* __restrict__ counts, int64_t E,
                                    double momentum) {
  __shared__ long long partial[256];
  const int64_t r = blockIdx.x;
  const int64_t* c = counts + r * E;
  long long s = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s += c[e];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const long long total = partial[0];
  if (total == 0) return;  // no evidence this step: keep the row
  const double total_d = static_cast<double>(total);
  scalar_t* a = A + r * E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    a[e] = static_cast<scalar_t>(__dadd_rn(__dmul_rn(momentum, static_cast<double>(a[e])),
                                           __dmul_rn(1.0 - momentum, __ddiv_rn(static_cast<double>(c[e]), total_d))));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_stats_cuda(
    const at::Tensor& topk_ids_LTK, const at::Tensor& token_domains_T, int64_t M, int64_t E,
    const c10::optional<at::Tensor>& topk_weights_LTK, const c10::optional<at::Tensor>& valid_T) {
  check_routing_stats_args(topk_ids_LTK, token_domains_T, M, E, topk_weights_LTK, valid_T,
                           c10::DeviceType::CUDA);
  const int64_t L = topk_ids_LTK.size(0), T = topk_ids_LTK.size(1), K = topk_ids_LTK.size(2);
  c10::cuda::CUDAGuard guard(topk_ids_LTK.device());
  auto opts = topk_ids_LTK.options().dtype(at::kLong);
  at::Tensor counts_LME = at::zeros({L, M, E}, opts);
  at::Tensor mass_fixed_LME = at::zeros({L, M, E}, opts);
  at::Tensor load_LE = at::zeros({L, E}, opts);
  if (L * T * K > 0) {
    TORCH_CHECK(L <= 65535, "desmoe: argument 'topk_ids_LTK': at most 65535 layers per call, got ", L);
    const float* w = topk_weights_LTK.has_value() ? topk_weights_LTK->data_ptr<float>() : nullptr;
    const bool* valid = valid_T.has_value() ? valid_T->data_ptr<bool>() : nullptr;
    const int64_t smem_bytes = (2 * M * E + E) * static_cast<int64_t>(sizeof(ull));
    const bool shared = smem_bytes <= kMaxSmemBytes;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kTokensPerBlock)), static_cast<unsigned>(L));
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto* counts = reinterpret_cast<ull*>(counts_LME.data_ptr<int64_t>());
    auto* mass = reinterpret_cast<ull*>(mass_fixed_LME.data_ptr<int64_t>());
    auto* load = reinterpret_cast<ull*>(load_LE.data_ptr<int64_t>());
    AT_DISPATCH_INDEX_TYPES(topk_ids_LTK.scalar_type(), "routing_stats_cuda", [&] {
      using id_t = index_t;
      AT_DISPATCH_INDEX_TYPES(token_domains_T.scalar_type(), "routing_stats_cuda_domains", [&] {
        const id_t* ids = topk_ids_LTK.data_ptr<id_t>();
        const index_t* dom = token_domains_T.data_ptr<index_t>();
        if (shared) {
          routing_stats_kernel<id_t, index_t, true><<<grid, kStatsThreads, smem_bytes, stream.stream()>>>(
              ids, dom, w, valid, counts, mass, load, T, K, M, E);
        } else {
          routing_stats_kernel<id_t, index_t, false><<<grid, kStatsThreads, 0, stream.stream()>>>(
              ids, dom, w, valid, counts, mass, load, T, K, M, E);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor mass_LME = mass_fixed_LME.to(at::kDouble).div_(kMassScale).to(at::kFloat);
  return {counts_LME, mass_LME, load_LE};
}

void affinity_ema_cuda(const at::Tensor& A_LME, const at::Tensor& counts_LME, double momentum) {
  check_affinity_args(A_LME, counts_LME, momentum, c10::DeviceType::CUDA);
  DESMOE_CHECK_ARG(counts_LME.device() == A_LME.device(), "counts_LME", "expected device ", A_LME.device(),
                   " (A_LME), got ", counts_LME.device());
  const int64_t rows = A_LME.size(0) * A_LME.size(1), E = A_LME.size(2);
  if (rows * E == 0) return;
  c10::cuda::CUDAGuard guard(A_LME.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(rows < (int64_t{1} << 31), "desmoe: argument 'A_LME': too many rows (", rows, ")");
  AT_DISPATCH_FLOATING_TYPES(A_LME.scalar_type(), "affinity_ema_cuda", [&] {
    affinity_ema_kernel<scalar_t><<<static_cast<unsigned>(rows), 256, 0, stream.stream()>>>(
        A_LME.data_ptr<scalar_t>(), counts_LME.data_ptr<int64_t>(), E, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace desmoe

TORCH_LIBRARY_IMPL(desmoe, CUDA, m) {
  m.impl("routing_stats", &desmoe::routing_stats_cuda);
  m.impl("affinity_ema_", &desmoe::affinity_ema_cuda);
}
