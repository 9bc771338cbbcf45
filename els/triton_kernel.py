"""The patch-machine kernel on a GPU, in Triton: the streaming softmax of els/csrc/patch_softmax.h
over the same (Q, R, D) blocks (els.machines), with the same inputs and outputs.

A program takes one query image, a tile of BLOCK_P query pixels of a block and a fixed chunk of
IMAGE_CHUNK training images. It walks the chunk's candidates in (image, row, col) order, a tile of
BLOCK_C at a time, as the cheaper of two enumerations: the candidate centres of R (masked to
displacements in D; bbELS interior, ELS) or the displacements of D (masked to centres in R; LS and
the thin border blocks, whose D is a line or a point). The dot products of a tile are one
[BLOCK_P, K] x [K, BLOCK_C] product of gathered patches (K = C k^2, IEEE float32 `tl.dot`; in
float64, and where the candidates differ per query, broadcast products and a sum). Every logit gets
its exponential: nothing is skipped, so no bound is needed. A second kernel merges the chunks'
(max, normaliser, weighted centre sums, sum of squared weights, dominant candidate) in chunk order.
Neither the chunks nor the tiles depend on the batch, so a batch equals its images alone bit for bit.

With TRITON_INTERPRET=1 set before triton is imported, the same kernels run on CPU tensors in
Triton's interpreter (numpy): that is how the CPU test suite checks them; far too slow for real work.
"""

import torch
import triton
import triton.language as tl

IMAGE_CHUNK = 32  # training images per program (fixed: the merge order never depends on the batch)
BLOCK_P = 32  # query pixels per program


