// Implementation of graph_utils.h. OpenMP loops never throw: they record the first problem and the
// caller throws after the parallel region.
#include "graph_utils.h"

#ifdef GRAPH_UTILS_MKL
#include <mkl_spblas.h>
#endif
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace graph_utils {

bool has_mkl() {
#ifdef GRAPH_UTILS_MKL
    return true;
#else
    return false;
#endif
}

namespace {

std::string fmt(const char* f, long long a = 0, long long b = 0, long long c = 0) {
    char buf[512];
    snprintf(buf, sizeof(buf), f, a, b, c);
    return buf;
}

template <class T>
T* xmalloc(int64_t n) {
    void* p = malloc(std::max<int64_t>(n, 1) * sizeof(T));
    if (!p) throw std::bad_alloc();
    return (T*)p;
}

// First error seen by any thread of a parallel loop: the smallest (row, code) wins, so the message
// does not depend on scheduling.
struct ParallelError {
    std::atomic<int64_t> row{INT64_MAX};
    int64_t a = 0, b = 0;
    int code = 0;
    void set(int64_t r, int c, int64_t x = 0, int64_t y = 0) {
#pragma omp critical(graph_utils_error)
        {
            if (r < row.load()) {
                row = r;
                code = c;
                a = x;
                b = y;
            }
        }
    }
    bool any() const { return row.load() != INT64_MAX; }
};

// prefix sum of counts[0..n) into indptr[0..n] (indptr[0] = 0)
void prefix_sum(const int64_t* counts, int64_t n, int64_t* indptr) {
    indptr[0] = 0;
    for (int64_t i = 0; i < n; i++) indptr[i + 1] = indptr[i] + counts[i];
}

// Row chunks of roughly equal (nnz + rows): the hand kernel and merges cost about that much per row.
std::vector<int64_t> balanced_chunks(const int64_t* indptr, int64_t nrow, int64_t nchunk) {
    int64_t total = indptr[nrow] + nrow;
    nchunk = std::max<int64_t>(1, std::min(nchunk, nrow));
    std::vector<int64_t> b(nchunk + 1);
    b[0] = 0;
    for (int64_t c = 1; c < nchunk; c++) {
        int64_t target = (int64_t)((double)total * c / nchunk);
        int64_t lo = b[c - 1], hi = nrow;  // smallest r with indptr[r] + r >= target
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if (indptr[mid] + mid >= target) hi = mid; else lo = mid + 1;
        }
        b[c] = lo;
    }
    b[nchunk] = nrow;
    return b;
}

}  // namespace

CSROwned::~CSROwned() {
    free(indptr);
    free(indices);
    free(data);
}

void CSROwned::alloc_rows(int64_t nr, int64_t nc) {
    nrow = nr;
    ncol = nc;
    free(indptr);
    indptr = xmalloc<int64_t>(nr + 1);
    memset(indptr, 0, (nr + 1) * sizeof(int64_t));
}

void CSROwned::alloc_nnz(int64_t nnz) {
    free(indices);
    free(data);
    indices = xmalloc<int32_t>(nnz);
    data = xmalloc<float>(nnz);
}

void check_csr(const CSRView& A, bool require_sorted) {
    if (A.nrow < 0 || A.ncol < 0 || A.ncol > INT32_MAX)
        throw std::invalid_argument(fmt("invalid shape (%lld, %lld)", A.nrow, A.ncol));
    if (A.indptr[0] != 0) throw std::invalid_argument(fmt("indptr[0] = %lld, must be 0", A.indptr[0]));
    ParallelError err;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < A.nrow; r++) {
        int64_t p0 = A.indptr[r], p1 = A.indptr[r + 1];
        if (p1 < p0) { err.set(r, 1); continue; }
        for (int64_t p = p0; p < p1; p++) {
            int32_t j = A.indices[p];
            if (j < 0 || j >= A.ncol) { err.set(r, 2, p, j); break; }
            if (require_sorted && p > p0 && A.indices[p - 1] >= j) { err.set(r, 3, p, j); break; }
        }
    }
    if (err.any()) {
        int64_t r = err.row;
        if (err.code == 1) throw std::invalid_argument(fmt("indptr decreases at row %lld", r));
        if (err.code == 2)
            throw std::invalid_argument(
                    fmt("column index %lld at position %lld (row %lld) out of range", err.b, err.a, r) +
                    fmt(" [0, %lld)", A.ncol));
        throw std::invalid_argument(fmt("row %lld is not strictly increasing (column %lld at position %lld)",
                                        r, err.b, err.a));
    }
}

