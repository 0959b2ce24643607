"""Numba kernels of the preprocessing (imported lazily: numba is heavy).

Module-level so that numba's on-disk cache finds them again in a new process.
All of them run without the GIL.
"""

import numba
import numpy as np

__all__ = ["prep_many"]


@numba.njit(nogil=True, boundscheck=False, cache=True)
def reduce_blocks(x, k, off_i, off_j, lo, hi, out_sum, out_cnt, out_max):
    # One pass over the frame: per k x k block, sum / count / max of valid pixels.
    # Rows are accumulated per column in float32 (branch-free, vectorised), then
    # folded into blocks once per block row.
    H, W = x.shape
    acc_s = np.zeros(W, np.float32)
    acc_c = np.zeros(W, np.int32)
    acc_m = np.zeros(W, np.float32)
    zero = np.float32(0.0)
    for i in range(H):
        row = x[i]
        for j in range(W):
            v = row[j]
            ok = (v >= lo) & (v <= hi)  # False for NaN
            fv = np.float32(v) if ok else zero
            acc_s[j] += fv
            acc_c[j] += ok
            acc_m[j] = max(acc_m[j], fv)
        bi = (i + off_i) // k
        if i == H - 1 or (i + 1 + off_i) // k != bi:
            for j in range(W):
                bj = (j + off_j) // k
                out_sum[bi, bj] += acc_s[j]
                out_cnt[bi, bj] += acc_c[j]
                if acc_m[j] > out_max[bi, bj]:
                    out_max[bi, bj] = acc_m[j]
                acc_s[j] = zero
                acc_c[j] = 0
                acc_m[j] = zero

@numba.njit(nogil=True, boundscheck=False, cache=True)
def prep_one(x, k, off_i, off_j, lo, hi, sat_level, use_level, min_plateau, min_sat,
             log_scale, out):
    S = out.shape[1]
    H, W = x.shape
    sums = np.zeros((S, S), np.float64)
    cnt = np.zeros((S, S), np.int64)
    mx = np.zeros((S, S), np.float64)
    reduce_blocks(x, k, off_i, off_j, lo, hi, sums, cnt, mx)
    kk = np.float32(k * k)
    inv_scale = np.float32(1.0 / log_scale)
    rows = np.empty(S, np.float32)
    cols = np.empty(S, np.float32)
    for b in range(S):
        rows[b] = max(min((b + 1) * k - off_i, H) - max(b * k - off_i, 0), 0)
        cols[b] = max(min((b + 1) * k - off_j, W) - max(b * k - off_j, 0), 0)
    # float32 throughout: the logs vectorise and half the memory traffic
    o0 = out[0]
    o1 = out[1]
    o3 = out[3]
    o4 = out[4]
    for bi in range(S):
        for bj in range(S):
            cover = rows[bi] * cols[bj]
            n = np.float32(cnt[bi, bj])
            mean = np.float32(sums[bi, bj]) / max(n, np.float32(1.0))
            o0[bi, bj] = np.log1p(mean) * inv_scale
            o1[bi, bj] = np.log1p(np.float32(mx[bi, bj])) * inv_scale
            o3[bi, bj] = (cover - n) / max(cover, np.float32(1.0))
            o4[bi, bj] = np.float32(1.0) - cover / kk
    out[5, :, :] = 0.0
    peak = o0.max()
    vmax = mx.max()
    for bi in range(S):
        for bj in range(S):
            out[2, bi, bj] = out[0, bi, bj] / peak if peak > 0 else 0.0
    # saturation: pixels at a plateau (the maximum valid value, or >= sat_level)
    level = sat_level if use_level else vmax
    if vmax > 0 and vmax >= level and vmax >= min_sat:
        total = 0
        for bi in range(S):
            for bj in range(S):
                if mx[bi, bj] >= level:
                    i0 = max(0, bi * k - off_i)
                    i1 = min(H, (bi + 1) * k - off_i)
                    j0 = max(0, bj * k - off_j)
                    j1 = min(W, (bj + 1) * k - off_j)
                    c = 0
                    for i in range(i0, i1):
                        for j in range(j0, j1):
                            v = x[i, j]
                            if (v >= level) & (v >= lo) & (v <= hi):
                                c += 1
                    total += c
                    cover = float((i1 - i0) * (j1 - j0))
                    out[5, bi, bj] = c / cover if cover > 0 else 0.0
        if (not use_level) and total < min_plateau:
            for bi in range(S):
                for bj in range(S):
                    out[5, bi, bj] = 0.0

@numba.njit(nogil=True, boundscheck=False, cache=True)
def prep_many(frames, ks, offs_i, offs_j, lo, hi, sat_level, use_level, min_plateau,
              min_sat, log_scale, out):
    for n in range(len(frames)):
        prep_one(frames[n], ks[n], offs_i[n], offs_j[n], lo, hi, sat_level, use_level,
                 min_plateau, min_sat, log_scale, out[n])
