// knn_scan: many queries against one block of database vectors (an IVF list), selected into k-best
// tables, with the product in bfloat16 (AVX512-BF16 dot-product instructions, x86-64) and an exact
// float32 re-score of the kept candidates, or in float32 (MKL's sgemm in builds with MKL, a
// hand-written blocked product in every build). See graph_utils.h for the contract.
//
// Why: the background graph's table is ~1e10-1e12 (query, vector) products of 256-d unit vectors.
// MKL's sgemm runs at ~105 GFLOP/s per Zen 4 core; the bf16 dot-product instruction at ~500 (a
// micro-benchmark, not kept; the whole 1M table: README "Scale"). bf16 keeps 8 bits of mantissa, so a product of unit vectors is off by ~1e-4: the scan
// keeps kp > k candidates by approximate score, and the k best by exact score are kept at the end.
//
// Selection: a row holds up to cap = 2 kp candidates, unsorted, and a threshold. A candidate at or
// above the threshold is appended; a full row is cut back to its kp best (nth_element), whose worst
// becomes the threshold. An insertion into a sorted row would cost O(kp) moves per entering
// candidate; the cut costs O(cap) per kp entering ones.
#include "graph_utils.h"

#if defined(__x86_64__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif
#ifdef GRAPH_UTILS_MKL
#include <mkl_cblas.h>
#include <mkl_service.h>
#endif
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace graph_utils {

namespace {

constexpr int64_t MAX_CAP = 1024;   // candidates a row holds (2 kp): stack buffers of the cut

// float32 -> bfloat16 bits, round to nearest even (inputs are finite)
inline uint16_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// candidate order: score decreasing, then id increasing (a total order: results do not depend on
// the order candidates arrive in)
struct Better {
    const float* a;
    const int32_t* id;
    bool operator()(int32_t x, int32_t y) const { return a[x] > a[y] || (a[x] == a[y] && id[x] < id[y]); }
};

// keep the kp best of the c candidates of a row (slots 0..kp-1, unordered but the worst last);
// returns the new threshold (the worst kept score)
float cut_row(float* a, float* e, int32_t* id, int64_t c, int64_t kp) {
    int32_t idx[MAX_CAP];
    float ta[MAX_CAP], te[MAX_CAP];
    int32_t ti[MAX_CAP];
    for (int64_t j = 0; j < c; j++) idx[j] = (int32_t)j;
    std::nth_element(idx, idx + kp - 1, idx + c, Better{a, id});
    for (int64_t j = 0; j < kp; j++) {
        ta[j] = a[idx[j]];
        te[j] = e[idx[j]];
        ti[j] = id[idx[j]];
    }
    std::memcpy(a, ta, kp * 4);
    std::memcpy(e, te, kp * 4);
    std::memcpy(id, ti, kp * 4);
    return a[kp - 1];
}

// float32 path: the scores are exact, E = A
void offer_row_fp32(const ScanTable& t, int64_t r, const float* s, int64_t n, const int32_t* ids) {
    float* a = t.A + r * t.cap;
    float* e = t.E + r * t.cap;
    int32_t* id = t.I + r * t.cap;
    float thr = t.thr[r];
    int64_t c = t.cnt[r];
    for (int64_t j = 0; j < n; j++) {
        float v = s[j];
        if (!(v >= thr)) continue;
        if (c == t.cap) {
            thr = cut_row(a, e, id, c, t.kp);
            c = t.kp;
            if (!(v >= thr)) continue;
        }
        a[c] = e[c] = v;
        id[c] = ids[j];
        c++;
    }
    t.thr[r] = thr;
    t.cnt[r] = (int32_t)c;
}

void check_scan_args(const ScanTable& t, const int64_t* rows, int64_t m, int64_t d, int64_t n, int64_t ldc) {
    if (t.kp < 1 || t.cap < 2 * t.kp || t.cap > MAX_CAP)
        throw std::invalid_argument("the table needs 1 <= kp and 2 kp <= its columns <= " + std::to_string(MAX_CAP));
    if (d < 1 || ldc < d) throw std::invalid_argument("Xc has a row stride smaller than d");
    if (n >= (int64_t(1) << 31)) throw std::invalid_argument("a block holds at most 2^31 - 1 vectors");
    for (int64_t r = 0; r < m; r++) {
        if (rows[r] < 0 || rows[r] >= t.n)
            throw std::invalid_argument("rows[" + std::to_string(r) + "] = " + std::to_string(rows[r]) +
                                        " is outside the table's " + std::to_string(t.n) + " rows");
        if (r > 0 && rows[r] <= rows[r - 1])
            throw std::invalid_argument("rows must be strictly increasing (rows[" + std::to_string(r) + "] = " +
                                        std::to_string(rows[r]) + " after " + std::to_string(rows[r - 1]) + ")");
    }
}

// Per-thread scratch kept between calls (OpenMP threads persist): buffers of a few 100 KB freed
// at every call would come back from the kernel as fresh zeroed pages each time (glibc serves
// them with mmap), 10% of a scan's time at 1M. Returns nullptr when it cannot grow.
void* scratch(int slot, size_t bytes) {
    static thread_local void* buf[2] = {nullptr, nullptr};
    static thread_local size_t size[2] = {0, 0};
    if (size[slot] < bytes) {
        std::free(buf[slot]);
        size_t grown = std::max(bytes, 2 * size[slot]);
        grown = (grown + 63) / 64 * 64;
        buf[slot] = std::aligned_alloc(64, grown);
        size[slot] = buf[slot] ? grown : 0;
    }
    return buf[slot];
}

// ---------------------------------------------------------------- bfloat16 products (x86-64 only)

#if defined(__x86_64__)

#define GU_BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))

// Packed block of 16 database vectors for the dot-product instruction: for each pair of dimensions
// p (dims 2p, 2p+1), 32 bf16 values [v0[2p], v0[2p+1], v1[2p], ..., v15[2p+1]] (64 bytes). Vectors
// past n are zero. Returns the largest squared norm of the block's vectors.
GU_BF16_TARGET float pack_block(const float* X, int64_t n, int64_t ldx, int64_t d, int64_t b, uint16_t* out) {
    const int64_t dp = d / 2;
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    float norm2 = 0;
    for (int64_t j = 0; j < 16; j++) {
        int64_t v = b * 16 + j;
        int32_t* o = (int32_t*)out + j;   // pair p of vector j: int32 slot p * 16 + j
        if (v >= n) {
            for (int64_t p = 0; p < dp; p++) o[p * 16] = 0;
            continue;
        }
        const float* x = X + v * ldx;
        __m512 acc = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= d; i += 32) {
            __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + i + 16);
            acc = _mm512_fmadd_ps(lo, lo, _mm512_fmadd_ps(hi, hi, acc));
            __m512i h = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);   // 16 pairs (dims i .. i + 31)
            _mm512_i32scatter_epi32(o + (i / 2) * 16, stride, h, 4);
        }
        float s2 = _mm512_reduce_add_ps(acc);
        for (; i < d; i += 2) {
            s2 += x[i] * x[i] + x[i + 1] * x[i + 1];
            o[(i / 2) * 16] = (int32_t)((uint32_t)bf16_bits(x[i]) | ((uint32_t)bf16_bits(x[i + 1]) << 16));
        }
        norm2 = std::max(norm2, s2);
    }
    return norm2;
}

