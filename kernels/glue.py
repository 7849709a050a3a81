"""The elementwise glue of the ``grouped_mm`` experts engine (``desmoe.ops.grouped``), one pass each.

Between ``torch._grouped_mm``'s GEMMs the engine needs SwiGLU forward (gate|up rows -> h), its backward (the dh
epilogue: d(gate|up), the routing-weight gradient and the weighted h of dW_down) and zeroed dW slices of experts
that must get none. In PyTorch that is a dozen eager passes with float32 temporaries; here each is one kernel that
reads its operands once in their dtype, does the math in float32 registers and writes each result once.

- :func:`swiglu_fwd_kernel`: ``h[s] = silu(g[s]) * u[s]`` with ``gu[s] = [g | u]`` (the sorted pair rows).
- :func:`swiglu_bwd_kernel`: from ``dh_u[s] = dout[tok[s]] @ W_down[e]`` (before the routing weight) and ``gu``:
  ``d(gate|up)[s]`` (for dx and dW_gate_up), ``hw[s] = h[s] * w * mask`` (for dW_down) and the routing-weight
  gradient ``dweights[pair] = dh_u[s] . h[s]``, scattered to the pair's row (``sorted_pairs[s]``).
- :func:`zero_experts_kernel`: ``dw[e] = 0`` for the experts whose ``keep[e]`` is 0 (touches only those).

Row counts vary with the batch: ``S`` is never specialized (no recompile for a new T).
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["S"])
def swiglu_fwd_kernel(gu_ptr, h_ptr, S, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """``h[s, :] = silu(gu[s, :N]) * gu[s, N:]`` in float32, stored in h's dtype. Grid (cdiv(S, BLOCK_S),
    cdiv(N, BLOCK_N))."""
    rows = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < S)[:, None] & (cols < N)[None, :]
    gu = rows[:, None] * (2 * N) + cols[None, :]
    g = tl.load(gu_ptr + gu, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + gu + N, mask=m, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["S"])
def swiglu_bwd_kernel(dhu_ptr, gu_ptr, sorted_pairs_ptr, weights_ptr, pair_mask_ptr, dgu_ptr, hw_ptr, dwp_ptr,
                      S, N, HAS_PAIR_MASK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """For BLOCK_S sorted pair rows, over N in BLOCK_N chunks: ``dh = dh_u * w``; ``d(gate|up) = [dh * u * s *
    (1 + g * (1 - s)), dh * g * s]`` (s = sigmoid(g)); ``hw = h * w * mask``; ``dweights[pair] = sum(dh_u * h)``.
    ``w``/``mask`` are read at the pair (``weights_ptr``: float32 [T*K]; ``pair_mask_ptr``: uint8 [T*K]). Grid
    (cdiv(S, BLOCK_S),)."""
    rows = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    rmask = rows < S
    pair = tl.load(sorted_pairs_ptr + rows, mask=rmask, other=0).to(tl.int64)
    wgt = tl.load(weights_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    scale = wgt
    if HAS_PAIR_MASK:
        scale = wgt * tl.load(pair_mask_ptr + pair, mask=rmask, other=0).to(tl.float32)
    dt = dgu_ptr.dtype.element_ty
    dot = tl.zeros([BLOCK_S], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (cols < N)[None, :]
        gu = rows[:, None] * (2 * N) + cols[None, :]
        g = tl.load(gu_ptr + gu, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + gu + N, mask=m, other=0.0).to(tl.float32)
        dhu = tl.load(dhu_ptr + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        h = g * sig * u
        dot += tl.sum(dhu * h, axis=1)
        dh = dhu * wgt[:, None]
        tl.store(dgu_ptr + gu, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=m)
        tl.store(dgu_ptr + gu + N, (dh * g * sig).to(dt), mask=m)
        tl.store(hw_ptr + rows[:, None] * N + cols[None, :], (h * scale[:, None]).to(dt), mask=m)
    tl.store(dwp_ptr + pair, dot, mask=rmask)


@triton.jit
def zero_experts_kernel(dw_ptr, keep_ptr, NUMEL, PROGRAMS, BLOCK: tl.constexpr):
    """``dw[e] = 0`` (``NUMEL`` elements from ``dw_ptr + e * NUMEL``) when ``keep[e]`` is 0; a kept expert's program
    returns after one byte. Grid (E, PROGRAMS), each program striding over the expert's slice."""
    e = tl.program_id(0)
    if tl.load(keep_ptr + e) == 0:
        base = dw_ptr + e.to(tl.int64) * NUMEL
        zero = tl.zeros([BLOCK], dw_ptr.dtype.element_ty)
        for start in range(tl.program_id(1) * BLOCK, NUMEL, PROGRAMS * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(base + offs, zero, mask=offs < NUMEL)