template <class TI>
void csr_from_knn(const TI* I, int64_t n, int64_t k, int64_t ldi, int64_t ncol, const float* values,
                  int64_t ldv, CSROwned& out) {
    out.alloc_rows(n, ncol);
    std::vector<int64_t> counts(n);
    ParallelError err;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t c = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t v = I[i * ldi + j];
            if (v == -1) continue;
            if (v < 0 || v >= ncol) { err.set(i, 1, j, v); break; }
            c++;
        }
        counts[i] = c;
    }
    if (err.any())
        throw std::invalid_argument(fmt("I[%lld, %lld] = %lld is neither -1 nor a valid id", err.row, err.a,
                                        err.b) + fmt(" in [0, %lld)", ncol));
    prefix_sum(counts.data(), n, out.indptr);
    out.alloc_nnz(out.indptr[n]);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t p = out.indptr[i];
        for (int64_t j = 0; j < k; j++) {
            int64_t v = I[i * ldi + j];
            if (v < 0) continue;
            out.indices[p] = (int32_t)v;
            out.data[p] = values ? values[i * ldv + j] : 1.0f;
            p++;
        }
    }
}

void transpose(const CSRView& A, CSROwned& out) {
    int64_t nrow = A.nrow, ncol = A.ncol, nnz = A.nnz();
    out.alloc_rows(ncol, nrow);
    out.alloc_nnz(nnz);
    // one private count array per thread (stable fill without atomics); the arrays cost nt * ncol * 8
    // bytes, so use at most nnz / ncol threads to keep that below the size of the index array
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), nnz / std::max<int64_t>(ncol, 1)));
    std::vector<int64_t> bounds = balanced_chunks(A.indptr, nrow, nt);
    nt = (int)bounds.size() - 1;
    std::vector<int64_t> cnt((size_t)nt * ncol, 0);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t* c = cnt.data() + (size_t)t * ncol;
        for (int64_t p = A.indptr[bounds[t]]; p < A.indptr[bounds[t + 1]]; p++) c[A.indices[p]]++;
    }
    // out.indptr[j + 1] = total count of column j; then cnt[t][j] becomes thread t's first slot
    for (int64_t j = 0; j < ncol; j++) {
        int64_t s = 0;
        for (int t = 0; t < nt; t++) s += cnt[(size_t)t * ncol + j];
        out.indptr[j + 1] = out.indptr[j] + s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < ncol; j++) {
        int64_t o = out.indptr[j];
        for (int t = 0; t < nt; t++) {
            int64_t c = cnt[(size_t)t * ncol + j];
            cnt[(size_t)t * ncol + j] = o;
            o += c;
        }
    }
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t* slot = cnt.data() + (size_t)t * ncol;
        for (int64_t r = bounds[t]; r < bounds[t + 1]; r++)
            for (int64_t p = A.indptr[r]; p < A.indptr[r + 1]; p++) {
                int64_t q = slot[A.indices[p]]++;
                out.indices[q] = (int32_t)r;
                out.data[q] = A.data[p];
            }
    }
}

namespace {

// stable sort of (idx, val) pairs of one row by idx
void sort_row(int32_t* idx, float* val, int64_t len, std::vector<std::pair<int32_t, float>>& tmp) {
    if (len <= 64) {
        for (int64_t a = 1; a < len; a++) {
            int32_t ki = idx[a];
            float kv = val[a];
            int64_t b = a - 1;
            while (b >= 0 && idx[b] > ki) {
                idx[b + 1] = idx[b];
                val[b + 1] = val[b];
                b--;
            }
            idx[b + 1] = ki;
            val[b + 1] = kv;
        }
        return;
    }
    tmp.resize(len);
    for (int64_t a = 0; a < len; a++) tmp[a] = {idx[a], val[a]};
    std::stable_sort(tmp.begin(), tmp.end(),
                     [](const std::pair<int32_t, float>& x, const std::pair<int32_t, float>& y) {
                         return x.first < y.first;
                     });
    for (int64_t a = 0; a < len; a++) {
        idx[a] = tmp[a].first;
        val[a] = tmp[a].second;
    }
}

}  // namespace

