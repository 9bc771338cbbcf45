"""The Triton kernels of els.fused (see there): per query block and candidate range, a partial
softmax state (partials); their merge into the running state in id order (merge).
Imported by els.fused on first use only: importing triton costs a second."""

import triton
import triton.language as tl


# the sizes and ids vary by chunk: specialising on them (divisibility by 16) would compile a
# kernel per chunk shape, seconds inside a sample
@triton.jit(
    do_not_specialize=[
        "R",
        "M",
        "first_id",
        "stride_qg",
        "stride_qr",
        "stride_pg",
        "stride_pd",
        "stride_bg",
        "stride_cg",
        "stride_ce",
        "stride_lg",
    ]
)
def partials(
    Q,
    stride_qg,
    stride_qr,
    PT,
    stride_pg,
    stride_pd,
    BIAS,
    stride_bg,
    CT,
    stride_cg,
    stride_ce,
    LM,
    stride_lg,
    OUT_M,
    OUT_L,
    OUT_ACC,
    OUT_BEST,
    OUT_ID,
    OUT_SQ,
    R,
    M,
    first_id,
    alpha,
    D: tl.constexpr,
    E: tl.constexpr,
    EP: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    STATS: tl.constexpr,
    HAS_MULT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    S = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < R
    es = tl.arange(0, EP)
    e_ok = es < E
    dd = tl.arange(0, BD).to(tl.int64)  # int64 offsets: D x M can pass 2^31 elements
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, M)
    pt_base = PT + g.to(tl.int64) * stride_pg
    q_base = Q + g * stride_qg + rows[:, None] * stride_qr
    run = tl.full((BM,), float("-inf"), tl.float32)
    nrm = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, EP), tl.float32)
    best = tl.full((BM,), float("-inf"), tl.float32)
    best_id = tl.zeros((BM,), tl.int64)
    sq = tl.zeros((BM,), tl.float32)
    if D <= BD:  # one slice of the patch: the queries stay in registers
        q0 = tl.load(q_base + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < end
        dots = tl.zeros((BM, BN), tl.float32)
        if D <= BD:
            kt = tl.load(
                pt_base + dd[:, None] * stride_pd + cols[None, :],
                mask=(dd[:, None] < D) & col_ok[None, :],
                other=0.0,
            )
            dots = tl.dot(q0, kt, input_precision="ieee")
        else:
            for d0 in range(0, D, BD):
                d = d0 + dd
                q = tl.load(q_base + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
                kt = tl.load(
                    pt_base + d[:, None] * stride_pd + cols[None, :],
                    mask=(d[:, None] < D) & col_ok[None, :],
                    other=0.0,
                )
                dots += tl.dot(q, kt, input_precision="ieee")
        bias = tl.load(BIAS + g * stride_bg + cols, mask=col_ok, other=float("-inf"))
        logit = dots * alpha + bias[None, :]
        new = tl.maximum(run, tl.max(logit, axis=1))
        safe = tl.maximum(new, -3.4028234663852886e38)
        # exp of arguments below -80 is below any float sum's rounding (els.softmax.EXP_FLOOR)
        w = tl.exp(tl.maximum(logit - safe[:, None], -80.0))
        w = tl.where(col_ok[None, :], w, 0.0)
        scale = tl.exp(run - safe)
        nrm = nrm * scale + tl.sum(w, axis=1)
        cen = tl.load(
            CT + g * stride_cg + es[None, :] * stride_ce + cols[:, None],
            mask=e_ok[None, :] & col_ok[:, None],
            other=0.0,
        )
        acc = acc * scale[:, None] + tl.sum(w[:, :, None] * cen[None, :, :], axis=1)
        if STATS:
            ids = cols.to(tl.int64) + first_id
            single = logit
            w2 = w * w
            if HAS_MULT:
                lm = tl.load(LM + g * stride_lg + cols, mask=col_ok, other=float("-inf"))
                padding = lm == float("-inf")
                # the dominant candidate is one training patch: its logit without multiplicity
                lm_safe = tl.where(padding, 0.0, lm)  # padding's logit is -inf already
                single = tl.where(padding[None, :], float("-inf"), logit - lm_safe[None, :])
                # a group of n copies adds n w^2 (w counts all n)
                w2 = w2 * tl.where(padding, 0.0, tl.exp(-lm_safe))[None, :]
            top = tl.max(single, axis=1)
            # among exact ties the smallest id (the first occurrence)
            top_id = tl.min(
                tl.where(single == top[:, None], ids[None, :], 9223372036854775807), axis=1
            )
            better = top > best  # earlier steps hold smaller ids: a tie keeps them
            best = tl.where(better, top, best)
            best_id = tl.where(better, top_id, best_id)
            sq = sq * scale * scale + tl.sum(w2, axis=1)
        run = new
    out = (g * S + s) * R + rows
    tl.store(OUT_M + out, run, mask=row_ok)
    tl.store(OUT_L + out, nrm, mask=row_ok)
    acc_out = OUT_ACC + ((g * S + s) * EP + es[None, :]) * R + rows[:, None]
    tl.store(acc_out, acc, mask=row_ok[:, None] & e_ok[None, :])
    if STATS:
        tl.store(OUT_BEST + out, best, mask=row_ok)
        tl.store(OUT_ID + out, best_id, mask=row_ok)
        tl.store(OUT_SQ + out, sq, mask=row_ok)


@triton.jit(do_not_specialize=["S", "R"])
def merge(
    RUN,
    ACC,
    BEST,
    BID,
    SQ,
    PM,
    PL,
    PACC,
    PBEST,
    PID,
    PSQ,
    S,
    R,
    E: tl.constexpr,
    EP: tl.constexpr,
    BR: tl.constexpr,
    STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * BR + tl.arange(0, BR)
    ok = rows < R
    es = tl.arange(0, EP)
    e_ok = es < E
    at = g * R + rows
    acc_at = (g * (E + 1) + es[None, :]) * R + rows[:, None]
    nrm_at = (g * (E + 1) + E) * R + rows
    run = tl.load(RUN + at, mask=ok, other=float("-inf"))
    acc = tl.load(ACC + acc_at, mask=ok[:, None] & e_ok[None, :], other=0.0)
    nrm = tl.load(ACC + nrm_at, mask=ok, other=0.0)
    if STATS:
        best = tl.load(BEST + at, mask=ok, other=float("-inf"))
        best_id = tl.load(BID + at, mask=ok, other=0)
        sq = tl.load(SQ + at, mask=ok, other=0.0)
    for s in range(0, S):  # in id order
        part = (g * S + s) * R + rows
        m_s = tl.load(PM + part, mask=ok, other=float("-inf"))
        new = tl.maximum(run, m_s)
        safe = tl.maximum(new, -3.4028234663852886e38)
        r_old = tl.exp(run - safe)
        r_new = tl.exp(m_s - safe)
        acc_s = tl.load(
            PACC + ((g * S + s) * EP + es[None, :]) * R + rows[:, None],
            mask=ok[:, None] & e_ok[None, :],
            other=0.0,
        )
        acc = acc * r_old[:, None] + acc_s * r_new[:, None]
        nrm = nrm * r_old + tl.load(PL + part, mask=ok, other=0.0) * r_new
        if STATS:
            b_s = tl.load(PBEST + part, mask=ok, other=float("-inf"))
            id_s = tl.load(PID + part, mask=ok, other=0)
            better = (b_s > best) | ((b_s == best) & (id_s < best_id))
            best = tl.where(better, b_s, best)
            best_id = tl.where(better, id_s, best_id)
            sq = sq * r_old * r_old + tl.load(PSQ + part, mask=ok, other=0.0) * r_new * r_new
        run = new
    tl.store(RUN + at, run, mask=ok)
    tl.store(ACC + acc_at, acc, mask=ok[:, None] & e_ok[None, :])
    tl.store(ACC + nrm_at, nrm, mask=ok)
    if STATS:
        tl.store(BEST + at, best, mask=ok)
        tl.store(BID + at, best_id, mask=ok)
        tl.store(SQ + at, sq, mask=ok)
