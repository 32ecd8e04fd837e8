// graph_utils: CSR sparse matrices for k-NN graphs and the sparse x dense product of the diffusion.
//
// Memory ownership
//   CSRView BORROWS its three arrays: the caller (in practice numpy, through the SWIG wrapper) owns them
//   and keeps them alive for the duration of a call. No function keeps a pointer after it returns,
//   except MklSpmm, which borrows the matrix for its whole lifetime (its owner must keep the arrays).
//   Functions that create a matrix fill a CSROwned, which OWNS malloc'ed arrays; the wrapper hands them
//   to numpy without copying (release()), and the destructor frees whatever was not handed over.
//
// Invariants of a valid CSR matrix (check_csr verifies them)
//   0 <= nrow, 0 <= ncol < 2^31 (column ids are int32; rows may exceed 2^31 in principle, nodes do not)
//   indptr has nrow + 1 entries, int64, indptr[0] == 0, non-decreasing, indptr[nrow] == nnz
//   indices[p] in [0, ncol) for p < nnz; data float32
//   "row-sorted": indices strictly increasing within each row (no duplicates); csr_add requires it,
//   sort_rows sorts but keeps duplicates.
//
// Errors: invalid input throws std::invalid_argument; an MKL failure throws std::runtime_error naming the
// MKL call and its sparse_status_t. The wrapper turns them into ValueError / RuntimeError.
//
// Build options. GRAPH_UTILS_MKL (defined by setup.py when it links oneMKL): MklSpmm, and MKL's sgemm
// for the float32 scan. Without it the library has no MKL dependency: MklSpmm's constructor and a
// float32 scan asked for sgemm throw std::runtime_error("graph_utils was built without MKL: ...").
// On x86-64 the hot loops carry AVX-512 / AVX2 versions chosen by the CPU at load time (GU_CLONES;
// the float32 scan dispatches itself) and the bf16 scan uses AVX512-BF16; elsewhere they compile once
// for the target, and cpu_has_bf16() is false.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#define GU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GU_CLONES
#endif

namespace graph_utils {

// Whether this build links MKL (GRAPH_UTILS_MKL).
bool has_mkl();

struct CSRView {
    int64_t nrow = 0, ncol = 0;
    const int64_t* indptr = nullptr;
    int32_t* indices = nullptr;
    float* data = nullptr;
    int64_t nnz() const { return indptr[nrow]; }
};

struct CSROwned {
    int64_t nrow = 0, ncol = 0;
    int64_t* indptr = nullptr;
    int32_t* indices = nullptr;
    float* data = nullptr;
    CSROwned() = default;
    CSROwned(const CSROwned&) = delete;
    CSROwned& operator=(const CSROwned&) = delete;
    ~CSROwned();
    // allocates indptr (nrow + 1, zeroed); indices / data are allocated by alloc_nnz once nnz is known
    void alloc_rows(int64_t nrow, int64_t ncol);
    void alloc_nnz(int64_t nnz);
    int64_t nnz() const { return indptr[nrow]; }
    CSRView view() const { return CSRView{nrow, ncol, indptr, indices, data}; }
};

// Throws std::invalid_argument describing the first violated invariant; if require_sorted, also checks
// that every row is strictly increasing.
void check_csr(const CSRView& A, bool require_sorted);

// n x k table of column ids (-1 = missing, skipped; other negatives or ids >= ncol are errors), row-major
// with row stride ldi elements. Entries keep the table order (duplicates kept). values: same layout as I,
// or nullptr for all-ones.
template <class TI>
void csr_from_knn(const TI* I, int64_t n, int64_t k, int64_t ldi, int64_t ncol, const float* values,
                  int64_t ldv, CSROwned& out);

// A^T; output rows are sorted by column id (stable: entries of one row of A^T follow A's row order).
void transpose(const CSRView& A, CSROwned& out);

// Sorts the entries of every row by column id, in place (values follow; stable for duplicate ids).
void sort_rows(const CSRView& A);

// A + B for two row-sorted matrices of the same shape (the union of their patterns; knn_to_graph's
// W0 + W0^T).
void csr_add(const CSRView& A, const CSRView& B, CSROwned& out);

// Divides every row by the sum of its absolute values, in place; rows summing to 0 stay unchanged.
void row_normalize(const CSRView& A);

// Dense n x C row-major matrix: divides every column by its sum (accumulated in double), in place;
// columns summing to 0 stay unchanged.
void col_normalize(float* X, int64_t n, int64_t C);

// Row-L1-normalised W0 + W0^T where W0 (n x n) is binary: W0[i, j] = 1 iff j appears in row i of the
// n x k table I (-1 skipped, duplicates counted once). Rows of the result are sorted.
template <class TI>
void knn_to_graph(const TI* I, int64_t n, int64_t k, int64_t ldi, CSROwned& out);

// out = A @ B for CSR matrices whose product has few columns (B.ncol: a dense accumulator of B.ncol
// floats per thread): the diffusion's first iterations, while the label matrix is sparse. Rows of the
// result are sorted; each sum adds A's entries of the row in their order. A and B must be valid
// (check_csr).
void spgemm(const CSRView& A, const CSRView& B, CSROwned& out);

// Y (A.nrow x C, row-major, leading dimension C) = A @ X (A.ncol x C, row-major).
// Hand-written kernel: row-parallel over nnz-balanced chunks, software prefetch of upcoming rows of X.
void spmm_hand(const CSRView& A, const float* X, int64_t C, float* Y);

// How many nonzeros ahead spmm_hand prefetches the rows of X it will gather: far enough to cover the
// memory latency of a random gather, near enough that the lines are still in L1/L2 when used.
extern int64_t prefetch_distance;

// The same product with MKL's inspector-executor sparse BLAS. MKL's LP64 interface takes 32-bit row
// offsets, so the matrix is cut into row blocks of at most max_block_nnz entries (and rows), each with
// its own offsets rebased to 0. Handles are built and optimised once, at construction, for products
// with C columns; run() may be called many times. Borrows A (and nothing else) for its lifetime.
// In a build without MKL the constructor throws std::runtime_error.
class MklSpmm {
  public:
    MklSpmm(const CSRView& A, int64_t C, int64_t max_block_nnz, int expected_calls);
    ~MklSpmm();
    MklSpmm(const MklSpmm&) = delete;
    MklSpmm& operator=(const MklSpmm&) = delete;
    void run(const float* X, float* Y) const;
    int64_t nblocks() const { return (int64_t)blocks.size(); }
    int64_t C() const { return C_; }

