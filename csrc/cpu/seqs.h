// The two layouts of the long tensors (lara_ops.h) as the CPU ops walk them: the
// sequences of a batch (their rows, starts and lengths) and the tasks that cover them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace lara {
namespace cpu {

// The offsets of the packed layout as a pointer into cu_seqlens (B + 1 int32 on the CPU,
// already checked for shape and dtype by the shared checks), or nullptr for the padded
// layout. The values are checked here too (cu[0] = 0, non-decreasing, cu[B] = rows, the
// row count of the packed tensors): the CPU reads rows through them, and an offset past
// the tensor would read or write outside it. O(B), no copy.
inline const int32_t* packed_offsets(const char* op, const c10::optional<at::Tensor>& cu_seqlens, int64_t rows) {
  if (!cu_seqlens.has_value()) return nullptr;
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.device().is_cpu(), op, " (CPU): cu_seqlens must be a CPU tensor, got ", cu.device());
  const int32_t* p = cu.data_ptr<int32_t>();
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(p[0] == 0, op, ": cu_seqlens[0] must be 0, got ", p[0]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b + 1] >= p[b], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", p[b],
                " > cu_seqlens[", b + 1, "] = ", p[b + 1]);
  TORCH_CHECK(p[B] == rows, op, ": cu_seqlens[", B, "] = ", p[B], " must be the number of rows T = ", rows);
  return p;
}

// Sequence b of a batch: rows start(b) .. start(b) + len(b) - 1 of the long axis. Padded
// layout: every element has the L rows of its own (b, h) slice, start 0, and pad (B, L)
// marks the padded ones; packed: rows cu[b] .. cu[b + 1] - 1 of the (T, H, D) tensor.
struct Seqs {
  int64_t B = 0, H = 0, L = 0;  // L: rows per element (padded), T (packed)
  const int32_t* cu = nullptr;
  const bool* pad = nullptr;    // padded: (B, L) row-major, or nullptr

  bool packed() const { return cu != nullptr; }
  int64_t start(int64_t b) const { return cu != nullptr ? cu[b] : 0; }
  int64_t len(int64_t b) const { return cu != nullptr ? int64_t(cu[b + 1]) - cu[b] : L; }
  // the padding flags of b's rows (indexed from its row 0), or nullptr
  const bool* pad_rows(int64_t b) const { return pad != nullptr ? pad + b * L : nullptr; }

  // Row 0 of (b, h) in an input x of this layout, (B, H, L, W) or (T, H, W) with any
  // strides; rows of the sequence are s_row apart, columns s_col.
  template <typename S>
  struct In {
    const S* p;
    int64_t s_row, s_col;
  };
  template <typename S>
  In<S> in(const at::Tensor& x, int64_t b, int64_t h) const {
    const S* base = x.data_ptr<S>();
    if (packed()) return {base + start(b) * x.stride(0) + h * x.stride(1), x.stride(0), x.stride(2)};
    return {base + b * x.stride(0) + h * x.stride(1), x.stride(2), x.stride(3)};
  }
  // Row 0 of (b, h) in a contiguous output of this layout with rows W wide, and the
  // distance between the rows of the sequence (ld).
  template <typename S>
  S* out(S* base, int64_t W, int64_t b, int64_t h, int64_t& ld) const {
    if (packed()) {
      ld = H * W;
      return base + (start(b) * H + h) * W;
    }
    ld = W;
    return base + (b * H + h) * L * W;
  }
};

// The tasks of an op: chunk g of the batch belongs to element owner[g] and is its chunk
// g - first[owner[g]]; element b has chunks first[b] .. first[b + 1] - 1 (possibly none).
// Each chunk runs once per head: task t is chunk t / H of head t % H, and its partial
// results sit at index t (so partials of (b, h) are H apart, in chunk order).
struct Chunks {
  std::vector<int64_t> first, owner;
  int64_t total() const { return first.back(); }
  int64_t count(int64_t b) const { return first[b + 1] - first[b]; }
};

// count(b): the number of chunks of element b.
template <typename F>
Chunks make_chunks(int64_t B, F count) {
  Chunks ch;
  ch.first.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) ch.first[b + 1] = ch.first[b] + count(b);
  ch.owner.resize(ch.total());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = ch.first[b]; g < ch.first[b + 1]; ++g) ch.owner[g] = b;
  return ch;
}

}  // namespace cpu
}  // namespace lara
