// knn_scan: many queries against one block of database vectors (an IVF list), selected into k-best
// tables, with the product in bfloat16 (AVX512-BF16 dot-product instructions) and an exact float32
// re-score of every candidate that enters a table. See graph_utils.h for the contract.
//
// Why: the background graph's table is ~1e10 (query, vector) products of 256-d unit vectors. MKL's
// sgemm runs at ~105 GFLOP/s per Zen 4 core; the bf16 dot-product instruction at ~500 (measured,
// benchmarks/bench_build_graph.py). bf16 keeps 8 bits of mantissa, so a product of unit vectors is
// off by ~1e-4: the scan keeps kp > k candidates by approximate score, each with its exact score,
// and knn_scan_finish keeps the k best by exact score.
#include "graph_utils.h"

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <mkl_cblas.h>
#include <mkl_service.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

namespace graph_utils {

namespace {

#define GU_BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))

// float32 -> bfloat16 bits, round to nearest even (inputs are finite)
inline uint16_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Packed block of 16 database vectors for the dot-product instruction: for each pair of dimensions
// p (dims 2p, 2p+1), 32 bf16 values [v0[2p], v0[2p+1], v1[2p], ..., v15[2p+1]] (64 bytes). Vectors
// past n are zero.
void pack_block(const float* X, int64_t n, int64_t ldx, int64_t d, int64_t b, uint16_t* out) {
    const int64_t dp = d / 2;
    for (int64_t j = 0; j < 16; j++) {
        int64_t v = b * 16 + j;
        uint16_t* o = out + 2 * j;
        if (v < n) {
            const float* x = X + v * ldx;
            for (int64_t p = 0; p < dp; p++) {
                o[p * 32] = bf16_bits(x[2 * p]);
                o[p * 32 + 1] = bf16_bits(x[2 * p + 1]);
            }
        } else {
            for (int64_t p = 0; p < dp; p++) o[p * 32] = o[p * 32 + 1] = 0;
        }
    }
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

// Offers n approximate scores s[j] (ids[j], vectors Xc[j]) to one table row of kp slots kept in
// decreasing approximate score a; each entering candidate gets its exact score e = <q, Xc[j]>.
GU_BF16_TARGET inline void add_row_rescored(float* a, float* e, int32_t* id, int64_t kp, const float* s, int64_t n,
                                            const int32_t* ids, const float* q, const float* Xc, int64_t ldc,
                                            int64_t d) {
    float thr = a[kp - 1];
    int64_t j = 0;
    for (; j < n; j += 16) {
        __mmask16 live = (__mmask16)(n - j >= 16 ? 0xffff : ((1u << (n - j)) - 1));
        __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(s + j), _mm512_set1_ps(thr), _CMP_GT_OQ);
        while (hit) {
            int t = __builtin_ctz(hit);
            hit &= hit - 1;
            float v = s[j + t];
            if (!(v > thr)) continue;  // the threshold rose since the mask was taken
            int64_t pos = kp - 1;
            while (pos > 0 && a[pos - 1] < v) {
                a[pos] = a[pos - 1];
                e[pos] = e[pos - 1];
                id[pos] = id[pos - 1];
                pos--;
            }
            a[pos] = v;
            e[pos] = dot_exact(q, Xc + (j + t) * ldc, d);
            id[pos] = ids[j + t];
            thr = a[kp - 1];
        }
    }
}

// The same without the exact score (deferred to knn_scan_rescore): no access to the fp32 vectors,
// whose rows are not in cache here (at 10M, fetching them at every insertion cost half the scan).
GU_BF16_TARGET inline void add_row_approx(float* a, int32_t* id, int64_t kp, const float* s, int64_t n,
                                          const int32_t* ids) {
    float thr = a[kp - 1];
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 live = (__mmask16)(n - j >= 16 ? 0xffff : ((1u << (n - j)) - 1));
        __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(s + j), _mm512_set1_ps(thr), _CMP_GT_OQ);
        while (hit) {
            int t = __builtin_ctz(hit);
            hit &= hit - 1;
            float v = s[j + t];
            if (!(v > thr)) continue;
            int64_t pos = kp - 1;
            while (pos > 0 && a[pos - 1] < v) {
                a[pos] = a[pos - 1];
                id[pos] = id[pos - 1];
                pos--;
            }
            a[pos] = v;
            id[pos] = ids[j + t];
            thr = a[kp - 1];
        }
    }
}

// float32 path (CPUs without AVX512-BF16): same interface, sgemm on gathered query tiles; the scores
// are exact, so a = e.
void add_row_exact(float* a, float* e, int32_t* id, int64_t kp, const float* s, int64_t n, const int32_t* ids) {
    float thr = a[kp - 1];
    for (int64_t j = 0; j < n; j++) {
        float v = s[j];
        if (!(v > thr)) continue;
        int64_t pos = kp - 1;
        while (pos > 0 && a[pos - 1] < v) {
            a[pos] = a[pos - 1];
            e[pos] = e[pos - 1];
            id[pos] = id[pos - 1];
            pos--;
        }
        a[pos] = e[pos] = v;
        id[pos] = ids[j];
        thr = a[kp - 1];
    }
}