// RQ queries x (NB * 16) vectors: S[a, 16 b + j] = <q_a, v_{16 b + j}> over dp pairs of dimensions
template <int RQ, int NB>
GU_BF16_TARGET inline void micro_bf16(const uint16_t* const* q, const uint16_t* P, int64_t dp, float* S,
                                      int64_t lds) {
    __m512 acc[RQ][NB];
    for (int a = 0; a < RQ; a++)
        for (int b = 0; b < NB; b++) acc[a][b] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dp; p++) {
        __m512bh v[NB];
        for (int b = 0; b < NB; b++) v[b] = (__m512bh)_mm512_load_si512((const void*)(P + (b * dp + p) * 32));
        for (int a = 0; a < RQ; a++) {
            int32_t pair;
            std::memcpy(&pair, q[a] + 2 * p, 4);
            __m512bh qa = (__m512bh)_mm512_set1_epi32(pair);
            for (int b = 0; b < NB; b++) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], qa, v[b]);
        }
    }
    for (int a = 0; a < RQ; a++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(S + a * lds + b * 16, acc[a][b]);
}

GU_BF16_TARGET inline float dot_exact(const float* x, const float* y, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < d; i++) s += x[i] * y[i];
    return s;
}

// Offers n approximate scores s[j] (ids[j]) to row r: appended when >= its threshold, the row cut
// back to kp when full. exact_now: the entering candidate's exact score <q, Xc[j]> goes to E.
template <bool exact_now>
GU_BF16_TARGET inline void offer_row_bf16(const ScanTable& t, int64_t r, const float* s, int64_t n,
                                          const int32_t* ids, const float* q, const float* Xc, int64_t ldc,
                                          int64_t d) {
    float* a = t.A + r * t.cap;
    float* e = t.E + r * t.cap;
    int32_t* id = t.I + r * t.cap;
    float thr = t.thr[r];
    int64_t c = t.cnt[r];
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 live = (__mmask16)(n - j >= 16 ? 0xffff : ((1u << (n - j)) - 1));
        __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(s + j), _mm512_set1_ps(thr), _CMP_GE_OQ);
        while (hit) {
            int u = __builtin_ctz(hit);
            hit &= hit - 1;
            float v = s[j + u];
            if (!(v >= thr)) continue;      // the threshold rose since the mask was taken
            if (c == t.cap) {
                thr = cut_row(a, e, id, c, t.kp);
                c = t.kp;
                if (!(v >= thr)) continue;
            }
            a[c] = v;
            id[c] = ids[j + u];
            if (exact_now) e[c] = dot_exact(q, Xc + (j + u) * ldc, d);
            c++;
        }
    }
    t.thr[r] = thr;
    t.cnt[r] = (int32_t)c;
}

