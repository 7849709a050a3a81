// mask_expert_grads_ on CPU: rows e of grads[l] ([E, ...]) whose masks[l][e] is False are zeroed (scale == 0,
// exact zeros even over NaN/Inf) or multiplied by `scale`; rows whose mask is True are never touched.
#include <ATen/Parallel.h>

#include <cstring>

#include "desmoe.h"

namespace desmoe {
namespace {

// Rows are split into chunks so one huge masked row still spreads over all threads.
constexpr int64_t kChunkElems = 1 << 16;

struct WorkItem {
  int64_t layer;
  int64_t row;
  int64_t begin;  // element offset within the row
  int64_t end;
};

}  // namespace

void mask_expert_grads_cpu(at::TensorList grads, at::TensorList masks, double scale) {
  check_mask_grads_args(grads, masks, c10::DeviceType::CPU);
  if (scale != 0.0) {
    // Scaling: ATen's own vectorised (and internally parallel) mul_ on each frozen row's view — the same
    // arithmetic as PyTorch's `g[e] *= scale`, opmath float for half/bfloat16.
    for (size_t l = 0; l < grads.size(); ++l) {
      const at::Tensor& g = grads[l];
      const bool* mask = masks[l].data_ptr<bool>();
      for (int64_t e = 0; e < g.size(0); ++e) {
        if (!mask[e]) g.select(0, e).mul_(scale);
      }
    }
    return;
  }
  std::vector<WorkItem> items;
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& g = grads[l];
    const int64_t E = g.size(0);
    if (g.numel() == 0) continue;
    const int64_t row_elems = g.numel() / E;
    const bool* mask = masks[l].data_ptr<bool>();
    for (int64_t e = 0; e < E; ++e) {
      if (mask[e]) continue;
      for (int64_t b = 0; b < row_elems; b += kChunkElems) {
        items.push_back({static_cast<int64_t>(l), e, b, std::min(b + kChunkElems, row_elems)});
      }
    }
  }
  if (items.empty()) return;
  // All-zero bytes are +0.0 in every IEEE float format: no read, no NaN propagation.
  // Grain of 16 chunks (>= 1 MiB): small jobs stay on one thread, where waking OpenMP workers costs more.
  at::parallel_for(0, static_cast<int64_t>(items.size()), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const WorkItem& w = items[i];
      const at::Tensor& g = grads[w.layer];
      const int64_t row_elems = g.numel() / g.size(0);
      char* base = static_cast<char*>(g.data_ptr()) + (w.row * row_elems + w.begin) * g.element_size();
      std::memset(base, 0, static_cast<size_t>((w.end - w.begin) * g.element_size()));
    }
  });
}

}  // namespace desmoe