void sort_rows(const CSRView& A) {
    std::atomic<bool> no_memory(false);   // a failed allocation is thrown after the region
#pragma omp parallel
    {
        std::vector<std::pair<int32_t, float>> tmp;
#pragma omp for schedule(dynamic, 1024)
        for (int64_t r = 0; r < A.nrow; r++) {
            if (no_memory) continue;
            int64_t p0 = A.indptr[r];
            try {
                sort_row(A.indices + p0, A.data + p0, A.indptr[r + 1] - p0, tmp);
            } catch (const std::bad_alloc&) {
                no_memory = true;
            }
        }
    }
    if (no_memory) throw std::bad_alloc();
}

namespace {

// A + B for two row-sorted matrices (rows strictly increasing), count then fill
void add_rows(const CSRView& A, const CSRView& B, CSROwned& out) {
    if (A.nrow != B.nrow || A.ncol != B.ncol)
        throw std::invalid_argument(fmt("shapes differ: (%lld, %lld) and ", A.nrow, A.ncol) +
                                    fmt("(%lld, %lld)", B.nrow, B.ncol));
    int64_t n = A.nrow;
    out.alloc_rows(n, A.ncol);
    std::vector<int64_t> counts(n);
    ParallelError err;
#pragma omp parallel for schedule(dynamic, 4096)
    for (int64_t r = 0; r < n; r++) {
        int64_t a = A.indptr[r], ae = A.indptr[r + 1], b = B.indptr[r], be = B.indptr[r + 1];
        for (int64_t p = a + 1; p < ae; p++)
            if (A.indices[p - 1] >= A.indices[p]) { err.set(r, 1); break; }
        for (int64_t p = b + 1; p < be; p++)
            if (B.indices[p - 1] >= B.indices[p]) { err.set(r, 2); break; }
        int64_t c = 0;
        while (a < ae && b < be) {
            int32_t ja = A.indices[a], jb = B.indices[b];
            if (ja == jb) { c++; a++; b++; }
            else if (ja < jb) { c++; a++; }
            else { c++; b++; }
        }
        c += (ae - a) + (be - b);
        counts[r] = c;
    }
    if (err.any())
        throw std::invalid_argument("row " + std::to_string(err.row) + " of the " +
                                    (err.code == 1 ? "first" : "second") +
                                    " matrix is not strictly increasing (sort_rows first; duplicates are not "
                                    "allowed)");
    prefix_sum(counts.data(), n, out.indptr);
    out.alloc_nnz(out.indptr[n]);
#pragma omp parallel for schedule(dynamic, 4096)
    for (int64_t r = 0; r < n; r++) {
        int64_t a = A.indptr[r], ae = A.indptr[r + 1], b = B.indptr[r], be = B.indptr[r + 1];
        int64_t q = out.indptr[r];
        while (a < ae && b < be) {
            int32_t ja = A.indices[a], jb = B.indices[b];
            if (ja == jb) {
                out.indices[q] = ja;
                out.data[q++] = A.data[a++] + B.data[b++];
            } else if (ja < jb) {
                out.indices[q] = ja;
                out.data[q++] = A.data[a++];
            } else {
                out.indices[q] = jb;
                out.data[q++] = B.data[b++];
            }
        }
        for (; a < ae; a++) { out.indices[q] = A.indices[a]; out.data[q++] = A.data[a]; }
        for (; b < be; b++) { out.indices[q] = B.indices[b]; out.data[q++] = B.data[b]; }
    }
}

}  // namespace

void csr_add(const CSRView& A, const CSRView& B, CSROwned& out) { add_rows(A, B, out); }

void row_normalize(const CSRView& A) {
#pragma omp parallel for schedule(dynamic, 4096)
    for (int64_t r = 0; r < A.nrow; r++) {
        double s = 0;
        for (int64_t p = A.indptr[r]; p < A.indptr[r + 1]; p++) s += std::fabs(A.data[p]);
        if (s == 0) continue;
        float inv = (float)(1.0 / s);
        for (int64_t p = A.indptr[r]; p < A.indptr[r + 1]; p++) A.data[p] *= inv;
    }
}