float scan_bf16(const ScanTable& t, const int64_t* rows, int64_t m, const float* Qf, const uint16_t* Qb, int64_t d,
                const float* Xc, int64_t n, int64_t ldc, const int32_t* ids, bool exact_now) {
    constexpr int RQ = 6, NB = 4;          // 24 accumulators: 6 queries x 64 vectors per micro-kernel
    constexpr int64_t CB = 32;             // blocks of 16 vectors scored before selection (512 vectors):
                                           // the tile's scores (TM x 512 floats) stay in L2
    const int64_t dp = d / 2;
    const int64_t nb = (n + 15) / 16, nbp = (nb + NB - 1) / NB * NB;
    // queries per tile: 96, fewer when the list has few queries, so that every thread gets tiles
    const int64_t nthreads = omp_get_max_threads();
    const int64_t TM = std::max<int64_t>(RQ, std::min<int64_t>(96, (m + 2 * nthreads - 1) / (2 * nthreads) / RQ * RQ + RQ));
    uint16_t* P = (uint16_t*)scratch(0, (size_t)(nbp * dp * 64 + 64));   // the calling thread's
    if (!P) throw std::bad_alloc();
    const int64_t lds = CB * 16;
    std::atomic<bool> no_memory(false);   // OpenMP regions never throw: allocation failures are raised after
    float norm2_max = 0;                  // of the candidates: bounds the bf16 error (knn_scan_rescore)
#pragma omp parallel
    {
#pragma omp for schedule(static) reduction(max : norm2_max)
        for (int64_t b = 0; b < nbp; b++) norm2_max = std::max(norm2_max, pack_block(Xc, n, ldc, d, b, P + b * dp * 32));
        // omp for ends with a barrier: every block is packed below
        float* S = (float*)scratch(1, (size_t)(96 * lds * 4));
        const uint16_t* qp[96];
        if (!S) no_memory = true;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < m; r0 += TM) {
            if (!S) continue;
            int64_t tm = std::min(TM, m - r0), tmp = (tm + RQ - 1) / RQ * RQ;
            for (int64_t u = 0; u < tmp; u++) qp[u] = Qb + rows[r0 + std::min(u, tm - 1)] * d;
            for (int64_t c0 = 0; c0 < nbp; c0 += CB) {
                int64_t c1 = std::min(nbp, c0 + CB);
                for (int64_t a0 = 0; a0 < tmp; a0 += RQ)
                    for (int64_t b0 = c0; b0 < c1; b0 += NB)
                        micro_bf16<RQ, NB>(qp + a0, P + b0 * dp * 32, dp, S + a0 * lds + (b0 - c0) * 16, lds);
                int64_t j0 = c0 * 16, cn = std::min(n, c1 * 16) - j0;
                for (int64_t u = 0; u < tm; u++) {
                    int64_t row = rows[r0 + u];
                    if (exact_now)
                        offer_row_bf16<true>(t, row, S + u * lds, cn, ids + j0, Qf + row * d, Xc + j0 * ldc, ldc, d);
                    else
                        offer_row_bf16<false>(t, row, S + u * lds, cn, ids + j0, nullptr, nullptr, 0, d);
                }
            }
        }
    }
    if (no_memory) throw std::bad_alloc();
    return std::sqrt(norm2_max);
}

