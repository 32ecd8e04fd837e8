"""The torch backend on CPU tensors against graph_utils, faiss and brute force. CI has no GPU: the
same tests run on CUDA with LOWSHOT_TORCH_DEVICE=cuda (benchmarks/gpu_check_torch.py does)."""
import json
import os

import faiss
import numpy as np
import pytest

import build_graph
import diffusion
import graph_utils
from lowshot import diffuse as dif, search, torch_backend
from lowshot.common import InputError
from lowshot.generate import generate_ddir


# the torch device under test: torch-cpu (CI), or cuda on a GPU machine
DEVICE = os.environ.get("LOWSHOT_TORCH_DEVICE", "torch-cpu")


@pytest.fixture
def torch_device():
    """The backend under test."""
    return torch_backend.select(DEVICE)


def brute_knn(Q, X, k, floor=None):
    """k best of X for each row of Q by (score desc, id asc), float64 scores rounded to float32."""
    S = (Q.astype(np.float64) @ X.astype(np.float64).T).astype(np.float32)
    D = np.full((len(Q), k), -np.inf, dtype=np.float32)
    I = np.full((len(Q), k), -1, dtype=np.int32)
    for i, s in enumerate(S):
        order = np.lexsort((np.arange(len(s)), -s))
        if floor is not None:
            order = order[s[order] >= floor[i]]
        order = order[:k]
        D[i, :len(order)], I[i, :len(order)] = s[order], order
    return D, I


def test_scan_equals_brute_force_with_ties_floor_and_row_subsets(torch_device):
    rs = np.random.RandomState(0)
    # small integer coordinates: every product is exact in float32, and many scores tie
    Q = rs.randint(-2, 3, size=(40, 8)).astype(np.float32)
    X = rs.randint(-2, 3, size=(300, 8)).astype(np.float32)
    k = 7
    scan = torch_device.knn_scan(Q, 9)
    assert isinstance(scan, torch_backend.TorchKnnScan)
    order = rs.permutation(300)          # candidates arrive in any order, in blocks of any size
    for j in range(0, 300, 37):
        ids = np.sort(order[j:j + 37]).astype(np.int32)
        scan.add(np.arange(40), X[ids], ids)
    D, I = scan.finish(k)
    Dr, Ir = brute_knn(Q, X, k)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_array_equal(D, Dr)
    # graph_utils' float32 scan gives the same table (ties: lower id)
    ref = graph_utils.KnnScan(Q, k, bf16=False)
    ref.add(np.arange(40), X, np.arange(300, dtype=np.int32))
    np.testing.assert_array_equal(ref.finish(k)[1], I)
    # a floor per query; candidates offered to some rows only
    floor = Dr[:, 2].copy()
    scan = torch_device.knn_scan(Q, k, floor=floor)
    rows = np.arange(0, 40, 3)
    scan.add(rows, X, np.arange(300, dtype=np.int32))
    D, I = scan.finish(k)
    Df, If = brute_knn(Q[rows], X, k, floor[rows])
    np.testing.assert_array_equal(I[rows], If)
    others = np.setdiff1d(np.arange(40), rows)
    assert (I[others] == -1).all() and np.isneginf(D[others]).all()


def test_exact_blocks_equal_faiss_flat_search(torch_device):
    rs = np.random.RandomState(1)
    xb = rs.randn(1000, 16).astype(np.float32)
    norm = search.normalized
    index = faiss.IndexFlatIP(16)
    index.add(norm(xb))
    Dr, Ir = index.search(norm(xb), 8)
    for i0, i1, D, I in torch_device.exact_blocks(xb, 8, 300, norm):
        np.testing.assert_array_equal(I, Ir[i0:i1])
        np.testing.assert_allclose(D, Dr[i0:i1], rtol=0, atol=2e-6)