void col_normalize(float* X, int64_t n, int64_t C) {
    std::vector<double> sums(C, 0.0);
    // per-thread partial sums, allocated before the region (nothing throws inside it)
    const int nt = omp_get_max_threads();
    std::vector<double> partial((size_t)nt * C, 0.0);
#pragma omp parallel num_threads(nt)
    {
        double* s = partial.data() + (size_t)omp_get_thread_num() * C;
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < C; c++) s[c] += X[i * C + c];
#pragma omp critical(graph_utils_colsum)
        for (int64_t c = 0; c < C; c++) sums[c] += s[c];
    }
    std::vector<float> inv(C);
    for (int64_t c = 0; c < C; c++) inv[c] = sums[c] == 0 ? 1.0f : (float)(1.0 / sums[c]);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++) X[i * C + c] *= inv[c];
}

template <class TI>
void knn_to_graph(const TI* I, int64_t n, int64_t k, int64_t ldi, CSROwned& out) {
    if (n > INT32_MAX) throw std::invalid_argument("graphs are limited to 2^31 - 1 nodes");
    // W0 with sorted, deduplicated rows: first in a padded n x k layout, then compacted
    std::vector<int32_t> pad((size_t)n * k);
    std::vector<int64_t> counts(n);
    ParallelError err;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int32_t* row = pad.data() + (size_t)i * k;
        int64_t c = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t v = I[i * ldi + j];
            if (v == -1) continue;
            if (v < 0 || v >= n) { err.set(i, 1, j, v); break; }
            int64_t b = c++;  // insertion into the sorted prefix
            while (b > 0 && row[b - 1] > v) { row[b] = row[b - 1]; b--; }
            row[b] = (int32_t)v;
        }
        int64_t u = 0;
        for (int64_t a = 0; a < c; a++)
            if (u == 0 || row[u - 1] != row[a]) row[u++] = row[a];
        counts[i] = u;
    }
    if (err.any())
        throw std::invalid_argument(fmt("I[%lld, %lld] = %lld is neither -1 nor a node id", err.row, err.a,
                                        err.b) + fmt(" in [0, %lld)", n));
    CSROwned W0;
    W0.alloc_rows(n, n);
    prefix_sum(counts.data(), n, W0.indptr);
    W0.alloc_nnz(W0.indptr[n]);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t p = W0.indptr[i];
        for (int64_t a = 0; a < counts[i]; a++) {
            W0.indices[p + a] = pad[(size_t)i * k + a];
            W0.data[p + a] = 1.0f;
        }
    }
    std::vector<int32_t>().swap(pad);
    CSROwned W0T;
    transpose(W0.view(), W0T);
    csr_add(W0.view(), W0T.view(), out);
    row_normalize(out.view());
}

// ---------------------------------------------------------------- sparse x sparse (few columns)