#endif  // __x86_64__

// ---------------------------------------------------------------- float32 products, hand-written

// S = Q Xc^T without BLAS (every build; KnnScan's default, MKL's sgemm on request). The candidates are
// packed once per call into panels of 16, coordinate-major (panel b: P[i * 16 + j] = coordinate i of
// candidate 16 b + j, zeros past n), so that one vector load holds one coordinate of 16 candidates.
// The micro-kernel keeps the RQ x 16 NB scores of RQ queries and NB panels in registers over all d
// coordinates: per coordinate, NB * 16 / W vector loads and RQ broadcasts feed RQ * NB * 16 / W
// vector multiply-adds. A thread scores a tile of TM <= 96 queries against FP_CV candidates at a time,
// panel by panel, so that all the tile's queries use a panel (64 d bytes: L1 for d of a few hundred)
// while it is in cache, and the tile's scores (96 x FP_CV floats) stay in L2 for the selection that
// follows.
// Widths by instruction set, chosen at run time: AVX-512 W = 16, 6 queries x 2 panels (12 vector
// accumulators); AVX2 W = 8, 6 x 1 (12 of the 16 registers: wider tiles spill and ran 4x slower);
// SSE and NEON W = 4, 3 x 1. The same code is compiled for each (GCC vector extensions, one vector
// type per width: a 64-byte type lowered to AVX2 ran 10x slower). Against MKL's sgemm on one Zen 4
// core, d = 256 (a micro-benchmark of the product alone, not kept): AVX-512 ~2x as fast, AVX2 ~1.2x,
// SSE ~0.4x; benchmarks/bench_scan.py times the whole scan against MKL's, in the same process.

constexpr int64_t PANEL = 16;   // candidates per panel
constexpr int64_t FP_CV = 256;  // candidates per tile of scores: a multiple of 2 panels
constexpr int64_t FP_TM = 96;   // queries per tile at most: a multiple of every kernel's RQ

void pack_panel(const float* X, int64_t n, int64_t ldx, int64_t d, int64_t b, float* P) {
    for (int64_t j = 0; j < PANEL; j++) {
        int64_t v = b * PANEL + j;
        if (v >= n) {
            for (int64_t i = 0; i < d; i++) P[i * PANEL + j] = 0;
            continue;
        }
        const float* x = X + v * ldx;
        for (int64_t i = 0; i < d; i++) P[i * PANEL + j] = x[i];
    }
}

// S[a, j] = <q[a], candidate j of panels 0 .. NB - 1 of P> for a < RQ, j < 16 NB (row stride lds),
// with vectors of W floats
template <int W, int RQ, int NB>
__attribute__((always_inline)) inline void micro_fp32(const float* const* q, const float* P, int64_t d, float* S,
                                                      int64_t lds) {
    typedef float V __attribute__((vector_size(4 * W)));
    constexpr int NV = NB * PANEL / W;
    V acc[RQ][NV];
    for (int a = 0; a < RQ; a++)
        for (int b = 0; b < NV; b++) acc[a][b] = V{};
    for (int64_t i = 0; i < d; i++) {
        V v[NV];
        for (int b = 0; b < NV; b++) std::memcpy(&v[b], P + ((b * W / PANEL) * d + i) * PANEL + (b * W) % PANEL, 4 * W);
        for (int a = 0; a < RQ; a++) {
            float s = q[a][i];
            for (int b = 0; b < NV; b++) acc[a][b] += s * v[b];
        }
    }
    for (int a = 0; a < RQ; a++)
        for (int b = 0; b < NV; b++) std::memcpy(S + a * lds + b * W, &acc[a][b], 4 * W);
}