@triton.jit
def _softmax_chunk(
    xq, y, cn, ab, part_f, part_acc, part_id,
    B, N, Hq, Wq, Hy, Wy, H, W, Wn, yo, xo, k,
    q_r0, q_c0, Lq, nq, r_r0, r_r1, r_c0, r_c1, d_r0, d_r1, d_c0, d_c1, n_cand,
    C: tl.constexpr, CP: tl.constexpr, CHUNK: tl.constexpr, BY_D: tl.constexpr,
    USE_DOT: tl.constexpr, STATS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    chunk = tl.program_id(2)
    p_ok = p < nq
    pr = q_r0 + p // Lq
    pc = q_c0 + p % Lq
    h = k // 2
    kk = k * k
    KK = C * kk
    dt = xq.dtype.element_ty
    alpha = tl.load(ab)
    beta = tl.load(ab + 1)
    xb = xq + b.to(tl.int64) * (C * Hq * Wq)
    m = tl.full([BLOCK_P], float("-inf"), dt)
    s = tl.zeros([BLOCK_P], dt)
    sq = tl.zeros([BLOCK_P], dt)
    best = tl.full([BLOCK_P], float("-inf"), dt)
    best_id = tl.zeros([BLOCK_P], tl.int64)
    acc = tl.zeros([BLOCK_P, CP], dt)
    chs = tl.arange(0, CP)
    lanes = tl.arange(0, BLOCK_C)
    j0 = chunk * CHUNK
    j1 = tl.minimum(N, j0 + CHUNK)
    for j in range(j0, j1):
        yj = y + tl.cast(j, tl.int64) * (C * Hy * Wy)
        for c0 in range(0, n_cand, BLOCK_C):
            e = c0 + lanes
            if (
                BY_D
            ):  # displacements of D, row by row: per query, its candidates in (row, col) order
                Ld = d_c1 - d_c0 + 1
                cr = pr[:, None] + (d_r0 + e // Ld)[None, :]
                cc = pc[:, None] + (d_c0 + e % Ld)[None, :]
                inside = (cr >= r_r0) & (cr <= r_r1) & (cc >= r_c0) & (cc <= r_c1)
                valid = (e < n_cand)[None, :] & inside & p_ok[:, None]
                readable = valid
            else:  # centres of R, row by row: the same candidates for every query of the tile
                Lr = r_c1 - r_c0 + 1
                cr = (r_r0 + e // Lr)[None, :]
                cc = (r_c0 + e % Lr)[None, :]
                dy = cr - pr[:, None]
                dx = cc - pc[:, None]
                in_d = (dy >= d_r0) & (dy <= d_r1) & (dx >= d_c0) & (dx <= d_c1)
                valid = (e < n_cand)[None, :] & in_d & p_ok[:, None]
                readable = (e < n_cand)[None, :]
            dot = tl.zeros([BLOCK_P, BLOCK_C], dt)
            for t0 in range(0, KK, BLOCK_K):
                t = t0 + tl.arange(0, BLOCK_K)
                t_ok = t < KK
                ch = t // kk
                i = (t // k) % k
                jj = t % k
                # the query patch of pixel p: padded rows pr .. pr + k - 1, columns pc .. pc + k - 1
                q_off = (
                    (ch[None, :] * Hq + pr[:, None] + i[None, :]) * Wq + pc[:, None] + jj[None, :]
                )
                qv = tl.load(xb + q_off, mask=p_ok[:, None] & t_ok[None, :], other=0.0)
                if USE_DOT:  # cr, cc [1, BLOCK_C]
                    y_off = (ch[:, None] * Hy + cr + (i[:, None] - h + yo)) * Wy + cc
                    y_off += jj[:, None] - h + xo
                    yv = tl.load(yj + y_off, mask=t_ok[:, None] & readable, other=0.0)
                    dot += tl.dot(qv, yv, input_precision="ieee")
                else:  # cr, cc [1 or BLOCK_P, BLOCK_C] -> [., BLOCK_K, BLOCK_C]
                    y_off = (
                        ch[None, :, None] * Hy + cr[:, None, :] + i[None, :, None] - h + yo
                    ) * Wy
                    y_off += cc[:, None, :] + jj[None, :, None] - h + xo
                    y3 = tl.load(
                        yj + y_off, mask=t_ok[None, :, None] & readable[:, None, :], other=0.0
                    )
                    dot += tl.sum(qv[:, :, None] * y3, axis=1)
            norm = tl.load(cn + (j * H + cr).to(tl.int64) * Wn + cc, mask=readable, other=0.0)
            logit = tl.where(valid, alpha * dot - beta * norm, float("-inf"))
            tile_max = tl.max(logit, axis=1)
            new_m = tl.maximum(m, tile_max)
            ref = tl.where(new_m == float("-inf"), 0.0, new_m)  # no candidate yet: all weights 0
            f = tl.exp(m - ref)
            w = tl.exp(logit - ref[:, None])
            s = s * f + tl.sum(w, axis=1)
            acc = acc * f[:, None]
            for c in tl.static_range(C):
                centre = tl.load(yj + (c * Hy + cr + yo) * Wy + cc + xo, mask=readable, other=0.0)
                acc += tl.where(chs[None, :] == c, tl.sum(w * centre, axis=1)[:, None], 0.0)
            if STATS >= 1:
                sq = sq * f * f + tl.sum(w * w, axis=1)
            if STATS >= 2:
                # the tile's first largest logit; an equal one in a later tile never replaces it
                arg = tl.argmax(logit, axis=1, tie_break_left=True)
                gid = tl.broadcast_to(
                    tl.cast(j, tl.int64) * (H * W) + cr * W + cc, [BLOCK_P, BLOCK_C]
                )
                pick = tl.sum(tl.where(lanes[None, :] == arg[:, None], gid, 0), axis=1)
                better = tile_max > best
                best = tl.where(better, tile_max, best)
                best_id = tl.where(better, pick, best_id)
            m = new_m
    o = (chunk * B + b).to(tl.int64) * nq + p
    tl.store(part_f + o * 4, m, mask=p_ok)
    tl.store(part_f + o * 4 + 1, s, mask=p_ok)
    tl.store(part_f + o * 4 + 2, sq, mask=p_ok)
    tl.store(part_f + o * 4 + 3, best, mask=p_ok)
    tl.store(part_acc + o[:, None] * CP + chs[None, :], acc, mask=p_ok[:, None])
    tl.store(part_id + o, best_id, mask=p_ok)


@triton.jit
def _merge_chunks(
    part_f, part_acc, part_id, mean, best_w, n_eff, best_j, best_r, best_c,
    B, nq, n_chunks, H, W, q_r0, q_c0, Lq,
    C: tl.constexpr, CP: tl.constexpr, STATS: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < nq
    chs = tl.arange(0, CP)
    dt = part_f.dtype.element_ty
    M = tl.full([BLOCK_P], float("-inf"), dt)
    for c in range(n_chunks):
        o = (c * B + b).to(tl.int64) * nq + p
        M = tl.maximum(M, tl.load(part_f + o * 4, mask=ok, other=float("-inf")))
    ref = tl.where(M == float("-inf"), 0.0, M)
    tot = tl.zeros([BLOCK_P], dt)
    s2 = tl.zeros([BLOCK_P], dt)
    acc = tl.zeros([BLOCK_P, CP], dt)
    best = tl.full([BLOCK_P], float("-inf"), dt)
    bid = tl.zeros([BLOCK_P], tl.int64)
    for c in range(n_chunks):  # in chunk order, as the C++ kernel
        o = (c * B + b).to(tl.int64) * nq + p
        f = tl.exp(tl.load(part_f + o * 4, mask=ok, other=float("-inf")) - ref)
        tot += f * tl.load(part_f + o * 4 + 1, mask=ok, other=0.0)
        acc += f[:, None] * tl.load(
            part_acc + o[:, None] * CP + chs[None, :], mask=ok[:, None], other=0.0
        )
        if STATS >= 1:
            s2 += f * f * tl.load(part_f + o * 4 + 2, mask=ok, other=0.0)
        if STATS >= 2:
            cb = tl.load(part_f + o * 4 + 3, mask=ok, other=float("-inf"))
            better = cb > best  # a tie keeps the earlier chunk: the earlier image
            best = tl.where(better, cb, best)
            bid = tl.where(better, tl.load(part_id + o, mask=ok, other=0), bid)
    tot = tl.where(ok, tot, 1.0)  # pixels past the block: stored nowhere, kept finite
    s2 = tl.where(ok, s2, 1.0)
    pix = (q_r0 + p // Lq) * W + q_c0 + p % Lq
    out = (b * C + chs[None, :]).to(tl.int64) * (H * W) + pix[:, None]
    tl.store(mean + out, acc / tot[:, None], mask=ok[:, None] & (chs[None, :] < C))
    o = b.to(tl.int64) * (H * W) + pix
    if STATS >= 1:
        tl.store(n_eff + o, tot * tot / s2, mask=ok)
    if STATS >= 2:
        tl.store(best_w + o, tl.exp(best - ref) / tot, mask=ok)
        tl.store(best_j + o, bid // (H * W), mask=ok)
        tl.store(best_r + o, (bid // W) % H, mask=ok)
        tl.store(best_c + o, bid % W, mask=ok)


def _power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def patch_softmax(queries, padded_train, norms, blocks, k, row_pad, col_pad, alpha, beta, stats):
    """Same arguments and results as the C++ module's patch_softmax (els.kernel), less the thread
    count: (mean [B, C, H, W], best weight, n_eff, best image, row, col [B, H, W]); stats 0, 1
    (n_eff) or 2 (and the dominant candidate), what is not recorded is empty."""
    if queries.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton kernel runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (a check of the GPU kernel, not a way to compute)"
        )
    queries = queries.contiguous()
    B, C, Hq, Wq = queries.shape
    h = k // 2
    H, W = Hq - 2 * h, Wq - 2 * h
    N, _, Hy, Wy = padded_train.shape
    dtype, device = queries.dtype, queries.device
    ab = torch.tensor([alpha, beta], dtype=dtype, device=device)  # float64 stays float64
    mean = torch.empty(B, C, H, W, dtype=dtype, device=device)

    def per_pixel(level, dtype):
        return torch.empty((B, H, W) if stats >= level else (0,), dtype=dtype, device=device)

    best_w = per_pixel(2, dtype)
    n_eff = per_pixel(1, dtype)
    best = [per_pixel(2, torch.long) for _ in range(3)]
    n_chunks = -(-N // IMAGE_CHUNK)
    CP = _power_of_two(C)
    for q_r0, q_r1, q_c0, q_c1, r_r0, r_r1, r_c0, r_c1, d_r0, d_r1, d_c0, d_c1 in blocks.tolist():
        Lq = q_c1 - q_c0 + 1
        nq = (q_r1 - q_r0 + 1) * Lq
        n_r = (r_r1 - r_r0 + 1) * (r_c1 - r_c0 + 1)
        n_d = (d_r1 - d_r0 + 1) * (d_c1 - d_c0 + 1)
        by_d = n_d < n_r
        use_dot = dtype == torch.float32 and not by_d
        part_f = torch.empty(n_chunks, B, nq, 4, dtype=dtype, device=device)
        part_acc = torch.empty(n_chunks, B, nq, CP, dtype=dtype, device=device)
        part_id = torch.empty(n_chunks, B, nq, dtype=torch.long, device=device)
        tiles = -(-nq // BLOCK_P)
        _softmax_chunk[(B, tiles, n_chunks)](
            queries, padded_train, norms, ab, part_f, part_acc, part_id,
            B, N, Hq, Wq, Hy, Wy, H, W, norms.shape[-1], row_pad, col_pad, k,
            q_r0, q_c0, Lq, nq, r_r0, r_r1, r_c0, r_c1, d_r0, d_r1, d_c0, d_c1,
            n_d if by_d else n_r,
            C=C, CP=CP, CHUNK=IMAGE_CHUNK, BY_D=by_d, USE_DOT=use_dot, STATS=stats,
            BLOCK_P=BLOCK_P, BLOCK_C=16 if by_d else 64, BLOCK_K=16 if use_dot else 8,
        )  # fmt: skip
        _merge_chunks[(B, tiles)](
            part_f, part_acc, part_id, mean, best_w, n_eff, *best,
            B, nq, n_chunks, H, W, q_r0, q_c0, Lq,
            C=C, CP=CP, STATS=stats, BLOCK_P=BLOCK_P,
        )  # fmt: skip
    return (mean, best_w, n_eff, *best)