void spgemm(const CSRView& A, const CSRView& B, CSROwned& out) {
    if (A.ncol != B.nrow)
        throw std::invalid_argument(fmt("A has %lld columns but B has %lld rows", A.ncol, B.nrow));
    const int64_t m = A.nrow, n = B.ncol;
    out.alloc_rows(m, n);
    std::vector<int64_t> counts(m);
    const int nt = omp_get_max_threads();
    // per thread, over B's columns: the last row that touched a column, its running sum, the touched list
    std::vector<int64_t> marks((size_t)nt * n, -1);
    std::vector<float> accs((size_t)nt * n);
    std::vector<int32_t> lists((size_t)nt * n);
    // pass 1: entries per row of the product
#pragma omp parallel num_threads(nt)
    {
        int64_t* mark = marks.data() + (size_t)omp_get_thread_num() * n;
#pragma omp for schedule(dynamic, 4096)
        for (int64_t i = 0; i < m; i++) {
            int64_t cnt = 0;
            for (int64_t p = A.indptr[i]; p < A.indptr[i + 1]; p++) {
                const int64_t j = A.indices[p];
                for (int64_t q = B.indptr[j]; q < B.indptr[j + 1]; q++) {
                    const int32_t c = B.indices[q];
                    if (mark[c] != i) {
                        mark[c] = i;
                        cnt++;
                    }
                }
            }
            counts[i] = cnt;
        }
    }
    prefix_sum(counts.data(), m, out.indptr);
    out.alloc_nnz(out.indptr[m]);
    std::fill(marks.begin(), marks.end(), (int64_t)-1);
    // pass 2: the sums, each row's columns sorted; A's entries of a row are added in their order
#pragma omp parallel num_threads(nt)
    {
        const size_t off = (size_t)omp_get_thread_num() * n;
        int64_t* mark = marks.data() + off;
        float* acc = accs.data() + off;
        int32_t* list = lists.data() + off;
#pragma omp for schedule(dynamic, 4096)
        for (int64_t i = 0; i < m; i++) {
            int64_t len = 0;
            for (int64_t p = A.indptr[i]; p < A.indptr[i + 1]; p++) {
                const int64_t j = A.indices[p];
                const float a = A.data[p];
                for (int64_t q = B.indptr[j]; q < B.indptr[j + 1]; q++) {
                    const int32_t c = B.indices[q];
                    if (mark[c] != i) {
                        mark[c] = i;
                        acc[c] = a * B.data[q];
                        list[len++] = c;
                    } else {
                        acc[c] += a * B.data[q];
                    }
                }
            }
            std::sort(list, list + len);
            int64_t o = out.indptr[i];
            for (int64_t t = 0; t < len; t++) {
                out.indices[o + t] = list[t];
                out.data[o + t] = acc[list[t]];
            }
        }
    }
}

// ---------------------------------------------------------------- sparse x dense, hand-written kernel

namespace {

// Prefetch into L2 (locality hint 2, prefetcht1): on the 2-core AMD EPYC VMs we measured, prefetching
// into L1 (hint 3) at any distance left random gathers ~2x slower than L2 prefetches at distance 8-16.
constexpr int PREFETCH_HINT = 2;
constexpr int64_t PREFETCH_LINES = 8;  // at most this many 64-byte lines per row (the hardware
                                       // prefetcher follows the rest of a long row)

// Rows [r0, r1) of Y. Cloned for AVX-512 / AVX2+FMA / baseline, chosen at load time by the CPU, so the
// module built with portable flags still runs the wide vector loop where available.
GU_CLONES
int64_t spmm_rows(const int64_t* __restrict indptr, const int32_t* __restrict indices,
                  const float* __restrict data, int64_t ncol, int64_t nnz, int64_t r0, int64_t r1,
                  const float* __restrict X, int64_t C, float* __restrict Y, int64_t pf_dist) {
    int64_t lines = std::min<int64_t>((C * 4 + 63) / 64, PREFETCH_LINES);
    for (int64_t r = r0; r < r1; r++) {
        float* __restrict y = Y + r * C;
        for (int64_t c = 0; c < C; c++) y[c] = 0;
        int64_t p0 = indptr[r], p1 = indptr[r + 1];
        if (p1 < p0 || p1 > nnz) return r;
        for (int64_t p = p0; p < p1; p++)
            if ((uint32_t)indices[p] >= (uint64_t)ncol) return r;
        int64_t p = p0;
        for (; p + 4 <= p1; p += 4) {
            for (int64_t q = p + pf_dist; q < std::min(p + pf_dist + 4, nnz); q++) {
                const char* xr = (const char*)(X + (int64_t)indices[q] * C);
                for (int64_t l = 0; l < lines; l++) __builtin_prefetch(xr + 64 * l, 0, PREFETCH_HINT);
            }
            const float a0 = data[p], a1 = data[p + 1], a2 = data[p + 2], a3 = data[p + 3];
            const float* __restrict x0 = X + (int64_t)indices[p] * C;
            const float* __restrict x1 = X + (int64_t)indices[p + 1] * C;
            const float* __restrict x2 = X + (int64_t)indices[p + 2] * C;
            const float* __restrict x3 = X + (int64_t)indices[p + 3] * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] += (a0 * x0[c] + a1 * x1[c]) + (a2 * x2[c] + a3 * x3[c]);
        }
        for (; p < p1; p++) {
            const float a = data[p];
            const float* __restrict x = X + (int64_t)indices[p] * C;
            if (p + pf_dist < nnz) {
                const char* xr = (const char*)(X + (int64_t)indices[p + pf_dist] * C);
                for (int64_t l = 0; l < lines; l++) __builtin_prefetch(xr + 64 * l, 0, PREFETCH_HINT);
            }
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] += a * x[c];
        }
    }
    return -1;
}

}  // namespace