// the scores of tq queries (a multiple of RQ) against np panels (a multiple of NB)
template <int W, int RQ, int NB>
__attribute__((always_inline)) inline void tile_fp32(const float* const* q, int64_t tq, const float* P, int64_t np,
                                                     int64_t d, float* S, int64_t lds) {
    for (int64_t b0 = 0; b0 < np; b0 += NB)
        for (int64_t a0 = 0; a0 < tq; a0 += RQ)
            micro_fp32<W, RQ, NB>(q + a0, P + b0 * d * PANEL, d, S + a0 * lds + b0 * PANEL, lds);
}

typedef void (*TileFn)(const float* const*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

struct Fp32Kernel {
    TileFn tile;
    int64_t rq;
};

#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void tile_avx512(const float* const* q, int64_t tq, const float* P,
                                                          int64_t np, int64_t d, float* S, int64_t lds) {
    tile_fp32<16, 6, 2>(q, tq, P, np, d, S, lds);
}

__attribute__((target("arch=x86-64-v3"))) void tile_avx2(const float* const* q, int64_t tq, const float* P, int64_t np,
                                                        int64_t d, float* S, int64_t lds) {
    tile_fp32<8, 6, 1>(q, tq, P, np, d, S, lds);
}
#endif

void tile_base(const float* const* q, int64_t tq, const float* P, int64_t np, int64_t d, float* S, int64_t lds) {
    tile_fp32<4, 3, 1>(q, tq, P, np, d, S, lds);
}

Fp32Kernel fp32_kernel() {
#if defined(__x86_64__)
    // the features of the x86-64-v3 / v4 levels the kernels are compiled for, named one by one
    // (not every compiler version takes the level names in __builtin_cpu_supports)
    __builtin_cpu_init();
    bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
              __builtin_cpu_supports("bmi2");
    bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vl");
    if (v4) return {tile_avx512, 6};
    if (v3) return {tile_avx2, 6};
#endif
    return {tile_base, 3};
}

void scan_fp32_hand(const ScanTable& t, const int64_t* rows, int64_t m, const float* Qf, int64_t d, const float* Xc,
                    int64_t n, int64_t ldc, const int32_t* ids) {
    static const Fp32Kernel kernel = fp32_kernel();
    const int64_t RQ = kernel.rq;
    const int64_t npan = (n + PANEL - 1) / PANEL, npp = (npan + 1) / 2 * 2;
    // queries per tile: FP_TM, fewer when the block has few queries, so that every thread gets tiles
    const int64_t nthreads = omp_get_max_threads();
    const int64_t TM = std::max<int64_t>(RQ, std::min<int64_t>(FP_TM, (m + 2 * nthreads - 1) / (2 * nthreads) / RQ * RQ + RQ));
    float* P = (float*)scratch(0, (size_t)(npp * d * PANEL * 4));   // the calling thread's
    if (!P) throw std::bad_alloc();
    std::atomic<bool> no_memory(false);   // OpenMP regions never throw: allocation failures are raised after
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < npp; b++) pack_panel(Xc, n, ldc, d, b, P + b * d * PANEL);
        // omp for ends with a barrier: every panel is packed below
        float* S = (float*)scratch(1, (size_t)(FP_TM * FP_CV * 4));
        const float* qp[FP_TM];
        if (!S) no_memory = true;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < m; r0 += TM) {
            if (!S) continue;
            int64_t tm = std::min(TM, m - r0), tq = (tm + RQ - 1) / RQ * RQ;
            for (int64_t u = 0; u < tq; u++) qp[u] = Qf + rows[r0 + std::min(u, tm - 1)] * d;
            for (int64_t c0 = 0; c0 < npp; c0 += FP_CV / PANEL) {
                int64_t c1 = std::min(npp, c0 + FP_CV / PANEL);
                kernel.tile(qp, tq, P + c0 * d * PANEL, c1 - c0, d, S, FP_CV);
                int64_t j0 = c0 * PANEL, cn = std::min(n, c1 * PANEL) - j0;
                for (int64_t u = 0; u < tm; u++) offer_row_fp32(t, rows[r0 + u], S + u * FP_CV, cn, ids + j0);
            }
        }
    }
    if (no_memory) throw std::bad_alloc();
}

