// SWIG interface of graph_utils: the private module graph_utils_swig, used only by graph_utils/__init__.py.
// Functions take numpy arrays as Python objects; the glue below checks dtype, dimensions, contiguity,
// alignment and writability, borrows their memory for the call (GIL released around the C++ work) and
// returns new matrices as numpy arrays that own the C++ allocations (no copy).
%module graph_utils_swig

%{
#define SWIG_FILE_WITH_INIT
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <omp.h>

#include <stdexcept>
#include <string>

#include "graph_utils.h"

namespace gu = graph_utils;

namespace {

// thrown after a Python exception has been set
struct PyErrSet {};

[[noreturn]] void py_raise(PyObject* type, const std::string& msg) {
    PyErr_SetString(type, msg.c_str());
    throw PyErrSet();
}

// the GIL is released for the lifetime of this object
struct NoGIL {
    PyThreadState* state;
    NoGIL() : state(PyEval_SaveThread()) {}
    ~NoGIL() { PyEval_RestoreThread(state); }
};

template <class T> struct Npy;
template <> struct Npy<float> { static constexpr int type = NPY_FLOAT32; static constexpr const char* name = "float32"; };
template <> struct Npy<int32_t> { static constexpr int type = NPY_INT32; static constexpr const char* name = "int32"; };
template <> struct Npy<int64_t> { static constexpr int type = NPY_INT64; static constexpr const char* name = "int64"; };
template <> struct Npy<uint16_t> { static constexpr int type = NPY_UINT16; static constexpr const char* name = "uint16"; };

// A checked numpy array: ndim dimensions, given dtype, aligned; C-contiguous, or (row_strided) with
// contiguous rows and any non-negative row stride.
template <class T>
struct Arr {
    PyArrayObject* a;
    T* ptr;
    int64_t n0 = 1, n1 = 1, ld = 0;  // shape and row stride in elements (2-D)
    int64_t size() const { return n0 * n1; }
};

template <class T>
Arr<T> get_arr(PyObject* o, const char* name, int ndim, bool writable, bool row_strided = false,
               bool unaligned_ok = false) {
    if (!PyArray_Check(o)) py_raise(PyExc_TypeError, std::string(name) + " must be a numpy array");
    PyArrayObject* a = (PyArrayObject*)o;
    if (PyArray_TYPE(a) != Npy<T>::type)
        py_raise(PyExc_TypeError, std::string(name) + " must have dtype " + Npy<T>::name + ", got " +
                                          PyArray_DESCR(a)->typeobj->tp_name);
    if (PyArray_NDIM(a) != ndim)
        py_raise(PyExc_ValueError, std::string(name) + " must have " + std::to_string(ndim) + " dimension(s), got " +
                                           std::to_string(PyArray_NDIM(a)));
    if (!PyArray_ISALIGNED(a) && !unaligned_ok) py_raise(PyExc_ValueError, std::string(name) + " is not aligned");
    if (writable && !PyArray_ISWRITEABLE(a)) py_raise(PyExc_ValueError, std::string(name) + " is read-only");
    Arr<T> r;
    r.a = a;
    r.ptr = (T*)PyArray_DATA(a);
    if (ndim >= 1) r.n0 = PyArray_DIM(a, 0);
    if (ndim == 2) r.n1 = PyArray_DIM(a, 1);
    r.ld = r.n1;
    bool contiguous = PyArray_IS_C_CONTIGUOUS(a);
    if (!contiguous && row_strided && ndim == 2) {
        npy_intp s0 = PyArray_STRIDE(a, 0), s1 = PyArray_STRIDE(a, 1);
        if ((s1 == (npy_intp)sizeof(T) || r.n1 <= 1) && s0 >= 0 && s0 % (npy_intp)sizeof(T) == 0) {
            contiguous = true;
            r.ld = s0 / (npy_intp)sizeof(T);
        }
    }
    if (!contiguous)
        py_raise(PyExc_ValueError, std::string(name) + (row_strided ? " must have contiguous rows" : " must be C-contiguous") +
                                           " (use np.ascontiguousarray)");
    return r;
}

gu::CSRView get_csr(PyObject* indptr, PyObject* indices, PyObject* data, long long nrow, long long ncol) {
    Arr<int64_t> ip = get_arr<int64_t>(indptr, "indptr", 1, false);
    Arr<int32_t> ix = get_arr<int32_t>(indices, "indices", 1, true);
    Arr<float> dt = get_arr<float>(data, "data", 1, true);
    if (nrow < 0 || ncol < 0 || ncol > INT32_MAX) py_raise(PyExc_ValueError, "invalid shape");
    if (ip.n0 != nrow + 1)
        py_raise(PyExc_ValueError, "indptr has " + std::to_string(ip.n0) + " entries, expected nrows + 1 = " +
                                           std::to_string(nrow + 1));
    if (ip.ptr[0] != 0) py_raise(PyExc_ValueError, "indptr[0] must be 0");
    int64_t nnz = ip.ptr[nrow];
    if (nnz < 0 || ix.n0 < nnz || dt.n0 < nnz)
        py_raise(PyExc_ValueError, "indptr[-1] = " + std::to_string(nnz) + " but indices / data have " +
                                           std::to_string(ix.n0) + " / " + std::to_string(dt.n0) + " entries");
    return gu::CSRView{nrow, ncol, ip.ptr, ix.ptr, dt.ptr};
}

void free_capsule(PyObject* cap) { free(PyCapsule_GetPointer(cap, "graph_utils")); }

// 1-D numpy array taking ownership of malloc'ed memory (freed with the array)
PyObject* owned_array(void* ptr, npy_intp n, int type) {
    PyObject* arr = PyArray_SimpleNewFromData(1, &n, type, ptr);
    if (!arr) {
        free(ptr);
        throw PyErrSet();
    }
    PyObject* cap = PyCapsule_New(ptr, "graph_utils", free_capsule);
    if (!cap) {
        free(ptr);  // PyArray_SimpleNewFromData does not own it
        Py_DECREF(arr);
        throw PyErrSet();
    }
    if (PyArray_SetBaseObject((PyArrayObject*)arr, cap) < 0) {  // steals cap, frees ptr through it on error
        Py_DECREF(arr);
        throw PyErrSet();
    }
    return arr;
}

// (indptr, indices, data) tuple owning the matrix' arrays
PyObject* to_python(gu::CSROwned& m) {
    npy_intp nnz = m.nnz();
    PyObject* ip = owned_array(m.indptr, m.nrow + 1, NPY_INT64);
    m.indptr = nullptr;
    PyObject* ix = nullptr;
    PyObject* dt = nullptr;
    try {
        ix = owned_array(m.indices, nnz, NPY_INT32);
        m.indices = nullptr;
        dt = owned_array(m.data, nnz, NPY_FLOAT32);
        m.data = nullptr;
    } catch (...) {
        m.indices = nullptr;
        m.data = nullptr;
        Py_DECREF(ip);
        Py_XDECREF(ix);
        throw;
    }
    return Py_BuildValue("(NNN)", ip, ix, dt);
}

bool is_int32(PyObject* o) { return PyArray_Check(o) && PyArray_TYPE((PyArrayObject*)o) == NPY_INT32; }

// the functions taking int32 or int64 ids, once for both
template <typename TI>
PyObject* csr_from_knn_t(PyObject* I, long long ncol, PyObject* values) {
    gu::CSROwned out;
    Arr<TI> a = get_arr<TI>(I, "I", 2, false, true);
    const float* v = nullptr;
    int64_t ldv = 0;
    if (values != Py_None) {
        Arr<float> va = get_arr<float>(values, "values", 2, false, true);
        if (va.n0 != a.n0 || va.n1 != a.n1) py_raise(PyExc_ValueError, "values must have the shape of I");
        v = va.ptr;
        ldv = va.ld;
    }
    {
        NoGIL nogil;
        gu::csr_from_knn<TI>(a.ptr, a.n0, a.n1, a.ld, ncol, v, ldv, out);
    }
    return to_python(out);
}

template <typename TI>
PyObject* knn_to_graph_t(PyObject* I, long long n) {
    gu::CSROwned out;
    Arr<TI> a = get_arr<TI>(I, "I", 2, false, true);
    if (a.n0 != n) py_raise(PyExc_ValueError, "I must have n rows");
    {
        NoGIL nogil;
        gu::knn_to_graph<TI>(a.ptr, a.n0, a.n1, a.ld, out);
    }
    return to_python(out);
}

template <typename TI>
void merge_knn_results_t(PyObject* D, PyObject* I, PyObject* D2, PyObject* I2, long long translation) {
    Arr<float> d = get_arr<float>(D, "D", 2, true, true);
    Arr<float> d2 = get_arr<float>(D2, "D2", 2, false, true);
    if (d2.n0 != d.n0) py_raise(PyExc_ValueError, "D and D2 must have the same number of rows");
    Arr<TI> i = get_arr<TI>(I, "I", 2, true, true);
    Arr<TI> i2 = get_arr<TI>(I2, "I2", 2, false, true);
    if (i.n0 != d.n0 || i.n1 != d.n1 || i2.n0 != d2.n0 || i2.n1 != d2.n1)
        py_raise(PyExc_ValueError, "I must have the shape of D and I2 that of D2");
    NoGIL nogil;
    gu::merge_knn_results<TI>(d.ptr, i.ptr, d.n0, d.n1, d.ld, i.ld, d2.ptr, i2.ptr, d2.n1, d2.ld, i2.ld, translation);
}

}  // namespace

%}