int64_t prefetch_distance = 16;

void spmm_hand(const CSRView& A, const float* X, int64_t C, float* Y) {
    if (A.indptr[0] != 0) throw std::invalid_argument("indptr[0] must be 0");
    int64_t nnz = A.indptr[A.nrow];
    std::vector<int64_t> bounds = balanced_chunks(A.indptr, A.nrow, (int64_t)omp_get_max_threads() * 16);
    int64_t nchunk = (int64_t)bounds.size() - 1;
    ParallelError err;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        int64_t bad = spmm_rows(A.indptr, A.indices, A.data, A.ncol, nnz, bounds[ch], bounds[ch + 1], X, C, Y,
                                prefetch_distance);
        if (bad >= 0) err.set(bad, 1);
    }
    if (err.any())
        throw std::invalid_argument(fmt("invalid row %lld (indptr decreasing or column index out of range); "
                                        "the CSR constructor checks these", err.row));
}

// ---------------------------------------------------------------- sparse x dense, MKL inspector-executor

#ifdef GRAPH_UTILS_MKL

namespace {

const char* status_name(sparse_status_t s) {
    switch (s) {
        case SPARSE_STATUS_SUCCESS: return "SPARSE_STATUS_SUCCESS";
        case SPARSE_STATUS_NOT_INITIALIZED: return "SPARSE_STATUS_NOT_INITIALIZED";
        case SPARSE_STATUS_ALLOC_FAILED: return "SPARSE_STATUS_ALLOC_FAILED";
        case SPARSE_STATUS_INVALID_VALUE: return "SPARSE_STATUS_INVALID_VALUE";
        case SPARSE_STATUS_EXECUTION_FAILED: return "SPARSE_STATUS_EXECUTION_FAILED";
        case SPARSE_STATUS_INTERNAL_ERROR: return "SPARSE_STATUS_INTERNAL_ERROR";
        case SPARSE_STATUS_NOT_SUPPORTED: return "SPARSE_STATUS_NOT_SUPPORTED";
        default: return "unknown sparse_status_t";
    }
}

void mkl_check(sparse_status_t s, const char* call, int64_t block) {
    if (s != SPARSE_STATUS_SUCCESS)
        throw std::runtime_error(std::string("MKL ") + call + " failed on row block " + std::to_string(block) +
                                 ": " + status_name(s) + " (" + std::to_string((int)s) + ")");
}

matrix_descr general_descr() {
    matrix_descr d;
    d.type = SPARSE_MATRIX_TYPE_GENERAL;
    d.mode = SPARSE_FILL_MODE_LOWER;
    d.diag = SPARSE_DIAG_NON_UNIT;
    return d;
}

}  // namespace