// ---------------------------------------------------------------- float32 products, MKL

#ifdef GRAPH_UTILS_MKL

void scan_fp32_mkl(const ScanTable& t, const int64_t* rows, int64_t m, const float* Qf, int64_t d, const float* Xc,
               int64_t n, int64_t ldc, const int32_t* ids) {
    const int64_t TM = 128;
    std::atomic<bool> no_memory(false);
#pragma omp parallel
    {
        int saved = mkl_set_num_threads_local(1);
        float* Q = (float*)std::malloc((size_t)(TM * d * 4));
        float* S = (float*)std::malloc((size_t)(TM * n * 4));
        if (!Q || !S) no_memory = true;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < m; r0 += TM) {
            if (!Q || !S) continue;
            int64_t tm = std::min(TM, m - r0);
            for (int64_t u = 0; u < tm; u++) std::memcpy(Q + u * d, Qf + rows[r0 + u] * d, d * 4);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (MKL_INT)tm, (MKL_INT)n, (MKL_INT)d, 1.0f, Q,
                        (MKL_INT)d, Xc, (MKL_INT)ldc, 0.0f, S, (MKL_INT)n);
            for (int64_t u = 0; u < tm; u++) offer_row_fp32(t, rows[r0 + u], S + u * n, n, ids);
        }
        std::free(Q);
        std::free(S);
        mkl_set_num_threads_local(saved);
    }
    if (no_memory) throw std::bad_alloc();
}

#endif  // GRAPH_UTILS_MKL

}  // namespace

bool cpu_has_bf16() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

void to_bf16(const float* X, int64_t n, uint16_t* out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = bf16_bits(X[i]);
}

float knn_scan_list(const ScanTable& t, const int64_t* rows, int64_t m, const float* Qf, const uint16_t* Qb, int64_t d,
                    const float* Xc, int64_t n, int64_t ldc, const int32_t* ids, bool exact_now, bool fp32_mkl) {
    check_scan_args(t, rows, m, d, n, ldc);
#ifndef GRAPH_UTILS_MKL
    if (fp32_mkl) throw std::runtime_error("graph_utils was built without MKL: the float32 scan has no sgemm here");
#endif
    if (m == 0 || n == 0) return 0;
    if (Qb) {
        if (d % 2) throw std::invalid_argument("the bf16 scan needs an even dimension d");
        if (!cpu_has_bf16()) throw std::invalid_argument("this CPU has no AVX512-BF16: pass no bf16 queries");
#if defined(__x86_64__)
        return scan_bf16(t, rows, m, Qf, Qb, d, Xc, n, ldc, ids, exact_now);
#endif
    }
#ifdef GRAPH_UTILS_MKL
    if (fp32_mkl) {
        scan_fp32_mkl(t, rows, m, Qf, d, Xc, n, ldc, ids);
        return 0;
    }
#endif
    scan_fp32_hand(t, rows, m, Qf, d, Xc, n, ldc, ids);
    return 0;
}