struct AlignedFree {
    void operator()(void* p) const { std::free(p); }
};

void check_scan_args(int64_t n_table, int64_t kp, const int64_t* rows, int64_t m, int64_t d, int64_t n,
                     int64_t ldc) {
    if (kp < 1) throw std::invalid_argument("the table needs at least 1 column");
    if (d < 1 || ldc < d) throw std::invalid_argument("Xc has a row stride smaller than d");
    if (n >= (int64_t(1) << 31)) throw std::invalid_argument("a block holds at most 2^31 - 1 vectors");
    for (int64_t r = 0; r < m; r++) {
        if (rows[r] < 0 || rows[r] >= n_table)
            throw std::invalid_argument("rows[" + std::to_string(r) + "] = " + std::to_string(rows[r]) +
                                        " is outside the table's " + std::to_string(n_table) + " rows");
        if (r > 0 && rows[r] <= rows[r - 1])
            throw std::invalid_argument("rows must be strictly increasing (rows[" + std::to_string(r) + "] = " +
                                        std::to_string(rows[r]) + " after " + std::to_string(rows[r - 1]) + ")");
    }
}

float scan_bf16(float* A, float* E, int32_t* I, int64_t kp, const int64_t* rows, int64_t m, const float* Qf,
                const uint16_t* Qb, int64_t d, const float* Xc, int64_t n, int64_t ldc, const int32_t* ids,
                bool exact_now) {
    constexpr int RQ = 6, NB = 4;          // 24 accumulators: 6 queries x 64 vectors per micro-kernel
    constexpr int64_t TM = 96;             // queries per tile (a multiple of RQ)
    constexpr int64_t CB = 32;             // blocks of 16 vectors scored before selection (512 vectors):
                                           // the tile's scores (TM x 512 floats) stay in L2
    const int64_t dp = d / 2;
    const int64_t nb = (n + 15) / 16, nbp = (nb + NB - 1) / NB * NB;
    std::unique_ptr<uint16_t, AlignedFree> packed(
        (uint16_t*)std::aligned_alloc(64, (size_t)(nbp * dp * 64 + 64)));
    if (!packed) throw std::bad_alloc();
    uint16_t* P = packed.get();
    const int64_t lds = CB * 16;
    std::atomic<bool> no_memory(false);   // OpenMP regions never throw: allocation failures are raised after
    float norm2_max = 0;                  // of the candidates: bounds the bf16 error (knn_scan_rescore)
#pragma omp parallel
    {
#pragma omp for schedule(static) reduction(max : norm2_max)
        for (int64_t b = 0; b < nbp; b++) {
            pack_block(Xc, n, ldc, d, b, P + b * dp * 32);
            for (int64_t v = b * 16; v < std::min(n, b * 16 + 16); v++) {
                float s2 = 0;
                for (int64_t i = 0; i < d; i++) s2 += Xc[v * ldc + i] * Xc[v * ldc + i];
                norm2_max = std::max(norm2_max, s2);
            }
        }
        // omp for ends with a barrier: every block is packed below
        float* S = (float*)std::aligned_alloc(64, (size_t)(TM * lds * 4));
        if (!S) no_memory = true;
        const uint16_t* qp[TM];
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < m; r0 += TM) {
            if (!S) continue;
            int64_t tm = std::min(TM, m - r0), tmp = (tm + RQ - 1) / RQ * RQ;
            for (int64_t t = 0; t < tmp; t++) qp[t] = Qb + rows[r0 + std::min(t, tm - 1)] * d;
            for (int64_t c0 = 0; c0 < nbp; c0 += CB) {
                int64_t c1 = std::min(nbp, c0 + CB);
                for (int64_t a0 = 0; a0 < tmp; a0 += RQ)
                    for (int64_t b0 = c0; b0 < c1; b0 += NB)
                        micro_bf16<RQ, NB>(qp + a0, P + b0 * dp * 32, dp, S + a0 * lds + (b0 - c0) * 16, lds);
                int64_t j0 = c0 * 16, cn = std::min(n, c1 * 16) - j0;
                for (int64_t t = 0; t < tm; t++) {
                    int64_t row = rows[r0 + t];
                    if (exact_now)
                        add_row_rescored(A + row * kp, E + row * kp, I + row * kp, kp, S + t * lds, cn, ids + j0,
                                         Qf + row * d, Xc + j0 * ldc, ldc, d);
                    else
                        add_row_approx(A + row * kp, I + row * kp, kp, S + t * lds, cn, ids + j0);
                }
            }
        }
        std::free(S);
    }
    if (no_memory) throw std::bad_alloc();
    return std::sqrt(norm2_max);
}