MklSpmm::MklSpmm(const CSRView& A, int64_t C, int64_t max_block_nnz, int expected_calls) : A_(A), C_(C) {
    if (C < 0 || C > INT32_MAX) throw std::invalid_argument("C out of range for MKL's 32-bit dimensions");
    if (max_block_nnz < 1 || max_block_nnz > INT32_MAX)
        throw std::invalid_argument("max_block_nnz must be in [1, 2^31 - 1]");
    check_csr(A, false);
    const int64_t* ip = A.indptr;
    try {
        for (int64_t r0 = 0; r0 < A.nrow;) {
            // last row end r1 with ip[r1] - ip[r0] <= max_block_nnz, and at most INT32_MAX rows
            int64_t lim = std::min<int64_t>(A.nrow, r0 + INT32_MAX - 1);
            int64_t r1 = std::upper_bound(ip + r0, ip + lim + 1, ip[r0] + max_block_nnz) - ip - 1;
            if (r1 == r0)
                throw std::invalid_argument(fmt("row %lld has %lld entries, more than a row block holds (%lld)",
                                                r0, ip[r0 + 1] - ip[r0], max_block_nnz));
            Block b;
            b.row0 = r0;
            b.nrow = r1 - r0;
            b.offsets.resize(b.nrow + 1);
            for (int64_t r = r0; r <= r1; r++) b.offsets[r - r0] = (int32_t)(ip[r] - ip[r0]);
            blocks.push_back(std::move(b));
            r0 = r1;
        }
        if (C == 0 || A.ncol == 0) return;
        matrix_descr descr = general_descr();
        for (size_t bi = 0; bi < blocks.size(); bi++) {
            Block& b = blocks[bi];
            if (b.offsets[b.nrow] == 0) continue;  // empty block: run() writes zeros
            sparse_matrix_t h = nullptr;
            int64_t base = ip[b.row0];
            mkl_check(mkl_sparse_s_create_csr(&h, SPARSE_INDEX_BASE_ZERO, (MKL_INT)b.nrow, (MKL_INT)A.ncol,
                                              b.offsets.data(), b.offsets.data() + 1,
                                              (MKL_INT*)(A.indices + base), A.data + base),
                      "mkl_sparse_s_create_csr", bi);
            b.handle = h;
            mkl_check(mkl_sparse_set_mm_hint(h, SPARSE_OPERATION_NON_TRANSPOSE, descr, SPARSE_LAYOUT_ROW_MAJOR,
                                             (MKL_INT)C, expected_calls),
                      "mkl_sparse_set_mm_hint", bi);
            mkl_check(mkl_sparse_optimize(h), "mkl_sparse_optimize", bi);
        }
    } catch (...) {
        for (Block& b : blocks)
            if (b.handle) mkl_sparse_destroy((sparse_matrix_t)b.handle);
        throw;
    }
}

MklSpmm::~MklSpmm() {
    for (Block& b : blocks)
        if (b.handle) mkl_sparse_destroy((sparse_matrix_t)b.handle);
}

void MklSpmm::run(const float* X, float* Y) const {
    matrix_descr descr = general_descr();
    for (size_t bi = 0; bi < blocks.size(); bi++) {
        const Block& b = blocks[bi];
        float* y = Y + b.row0 * C_;
        if (!b.handle) {
            memset(y, 0, sizeof(float) * b.nrow * C_);
            continue;
        }
        mkl_check(mkl_sparse_s_mm(SPARSE_OPERATION_NON_TRANSPOSE, 1.0f, (sparse_matrix_t)b.handle, descr,
                                  SPARSE_LAYOUT_ROW_MAJOR, X, (MKL_INT)C_, (MKL_INT)C_, 0.0f, y, (MKL_INT)C_),
                  "mkl_sparse_s_mm", bi);
    }
}

#else

MklSpmm::MklSpmm(const CSRView& A, int64_t C, int64_t, int) : A_(A), C_(C) {
    throw std::runtime_error("graph_utils was built without MKL: MklSpmm is not available (use the hand kernel)");
}

MklSpmm::~MklSpmm() {}

void MklSpmm::run(const float*, float*) const {
    throw std::runtime_error("graph_utils was built without MKL: MklSpmm is not available");
}

#endif  // GRAPH_UTILS_MKL

// ---------------------------------------------------------------- k-best table merge

template <class TI>
void merge_knn_results(float* D, TI* I, int64_t n, int64_t k, int64_t ldd, int64_t ldi, const float* D2,
                       const TI* I2, int64_t k2, int64_t ldd2, int64_t ldi2, int64_t translation) {
    ParallelError err;  // checked on all rows before any row is modified
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float* d1 = D + i * ldd;
        const float* d2 = D2 + i * ldd2;
        bool bad = false;
        for (int64_t a = 1; a < k; a++) bad |= d1[a] > d1[a - 1];
        if (bad) { err.set(i, 1); continue; }
        for (int64_t a = 1; a < k2; a++) bad |= d2[a] > d2[a - 1];
        if (bad) err.set(i, 2);
    }
    if (err.any())
        throw std::invalid_argument("row " + std::to_string(err.row) + " of " + (err.code == 1 ? "D" : "D2") +
                                    " is not sorted by decreasing similarity");
    // per-thread rows of the merged result, allocated before the region (nothing throws inside it)
    const int nt = omp_get_max_threads();
    std::vector<float> tds((size_t)nt * k);
    std::vector<TI> tis((size_t)nt * k);