void knn_scan_settle(const ScanTable& t) {
    if (t.kp < 1 || t.cap < 2 * t.kp || t.cap > MAX_CAP) throw std::invalid_argument("bad table shape");
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < t.n; r++) {
        float* a = t.A + r * t.cap;
        float* e = t.E + r * t.cap;
        int32_t* id = t.I + r * t.cap;
        int64_t c = t.cnt[r];
        if (c > t.kp) c = (cut_row(a, e, id, c, t.kp), t.kp);
        int32_t idx[MAX_CAP];
        float ta[MAX_CAP], te[MAX_CAP];
        int32_t ti[MAX_CAP];
        for (int64_t j = 0; j < c; j++) idx[j] = (int32_t)j;
        std::sort(idx, idx + c, Better{a, id});
        for (int64_t j = 0; j < t.kp; j++) {
            ta[j] = j < c ? a[idx[j]] : -std::numeric_limits<float>::infinity();
            te[j] = j < c ? e[idx[j]] : -std::numeric_limits<float>::infinity();
            ti[j] = j < c ? id[idx[j]] : -1;
        }
        std::memcpy(a, ta, t.kp * 4);
        std::memcpy(e, te, t.kp * 4);
        std::memcpy(id, ti, t.kp * 4);
        t.cnt[r] = (int32_t)c;
    }
}

int64_t knn_scan_rescore(const ScanTable& t, const float* Qf, int64_t d, const float* base, int64_t nbase, int64_t k,
                         float vmax) {
    if (k < 1 || k > t.kp) throw std::invalid_argument("need 1 <= k <= kp");
    if (!cpu_has_bf16()) throw std::invalid_argument("knn_scan_rescore follows a bf16 scan (AVX512-BF16)");
#if defined(__x86_64__)
    for (int64_t r = 0; r < t.n; r++)   // checked first: OpenMP loops never throw
        for (int64_t j = 0; j < t.kp; j++)
            if (t.I[r * t.cap + j] >= nbase)
                throw std::invalid_argument("I[" + std::to_string(r) + ", " + std::to_string(j) + "] = " +
                                            std::to_string(t.I[r * t.cap + j]) + " is not a row of base (" +
                                            std::to_string(nbase) + " rows)");
    int64_t uncertain = 0;
#pragma omp parallel for schedule(dynamic, 256) reduction(+ : uncertain)
    for (int64_t r = 0; r < t.n; r++) {
        const float* a = t.A + r * t.cap;
        const int32_t* id = t.I + r * t.cap;
        float* e = t.E + r * t.cap;
        const float* q = Qf + r * d;
        float qn = dot_exact(q, q, d);
        // |bf16 score - exact| <= 2^-8 |q| |v| (each factor rounded to 8 bits) + float32 rounding: the
        // exact k best have approximate scores >= a[k-1] - 2 * that bound
        float thr = a[k - 1] - (2.0f * std::ldexp(1.0f, -8) * std::sqrt(qn) * vmax + 1e-5f);
        for (int64_t j = 0; j < t.kp; j++) {
            if (id[j] >= 0 && j + 2 < t.kp && id[j + 2] >= 0)
                for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(base + (int64_t)id[j + 2] * d + c);
            if (id[j] < 0 || !(a[j] >= thr)) {
                e[j] = -std::numeric_limits<float>::infinity();
                continue;
            }
            e[j] = dot_exact(q, base + (int64_t)id[j] * d, d);
        }
        if (id[t.kp - 1] >= 0 && a[t.kp - 1] >= thr) uncertain++;   // a candidate within the bound may be missing
    }
    return uncertain;
#else
    return 0;   // not reached: cpu_has_bf16() is false off x86-64
#endif
}

void knn_scan_finish(const ScanTable& t, float* D, int32_t* Io, int64_t k) {
    if (k < 1 || k > t.kp) throw std::invalid_argument("need 1 <= k <= kp");
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < t.n; r++) {
        const float* e = t.E + r * t.cap;
        const int32_t* id = t.I + r * t.cap;
        int32_t order[MAX_CAP];
        int64_t cnt = 0;
        for (int64_t j = 0; j < t.kp; j++)
            if (id[j] >= 0 && e[j] > -std::numeric_limits<float>::infinity()) order[cnt++] = (int32_t)j;
        // exact score decreasing, then id increasing: the order does not depend on the scan
        std::sort(order, order + cnt, Better{e, id});
        for (int64_t j = 0; j < k; j++) {
            D[r * k + j] = j < cnt ? e[order[j]] : -std::numeric_limits<float>::infinity();
            Io[r * k + j] = j < cnt ? id[order[j]] : -1;
        }
    }
}

}  // namespace graph_utils