void scan_fp32(float* A, float* E, int32_t* I, int64_t kp, const int64_t* rows, int64_t m, const float* Qf,
               int64_t d, const float* Xc, int64_t n, int64_t ldc, const int32_t* ids) {
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
            for (int64_t t = 0; t < tm; t++) std::memcpy(Q + t * d, Qf + rows[r0 + t] * d, d * 4);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (MKL_INT)tm, (MKL_INT)n, (MKL_INT)d, 1.0f, Q,
                        (MKL_INT)d, Xc, (MKL_INT)ldc, 0.0f, S, (MKL_INT)n);
            for (int64_t t = 0; t < tm; t++) {
                int64_t row = rows[r0 + t];
                add_row_exact(A + row * kp, E + row * kp, I + row * kp, kp, S + t * n, n, ids);
            }
        }
        std::free(Q);
        std::free(S);
        mkl_set_num_threads_local(saved);
    }
    if (no_memory) throw std::bad_alloc();
}

}  // namespace

bool cpu_has_bf16() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

void to_bf16(const float* X, int64_t n, uint16_t* out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = bf16_bits(X[i]);
}

float knn_scan_list(float* A, float* E, int32_t* I, int64_t n_table, int64_t kp, const int64_t* rows, int64_t m,
                    const float* Qf, const uint16_t* Qb, int64_t d, const float* Xc, int64_t n, int64_t ldc,
                    const int32_t* ids, bool exact_now) {
    check_scan_args(n_table, kp, rows, m, d, n, ldc);
    if (m == 0 || n == 0) return 0;
    if (Qb) {
        if (d % 2) throw std::invalid_argument("the bf16 scan needs an even dimension d");
        if (!cpu_has_bf16()) throw std::invalid_argument("this CPU has no AVX512-BF16: pass no bf16 queries");
        return scan_bf16(A, E, I, kp, rows, m, Qf, Qb, d, Xc, n, ldc, ids, exact_now);
    }
    scan_fp32(A, E, I, kp, rows, m, Qf, d, Xc, n, ldc, ids);
    return 0;
}

int64_t knn_scan_rescore(const float* A, float* E, const int32_t* I, int64_t n, int64_t kp, const float* Qf,
                         int64_t d, const float* base, int64_t nbase, int64_t k, float vmax) {
    if (k < 1 || k > kp) throw std::invalid_argument("need 1 <= k <= kp");
    if (!cpu_has_bf16()) throw std::invalid_argument("knn_scan_rescore follows a bf16 scan (AVX512-BF16)");
    for (int64_t r = 0; r < n; r++)   // checked first: OpenMP loops never throw
        for (int64_t j = 0; j < kp; j++)
            if (I[r * kp + j] >= nbase)
                throw std::invalid_argument("I[" + std::to_string(r) + ", " + std::to_string(j) + "] = " +
                                            std::to_string(I[r * kp + j]) + " is not a row of base (" +
                                            std::to_string(nbase) + " rows)");
    int64_t uncertain = 0;
#pragma omp parallel for schedule(dynamic, 256) reduction(+ : uncertain)
    for (int64_t r = 0; r < n; r++) {
        const float* a = A + r * kp;
        const int32_t* id = I + r * kp;
        float* e = E + r * kp;
        const float* q = Qf + r * d;
        float qn = dot_exact(q, q, d);
        // |bf16 score - exact| <= 2^-8 |q| |v| (each factor rounded to 8 bits) + float32 rounding: the
        // exact k best have approximate scores >= a[k-1] - 2 * that bound
        float thr = a[k - 1] - (2.0f * std::ldexp(1.0f, -8) * std::sqrt(qn) * vmax + 1e-5f);
        for (int64_t j = 0; j < kp; j++) {
            if (id[j] >= 0 && j + 2 < kp && id[j + 2] >= 0)
                for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(base + (int64_t)id[j + 2] * d + c);
            if (id[j] < 0 || !(a[j] >= thr)) {
                e[j] = -std::numeric_limits<float>::infinity();
                continue;
            }
            e[j] = dot_exact(q, base + (int64_t)id[j] * d, d);
        }
        if (id[kp - 1] >= 0 && a[kp - 1] >= thr) uncertain++;   // a candidate within the bound may be missing
    }
    return uncertain;
}

void knn_scan_finish(const float* E, const int32_t* I, int64_t n, int64_t kp, float* D, int32_t* Io, int64_t k) {
    if (k < 1 || k > kp) throw std::invalid_argument("need 1 <= k <= kp");
    std::atomic<bool> no_memory(false);
#pragma omp parallel
    {
        int64_t* order = (int64_t*)std::malloc((size_t)(kp * 8));
        if (!order) no_memory = true;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (!order) continue;
            const float* e = E + r * kp;
            const int32_t* id = I + r * kp;
            int64_t cnt = 0;
            for (int64_t j = 0; j < kp; j++)
                if (id[j] >= 0) order[cnt++] = j;
            // exact score decreasing, then id increasing: the order does not depend on the scan
            std::stable_sort(order, order + cnt, [&](int64_t x, int64_t y) {
                return e[x] > e[y] || (e[x] == e[y] && id[x] < id[y]);
            });
            for (int64_t j = 0; j < k; j++) {
                D[r * k + j] = j < cnt ? e[order[j]] : -std::numeric_limits<float>::infinity();
                Io[r * k + j] = j < cnt ? id[order[j]] : -1;
            }
        }
        std::free(order);
    }
    if (no_memory) throw std::bad_alloc();
}

}  // namespace graph_utils