#pragma omp parallel num_threads(nt)
    {
        float* td = tds.data() + (size_t)omp_get_thread_num() * k;
        TI* ti = tis.data() + (size_t)omp_get_thread_num() * k;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float* d1 = D + i * ldd;
            TI* i1 = I + i * ldi;
            const float* d2 = D2 + i * ldd2;
            const TI* i2 = I2 + i * ldi2;
            int64_t a = 0, b = 0;
            for (int64_t j = 0; j < k; j++) {
                if (b >= k2 || d1[a] >= d2[b]) {
                    td[j] = d1[a];
                    ti[j] = i1[a++];
                } else {
                    td[j] = d2[b];
                    ti[j] = i2[b] < 0 ? (TI)-1 : (TI)(i2[b] + translation);
                    b++;
                }
            }
            for (int64_t j = 0; j < k; j++) {
                d1[j] = td[j];
                i1[j] = ti[j];
            }
        }
    }
}

// ---------------------------------------------------------------- node reordering

void bfs_order(const CSRView& A, int64_t* perm) {
    if (A.nrow != A.ncol) throw std::invalid_argument("bfs_order needs a square matrix");
    int64_t n = A.nrow;
    std::vector<char> seen(n, 0);
    int64_t head = 0, tail = 0;  // perm[head..tail) is the BFS queue
    for (int64_t s = 0; s < n; s++) {
        if (seen[s]) continue;
        seen[s] = 1;
        perm[tail++] = s;
        while (head < tail) {
            int64_t u = perm[head++];
            for (int64_t p = A.indptr[u]; p < A.indptr[u + 1]; p++) {
                int32_t v = A.indices[p];
                if (!seen[v]) {
                    seen[v] = 1;
                    perm[tail++] = v;
                }
            }
        }
    }
}

void permute_symmetric(const CSRView& A, const int64_t* perm, CSROwned& out) {
    if (A.nrow != A.ncol) throw std::invalid_argument("permute_symmetric needs a square matrix");
    int64_t n = A.nrow;
    std::vector<int32_t> inv(n, -1);
    for (int64_t r = 0; r < n; r++) {
        int64_t o = perm[r];
        if (o < 0 || o >= n || inv[o] != -1) throw std::invalid_argument("perm is not a permutation of 0..n-1");
        inv[o] = (int32_t)r;
    }
    out.alloc_rows(n, n);
    std::vector<int64_t> counts(n);
    for (int64_t r = 0; r < n; r++) counts[r] = A.indptr[perm[r] + 1] - A.indptr[perm[r]];
    prefix_sum(counts.data(), n, out.indptr);
    out.alloc_nnz(out.indptr[n]);
    std::atomic<bool> no_memory(false);   // a failed allocation is thrown after the region
#pragma omp parallel
    {
        std::vector<std::pair<int32_t, float>> tmp;
#pragma omp for schedule(dynamic, 1024)
        for (int64_t r = 0; r < n; r++) {
            if (no_memory) continue;
            int64_t q = out.indptr[r];
            int64_t o = perm[r];
            for (int64_t p = A.indptr[o]; p < A.indptr[o + 1]; p++, q++) {
                out.indices[q] = inv[A.indices[p]];
                out.data[q] = A.data[p];
            }
            try {
                sort_row(out.indices + out.indptr[r], out.data + out.indptr[r], counts[r], tmp);
            } catch (const std::bad_alloc&) {
                no_memory = true;
            }
        }
    }
    if (no_memory) throw std::bad_alloc();
}

template void csr_from_knn<int32_t>(const int32_t*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                                    CSROwned&);
template void csr_from_knn<int64_t>(const int64_t*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                                    CSROwned&);
template void knn_to_graph<int32_t>(const int32_t*, int64_t, int64_t, int64_t, CSROwned&);
template void knn_to_graph<int64_t>(const int64_t*, int64_t, int64_t, int64_t, CSROwned&);
template void merge_knn_results<int32_t>(float*, int32_t*, int64_t, int64_t, int64_t, int64_t, const float*,
                                         const int32_t*, int64_t, int64_t, int64_t, int64_t);
template void merge_knn_results<int64_t>(float*, int64_t*, int64_t, int64_t, int64_t, int64_t, const float*,
                                         const int64_t*, int64_t, int64_t, int64_t, int64_t);

}  // namespace graph_utils
