// mask_expert_grads_ on CUDA: every layer's expert gradients in ONE launch (multi-tensor apply).
//
// The grid enumerates (tensor, expert row, 64 KiB chunk) work items across all tensors; a per-tensor table
// (pointer, mask, row bytes, first block) is staged through pinned memory and copied asynchronously, so no
// host synchronisation. A block whose row is trainable (mask True) exits after one mask load: those rows are
// never read or written, hence bitwise unchanged. scale == 0 writes zero bytes without reading (exact zeros even
// over NaN/Inf); otherwise rows are scaled in the dtype's opmath (float, double for float64).
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <string>

#include "cuda_utils.cuh"

namespace desmoe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 64 * 1024;  // multiple of 16 * kThreads: chunk starts keep 16-byte alignment

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct TensorMeta {
  char* data;
  const bool* mask;
  int64_t row_bytes;
  int64_t chunks_per_row;
  int64_t block_begin;  // first global block index of this tensor
  int32_t dtype;
  int32_t vec_ok;  // data and row_bytes 16-byte aligned: uint4 path
};

template <typename T, typename Op>
__device__ __forceinline__ void scale_vec(uint4& v, Op op) {
  T* x = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(uint4) / sizeof(T)); ++i) x[i] = op(x[i]);
}

template <typename T>
__device__ __forceinline__ T scale_one(T x, double scale) {
  using opmath_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  return static_cast<T>(static_cast<opmath_t>(x) * static_cast<opmath_t>(scale));
}

template <typename T>
__device__ void scale_range(char* p, int64_t nbytes, bool vec, double scale) {
  if (vec) {
    uint4* v = reinterpret_cast<uint4*>(p);
    const int64_t n = nbytes / 16;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      uint4 x = v[i];
      scale_vec<T>(x, [scale](T a) { return scale_one<T>(a, scale); });
      v[i] = x;
    }
  } else {
    T* x = reinterpret_cast<T*>(p);
    const int64_t n = nbytes / static_cast<int64_t>(sizeof(T));
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = scale_one<T>(x[i], scale);
  }
}

__global__ void __launch_bounds__(kThreads)
    mask_grads_kernel(const TensorMeta* __restrict__ meta, int num_tensors, double scale) {
  const int64_t b = blockIdx.x;
  // Largest tensor index whose block_begin <= b (num_tensors is small; every thread reads the same entries).
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta[mid].block_begin <= b) lo = mid; else hi = mid - 1;
  }
  const TensorMeta m = meta[lo];
  const int64_t local = b - m.block_begin;
  const int64_t row = local / m.chunks_per_row;
  if (m.mask[row]) return;  // trainable expert: untouched
  const int64_t chunk = local % m.chunks_per_row;
  const int64_t begin = chunk * kChunkBytes;
  const int64_t nbytes = min(kChunkBytes, m.row_bytes - begin);
  char* p = m.data + row * m.row_bytes + begin;
  if (scale == 0.0) {
    if (m.vec_ok) {
      uint4* v = reinterpret_cast<uint4*>(p);
      const uint4 z = make_uint4(0u, 0u, 0u, 0u);
      for (int64_t i = threadIdx.x; i < nbytes / 16; i += blockDim.x) v[i] = z;
    } else {
      for (int64_t i = threadIdx.x; i < nbytes; i += blockDim.x) p[i] = 0;
    }
    return;
  }
  switch (m.dtype) {
    case kF32: scale_range<float>(p, nbytes, m.vec_ok, scale); break;
    case kF64: scale_range<double>(p, nbytes, m.vec_ok, scale); break;
    case kF16: scale_range<c10::Half>(p, nbytes, m.vec_ok, scale); break;
    case kBF16: scale_range<c10::BFloat16>(p, nbytes, m.vec_ok, scale); break;
    default: break;
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default:
      TORCH_CHECK(false, "desmoe: argument 'grads': dtype ", t,
                  " is not supported by the CUDA kernel (float32, float64, float16, bfloat16)");
  }
  return -1;
}

}  // namespace

void mask_expert_grads_cuda(at::TensorList grads, at::TensorList masks, double scale) {
  check_mask_grads_args(grads, masks, c10::DeviceType::CUDA);
  if (grads.empty()) return;
  const c10::Device device = grads[0].device();
  std::vector<TensorMeta> metas;
  int64_t blocks = 0;
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& g = grads[l];
    DESMOE_CHECK_ARG(g.device() == device, "grads", "grads[", l, "]: expected device ", device,
                     " (grads[0]), got ", g.device());
    if (g.numel() == 0) continue;
    TensorMeta m;
    m.data = static_cast<char*>(g.data_ptr());
    m.mask = masks[l].data_ptr<bool>();
    m.row_bytes = g.numel() / g.size(0) * g.element_size();
    m.chunks_per_row = ceil_div(m.row_bytes, kChunkBytes);
    m.block_begin = blocks;
    m.dtype = dtype_code(g.scalar_type());
    m.vec_ok = (reinterpret_cast<uintptr_t>(m.data) % 16 == 0) && (m.row_bytes % 16 == 0);
    blocks += g.size(0) * m.chunks_per_row;
    metas.push_back(m);
  }
  if (metas.empty()) return;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "desmoe: mask_expert_grads_: too many work items (", blocks, ")");
  c10::cuda::CUDAGuard guard(device);
  const int64_t meta_bytes = static_cast<int64_t>(metas.size() * sizeof(TensorMeta));
  at::Tensor host = at::empty({meta_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), metas.data(), meta_bytes);
  // Pinned + non_blocking: the caching host allocator keeps the buffer alive until the copy has run.
  at::Tensor dev = host.to(device, at::kByte, /*non_blocking=*/true);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  mask_grads_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream.stream()>>>(
      reinterpret_cast<const TensorMeta*>(dev.data_ptr()), static_cast<int>(metas.size()), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DESMOE_STR2(x) #x
#define DESMOE_STR(x) DESMOE_STR2(x)

std::string cuda_build_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return DESMOE_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

std::string cuda_build_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

}  // namespace desmoe

TORCH_LIBRARY_IMPL(desmoe, CUDA, m) {
  m.impl("mask_expert_grads_", &desmoe::mask_expert_grads_cuda);
}