def test_diffusion_products_equal_graph_utils(torch_device):
    rs = np.random.RandomState(2)
    n, nl, nt, k, C, niter = 300, 40, 25, 6, 9, 4
    I_nodes = np.array([rs.choice(n, k, replace=False) for _ in range(n)], dtype=np.int32)
    I_test = np.array([rs.choice(n, k, replace=False) for _ in range(nt)], dtype=np.int32)
    y_lab = rs.randint(C - 1, size=nl)       # class C-1: no labelled node, its column stays 0
    W = graph_utils.knn_to_graph(I_nodes, n)
    T = graph_utils.csr_from_knn(I_test, n)
    seen = []
    got = dif.diffuse(W, T, y_lab, C, niter, lslice=4, on_iter=lambda t, b0, b1, L: seen.append(L.sum(0)),
                      backend=torch_device)
    ref = dif.diffuse(W, T, y_lab, C, niter, lslice=4)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8)
    assert not got[-1][:, C - 1].any()
    # on_iter gets numpy blocks whose non-empty columns sum to 1
    assert all(isinstance(s, np.ndarray) for s in seen)
    np.testing.assert_allclose(seen[-1][:-1], 1, rtol=1e-5)


def test_device_choice_without_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    with pytest.raises(InputError, match="device cuda: torch sees no CUDA device"):
        torch_backend.select("cuda")
    with pytest.raises(InputError, match="device gpu: one of auto, cpu, cuda, torch-cpu"):
        torch_backend.select("gpu")
    # auto: faiss-gpu keeps faiss' index searches; cpu turns them off
    b = torch_backend.select("auto", faiss_gpus=2)
    assert b.describe() == "graph_utils on the CPU, faiss-gpu (2 GPUs) for faiss' index searches"
    assert b.faiss_gpus == 2 and b.device is None
    assert torch_backend.select("cpu").faiss_gpus == 0
    # the library's default: graph_utils and faiss on the CPU
    assert torch_backend.CPU.device is None and torch_backend.CPU.faiss_gpus == 0


@pytest.fixture(scope="module")
def small_ddir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddir"))
    generate_ddir(root, nclass=24, ntrain=8, ntest=4, D=32, d=16, nbg=600, nclutter=6, block=256)
    return root


def _run(main, argv, capsys):
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_build_graph_and_diffusion_on_torch_equal_the_cpu(small_ddir, tmp_path, capsys, method):
    """build_graph.py and diffusion.py with --device torch-cpu against --device cpu (float32)."""
    root = small_ddir
    tables = {}
    for dev in ("cpu", DEVICE):
        res = _run(build_graph.main, ["600", "--ddir", root, "--method", method, "--device", dev, "--force",
                                      "--precision", "float32", "--recall_nq", "0"], capsys)
        assert res["backend"].startswith("graph_utils on the CPU" if dev == "cpu" else "torch on ")
        idx, D, I = build_graph.stored_graph.find_background_graph(root, 600, 32)
        tables[dev] = (np.array(D), np.array(I))
    np.testing.assert_array_equal(tables["cpu"][1], tables[DEVICE][1])
    np.testing.assert_allclose(tables["cpu"][0], tables[DEVICE][0], atol=2e-6, rtol=0)
    runs = {}
    for dev in ("cpu", DEVICE):
        runs[dev] = _run(diffusion.main, ["--ddir", root, "--split", root + "/label_idx.json", "--mode", "test",
                                          "--nlabeled", "2", "--seed", "3", "--k", "10", "--nbg", "600",
                                          "--niter", "3", "--device", dev,
                                          "--storeL", str(tmp_path / ("L_%s.npy" % dev))], capsys)
    assert runs[DEVICE]["backend"].startswith("torch on ")
    assert runs["cpu"]["top5"] == runs[DEVICE]["top5"]
    np.testing.assert_allclose(np.load(tmp_path / "L_cpu.npy"), np.load(tmp_path / ("L_%s.npy" % DEVICE)),
                               rtol=1e-4, atol=1e-9)