%init %{
    import_array();
%}

%exception {
    try {
        $action
    } catch (const PyErrSet&) {
        SWIG_fail;
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
        SWIG_fail;
    } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
        SWIG_fail;
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        SWIG_fail;
    }
}

%inline %{

#define CSR_ARGS(p) PyObject* p##_indptr, PyObject* p##_indices, PyObject* p##_data, long long p##_nrow, long long p##_ncol
#define CSR_GET(p) get_csr(p##_indptr, p##_indices, p##_data, p##_nrow, p##_ncol)

int max_threads() { return omp_get_max_threads(); }

bool has_mkl() { return gu::has_mkl(); }

long long get_prefetch_distance() { return gu::prefetch_distance; }
void set_prefetch_distance(long long d) {
    if (d < 0 || d > 4096) py_raise(PyExc_ValueError, "prefetch distance must be in [0, 4096]");
    gu::prefetch_distance = d;
}

void check(CSR_ARGS(A), bool require_sorted) {      // the CSR class's validation
    gu::CSRView A = CSR_GET(A);
    NoGIL nogil;
    gu::check_csr(A, require_sorted);
}

PyObject* csr_from_knn(PyObject* I, long long ncol, PyObject* values) {
    if (ncol < 0 || ncol > INT32_MAX) py_raise(PyExc_ValueError, "ncols must be in [0, 2^31)");
    return is_int32(I) ? csr_from_knn_t<int32_t>(I, ncol, values) : csr_from_knn_t<int64_t>(I, ncol, values);
}

PyObject* knn_to_graph(PyObject* I, long long n) {
    return is_int32(I) ? knn_to_graph_t<int32_t>(I, n) : knn_to_graph_t<int64_t>(I, n);
}

PyObject* transpose(CSR_ARGS(A)) {
    gu::CSRView A = CSR_GET(A);
    gu::CSROwned out;
    {
        NoGIL nogil;
        gu::check_csr(A, false);
        gu::transpose(A, out);
    }
    return to_python(out);
}

PyObject* spgemm(CSR_ARGS(A), CSR_ARGS(B)) {
    gu::CSRView A = CSR_GET(A);
    gu::CSRView B = CSR_GET(B);
    gu::CSROwned out;
    {
        NoGIL nogil;
        gu::check_csr(A, false);
        gu::check_csr(B, false);
        gu::spgemm(A, B, out);
    }
    return to_python(out);
}

void sort_rows(CSR_ARGS(A)) {
    gu::CSRView A = CSR_GET(A);
    NoGIL nogil;
    gu::check_csr(A, false);
    gu::sort_rows(A);
}

void col_normalize(PyObject* X) {
    Arr<float> x = get_arr<float>(X, "X", 2, true);
    NoGIL nogil;
    gu::col_normalize(x.ptr, x.n0, x.n1);
}

void spmm_hand(CSR_ARGS(A), PyObject* X, PyObject* Y) {
    gu::CSRView A = CSR_GET(A);
    Arr<float> x = get_arr<float>(X, "X", 2, false);
    Arr<float> y = get_arr<float>(Y, "out", 2, true);
    if (x.n0 != A.ncol) py_raise(PyExc_ValueError, "X must have A.shape[1] rows");
    if (y.n0 != A.nrow || y.n1 != x.n1) py_raise(PyExc_ValueError, "out must have shape (A.shape[0], X.shape[1])");
    NoGIL nogil;
    gu::spmm_hand(A, x.ptr, x.n1, y.ptr);
}

void merge_knn_results(PyObject* D, PyObject* I, PyObject* D2, PyObject* I2, long long translation) {
    if (is_int32(I))
        merge_knn_results_t<int32_t>(D, I, D2, I2, translation);
    else
        merge_knn_results_t<int64_t>(D, I, D2, I2, translation);
}

bool cpu_has_bf16() { return gu::cpu_has_bf16(); }

void to_bf16(PyObject* X, PyObject* out) {
    Arr<float> x = get_arr<float>(X, "X", 2, false);
    Arr<uint16_t> o = get_arr<uint16_t>(out, "out", 2, true);
    if (o.n0 != x.n0 || o.n1 != x.n1) py_raise(PyExc_ValueError, "out must have the shape of X");
    NoGIL nogil;
    gu::to_bf16(x.ptr, x.size(), o.ptr);
}

// the k-best table of KnnScan: A, E (n, cap) float32, I (n, cap) int32, cnt (n,) int32, thr (n,) float32
gu::ScanTable get_scan_table(PyObject* A, PyObject* E, PyObject* I, PyObject* cnt, PyObject* thr, long long kp) {
    Arr<float> a = get_arr<float>(A, "A", 2, true);
    Arr<float> e = get_arr<float>(E, "E", 2, true);
    Arr<int32_t> i = get_arr<int32_t>(I, "I", 2, true);
    Arr<int32_t> c = get_arr<int32_t>(cnt, "cnt", 1, true);
    Arr<float> t = get_arr<float>(thr, "thr", 1, true);
    if (e.n0 != a.n0 || e.n1 != a.n1 || i.n0 != a.n0 || i.n1 != a.n1 || c.n0 != a.n0 || t.n0 != a.n0)
        py_raise(PyExc_ValueError, "A, E, I (n, cap), cnt and thr (n,) must agree");
    return gu::ScanTable{a.ptr, e.ptr, i.ptr, c.ptr, t.ptr, a.n0, a.n1, kp};
}

double knn_scan_list(PyObject* A, PyObject* E, PyObject* I, PyObject* cnt, PyObject* thr, long long kp,
                     PyObject* rows, PyObject* Qf, PyObject* Qb, PyObject* Xc, PyObject* ids, bool exact_now,
                     bool fp32_mkl) {
    gu::ScanTable t = get_scan_table(A, E, I, cnt, thr, kp);
    Arr<int64_t> r = get_arr<int64_t>(rows, "rows", 1, false);
    Arr<float> qf = get_arr<float>(Qf, "Qf", 2, false);
    // Xc may be unaligned: the lists of an IVF index memory-mapped by faiss start at odd offsets of
    // its file; knn_scan reads Xc with unaligned loads (and MKL)
    Arr<float> c = get_arr<float>(Xc, "Xc", 2, false, true, true);
    Arr<int32_t> id = get_arr<int32_t>(ids, "ids", 1, false);
    const uint16_t* qb = nullptr;
    if (Qb != Py_None) {
        Arr<uint16_t> b = get_arr<uint16_t>(Qb, "Qb", 2, false);
        if (b.n0 != qf.n0 || b.n1 != qf.n1) py_raise(PyExc_ValueError, "Qb must have the shape of Qf");
        qb = b.ptr;
    }
    if (qf.n0 != t.n || qf.n1 != c.n1 || c.n0 != id.n0)
        py_raise(PyExc_ValueError, "Qf needs one row per table row, Xc one per id, both d columns");
    NoGIL nogil;
    return gu::knn_scan_list(t, r.ptr, r.n0, qf.ptr, qb, qf.n1, c.ptr, c.n0, c.ld, id.ptr, exact_now, fp32_mkl);
}

void knn_scan_settle(PyObject* A, PyObject* E, PyObject* I, PyObject* cnt, PyObject* thr, long long kp) {
    gu::ScanTable t = get_scan_table(A, E, I, cnt, thr, kp);
    NoGIL nogil;
    gu::knn_scan_settle(t);
}

long long knn_scan_rescore(PyObject* A, PyObject* E, PyObject* I, PyObject* cnt, PyObject* thr, long long kp,
                           PyObject* Qf, PyObject* base, long long k, double vmax) {
    gu::ScanTable t = get_scan_table(A, E, I, cnt, thr, kp);
    Arr<float> qf = get_arr<float>(Qf, "Qf", 2, false);
    Arr<float> b = get_arr<float>(base, "base", 2, false);
    if (qf.n0 != t.n || b.n1 != qf.n1) py_raise(PyExc_ValueError, "Qf (n, d) and base (nb, d) must agree");
    NoGIL nogil;
    return gu::knn_scan_rescore(t, qf.ptr, qf.n1, b.ptr, b.n0, k, (float)vmax);
}

void knn_scan_finish(PyObject* A, PyObject* E, PyObject* I, PyObject* cnt, PyObject* thr, long long kp, PyObject* D,
                     PyObject* Io) {
    gu::ScanTable t = get_scan_table(A, E, I, cnt, thr, kp);
    Arr<float> d = get_arr<float>(D, "D", 2, true);
    Arr<int32_t> io = get_arr<int32_t>(Io, "Io", 2, true);
    if (d.n0 != t.n || io.n0 != t.n || io.n1 != d.n1) py_raise(PyExc_ValueError, "D, Io must be (n, k)");
    NoGIL nogil;
    gu::knn_scan_finish(t, d.ptr, io.ptr, d.n1);
}

void bfs_order(CSR_ARGS(A), PyObject* perm) {
    gu::CSRView A = CSR_GET(A);
    Arr<int64_t> p = get_arr<int64_t>(perm, "perm", 1, true);
    if (p.n0 != A.nrow) py_raise(PyExc_ValueError, "perm must have A.shape[0] entries");
    NoGIL nogil;
    gu::check_csr(A, false);
    gu::bfs_order(A, p.ptr);
}

PyObject* permute_symmetric(CSR_ARGS(A), PyObject* perm) {
    gu::CSRView A = CSR_GET(A);
    Arr<int64_t> p = get_arr<int64_t>(perm, "perm", 1, false);
    if (p.n0 != A.nrow) py_raise(PyExc_ValueError, "perm must have A.shape[0] entries");
    gu::CSROwned out;
    {
        NoGIL nogil;
        gu::check_csr(A, false);
        gu::permute_symmetric(A, p.ptr, out);
    }
    return to_python(out);
}

// MKL inspector-executor product prepared once for products with C columns. Keeps references to the
// matrix' arrays, which MKL reads at every run(). In a build without MKL the constructor raises
// RuntimeError (graph_utils/__init__.py says so before calling it).
class MklPlan {
  public:
    MklPlan(CSR_ARGS(A), long long C, long long max_block_nnz, int expected_calls) {
        gu::CSRView A = CSR_GET(A);
        {
            NoGIL nogil;
            plan = new gu::MklSpmm(A, C, max_block_nnz, expected_calls);
        }
        nrow = A.nrow;
        ncol = A.ncol;
        refs[0] = A_indptr; refs[1] = A_indices; refs[2] = A_data;
        for (PyObject* r : refs) Py_INCREF(r);
    }
    ~MklPlan() {
        delete plan;
        for (PyObject* r : refs) Py_XDECREF(r);
    }
    void run(PyObject* X, PyObject* Y) {
        Arr<float> x = get_arr<float>(X, "X", 2, false);
        Arr<float> y = get_arr<float>(Y, "out", 2, true);
        if (x.n0 != ncol || x.n1 != plan->C()) py_raise(PyExc_ValueError, "X must have shape (A.shape[1], C)");
        if (y.n0 != nrow || y.n1 != plan->C()) py_raise(PyExc_ValueError, "out must have shape (A.shape[0], C)");
        NoGIL nogil;
        plan->run(x.ptr, y.ptr);
    }
    long long nblocks() const { return plan->nblocks(); }

  private:
    gu::MklSpmm* plan = nullptr;
    long long nrow = 0, ncol = 0;
    PyObject* refs[3] = {nullptr, nullptr, nullptr};
};

%}