  private:
    struct Block {
        int64_t row0, nrow;
        std::vector<int32_t> offsets;  // nrow + 1 offsets, rebased so offsets[0] == 0
        void* handle = nullptr;        // sparse_matrix_t
    };
    CSRView A_;
    int64_t C_;
    std::vector<Block> blocks;
};

// Merges per row two k-best tables kept in decreasing similarity order: (D, I) of n x k (row strides
// ldd, ldi) with (D2, I2 + translation) of n x k2; keeps the k largest similarities in (D, I), ties
// going to (D, I) first and keeping each table's own order. Ids < 0 in I2 stay -1 (not translated).
template <class TI>
void merge_knn_results(float* D, TI* I, int64_t n, int64_t k, int64_t ldd, int64_t ldi, const float* D2,
                       const TI* I2, int64_t k2, int64_t ldd2, int64_t ldi2, int64_t translation);

// Many queries against one block of database vectors (an IVF list), into k-best tables
// (knn_scan.cpp). A ScanTable (every array borrowed, C-contiguous) has n rows of cap >= 2 kp slots:
// A (score the selection ranks by), E (exact float32 inner product), I (id), and per row cnt (slots
// used) and thr (entry threshold, -inf at first): candidates are appended unsorted and a full row is
// cut back to its kp best, so the kp kept are the kp best by (A decreasing, id increasing) of all
// offered, whatever their order. knn_scan_list offers to table row rows[r] (r < m, strictly
// increasing) the candidates Xc (n x d, row stride ldc) with ids[j]; the row's query is row rows[r]
// of Qf (n_table x d float32) and, for the reduced-precision scan, of Qb (bf16 bits from to_bf16).
// With Qb the products are bf16 (AVX512-BF16, d even; cpu_has_bf16() must hold) and E is filled
// either at once (exact_now) or by knn_scan_rescore; with Qb == nullptr they are float32, A == E,
// computed by MKL's sgemm (fp32_mkl; builds with MKL only) or by the hand-written blocked product.
// No id may be offered twice to a row. It returns the largest norm of the Xc rows (bf16; 0 otherwise).
// knn_scan_settle sorts each row's kp best first (then -inf / -1). knn_scan_rescore (bf16, settled,
// ids = rows of base (n_base x d)) scores exactly the kept candidates whose approximate score is
// within the bf16 error bound of the k-th (2^-7 |q| vmax), E = -inf for the others, and returns the
// number of rows whose kp-th candidate is still within it (their exact k best are then not
// guaranteed among the kp kept). knn_scan_finish writes the k <= kp best of each settled row by E
// (ties: lower id first) into D, Io (n x k), -inf / -1 where a row has fewer than k.
struct ScanTable {
    float* A;
    float* E;
    int32_t* I;
    int32_t* cnt;
    float* thr;
    int64_t n, cap, kp;
};
bool cpu_has_bf16();
void to_bf16(const float* X, int64_t n, uint16_t* out);
float knn_scan_list(const ScanTable& t, const int64_t* rows, int64_t m, const float* Qf, const uint16_t* Qb, int64_t d,
                    const float* Xc, int64_t n, int64_t ldc, const int32_t* ids, bool exact_now, bool fp32_mkl);
void knn_scan_settle(const ScanTable& t);
int64_t knn_scan_rescore(const ScanTable& t, const float* Qf, int64_t d, const float* base, int64_t nbase, int64_t k,
                         float vmax);
void knn_scan_finish(const ScanTable& t, float* D, int32_t* Io, int64_t k);

// Locality-preserving node order of a square matrix with a symmetric pattern (as W0 + W0^T): breadth-first
// search, each connected component started from its lowest-numbered node, neighbours taken in row order
// (the order of scipy.sparse.csgraph.breadth_first_order). perm[new_id] = old_id.
void bfs_order(const CSRView& A, int64_t* perm);

// B = P A P^T for perm[new_id] = old_id: B[r, c] = A[perm[r], perm[c]]; rows of B sorted.
void permute_symmetric(const CSRView& A, const int64_t* perm, CSROwned& out);

}  // namespace graph_utils
