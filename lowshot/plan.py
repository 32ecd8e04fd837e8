"""What each stage needs at scale: RAM, disk and CPU time per task, as a function of N (and of the
shard count S, k, d, the number of classes and lslice), fitted on measurements at 1M and 10M.

    python -m lowshot.plan 100000000 --shards 64        # the F100M plan
    python -m lowshot.plan --check                      # the model against its measurements

Each quantity is a formula of the work it counts (bytes held, products scored, bytes read) with one
coefficient fitted by least squares on the relative error of the measurements in :data:`MEASURED`
(``build_graph.py`` and ``benchmarks/bench_diffusion.py`` on the generated F1M and F10M, 2 cores;
commands in docs/scale.md). CPU time is in core-seconds of those 2 Zen 4 cores
(AVX512-BF16: the float32 scan is ~3x slower); "own" memory is the process' anonymous memory, the
page cache of the memory-mapped inputs is listed apart ("mapped"): it speeds the task up but the
kernel can drop it, and tasks on one machine share it.

Stages: ``graph prepare`` (k-means, probes, lists: one task), ``graph shard`` (S tasks of the
table), ``graph merge`` (one task), ``completion cache`` (the first diffusion.py run of a split and
background size: the exact searches into the base-class images, ``nbase`` of them, 196 x 1280 for
ImageNet's test split), ``diffusion`` (one later run of diffusion.py, e.g. one seed).
"""
import argparse
import json
import sys

from lowshot import diffuse, ivf_build, search, stored_graph
from lowshot.common import HelpFormatter

GiB = 2.0**30

# Measurements (generated data, d = 256, K = 32, k = 30, 507 test classes, n = 2, 3 iterations),
# idle 2-core machine: build_graph.py N --prepare (prepare_s = time_index, prepare_own_gib =
# own_peak_gib), then build_graph.py N (time_table, time_merge, own_gib_chunk, merge_own_gib =
# own_peak_gib: the merge holds the index), diffusion.py (time_total, own_peak_gib). Seconds are wall
# times of 2 busy cores.
# cache_s: the first diffusion.py run of a split computing the completion cache (its graph
# completion time, with nbase base-class images and ntest test images); diffusion_s: a later run.
MEASURED = {
    1000000: {"prepare_s": 23.3, "table_s": 37.6, "merge_s": 1.4, "pairs": 4.37e10,
              "prepare_own_gib": 0.632, "chunk_own_gib": 0.394, "merge_own_gib": 1.164,
              "cache_s": 13.6, "nbase": 9800, "ntest": 25350,
              "diffusion_s": 13.7, "diffusion_own_gib": 1.62},
    10000000: {"prepare_s": 231.2, "table_s": 600.2, "merge_s": 14.8, "pairs": 8.52e11,
               "prepare_own_gib": 1.841, "chunk_own_gib": 3.033, "merge_own_gib": 10.951,
               "cache_s": 138.6, "nbase": 9800, "ntest": 25350,
               "diffusion_s": 138.1, "diffusion_own_gib": 9.409},
}
# the paper's test split: 196 base classes of ~1280 ImageNet training images, 25350 test images
PAPER_NBASE = 196 * 1280
PAPER_NTEST = 25350
CORES_MEASURED = 2


def ivf_shape(N, d=256, K=32):
    nlist = ivf_build.default_nlist(N, ngpu=0)
    nprobe = ivf_build.default_nprobe(N, nlist, ngpu=0)
    return {"N": N, "d": d, "K": K, "nlist": nlist, "nprobe": nprobe,
            "kp": K + search.BF16_EXTRA, "chunk_rows": ivf_build.default_chunk_rows(N)}


def work(N, d=256, K=32, k=30, nclass=507, lslice=None, nbase=PAPER_NBASE, ntest=PAPER_NTEST):
    """The counts each formula scales with (flops, bytes, pairs, rows), for N background vectors."""
    s = ivf_shape(N, d, K)
    ntrain = min(N, 64 * s["nlist"])
    # scored pairs: N queries x nprobe lists x the mean list size a query meets; lists met by many
    # queries are the large ones, so the mean is (1 + cv^2) N / nlist (cv: spread of the sizes,
    # measured) -- folded into the fitted rate of the table
    pairs = N * s["nprobe"] * N / s["nlist"]
    C = s["chunk_rows"]
    W_nnz = 2 * k * N                       # W0 + W0^T holds at most 2 k entries per row
    L_cols = diffuse.auto_lslice(N, nclass) if lslice is None else (lslice or nclass)
    return dict(s, ntrain=ntrain, pairs=pairs,
                prepare_flops=10 * ntrain * s["nlist"] * d * 2 + N * s["nlist"] * d * 2,
                # k-means sample, the list order (int64 + int32 ids), blocks of rows
                prepare_bytes=4 * ntrain * d + 12 * N,
                chunk_bytes=C * (4 * d + 2 * d + 12 * s["kp"] + 4 * s["nprobe"] + 8 * K),
                merge_bytes=4 * N * d + 8 * N * K,
                diffusion_bytes=N * (4 * k + 8 * W_nnz / N + 2 * 4 * L_cols),
                # graph completion, W and the products are each linear in the nodes
                diffusion_work=float(N),
                # the completion cache: background, base and test images against the base images
                cache_pairs=float(N + nbase + ntest) * nbase,
                cache_disk=8.0 * 32 * (N + nbase + ntest))


# quantity -> (work key it is proportional to, measurement key)
FORMULAS = {
    "prepare_s": ("prepare_flops", "prepare_s"),
    "table_s": ("pairs", "table_s"),
    "merge_s": ("merge_bytes", "merge_s"),
    "prepare_own_gib": ("prepare_bytes", "prepare_own_gib"),
    "chunk_own_gib": ("chunk_bytes", "chunk_own_gib"),
    "merge_own_gib": ("merge_bytes", "merge_own_gib"),
    "cache_s": ("cache_pairs", "cache_s"),
    "diffusion_s": ("diffusion_work", "diffusion_s"),
    "diffusion_own_gib": ("diffusion_bytes", "diffusion_own_gib"),
}


def _work_of(N, m):
    """work() for a measurement (its own labelled and test set sizes where it records them)."""
    return work(N, **{key: m[key] for key in ("nbase", "ntest") if key in m})


def fit(measured=None):
    """One coefficient per quantity: argmin sum_i (c x_i / y_i - 1)^2 over the measured sizes."""
    measured = MEASURED if measured is None else measured
    coef = {}
    for q, (wkey, mkey) in FORMULAS.items():
        pts = [(_work_of(N, m)[wkey], m[mkey]) for N, m in measured.items() if m.get(mkey)]
        if not pts:
            continue
        # d/dc sum (c x/y - 1)^2 = 0  ->  c = sum(x/y) / sum((x/y)^2)
        r = [x / y for x, y in pts]
        coef[q] = sum(r) / sum(v * v for v in r)
    return coef


def plan(N, shards=1, d=256, K=32, k=30, nclass=507, lslice=None, cores=CORES_MEASURED, coef=None,
         nbase=PAPER_NBASE):
    """Per stage: tasks, own RAM per task (GiB), mapped inputs (GiB), disk written (GiB),
    core-hours in all, and hours per task on ``cores`` cores."""
    coef = fit() if coef is None else coef
    w = work(N, d, K, k, nclass, lslice, nbase)
    nchunks = -(-N // w["chunk_rows"])
    chunks_per_task = -(-nchunks // shards)

    def c(q, default=float("nan")):
        return coef.get(q, default)
    core_s = {"prepare": c("prepare_s") * w["prepare_flops"] * CORES_MEASURED,
              "shard": c("table_s") * w["pairs"] * CORES_MEASURED,
              "merge": c("merge_s") * w["merge_bytes"],
              "cache": c("cache_s") * w["cache_pairs"] * CORES_MEASURED,
              "diffusion": c("diffusion_s") * w["diffusion_work"] * CORES_MEASURED}
    rows = [
        {"stage": "graph prepare", "tasks": 1, "own_gib": c("prepare_own_gib") * w["prepare_bytes"],
         "mapped_gib": 8 * N * d / GiB, "disk_gib": (4 * N * d + 4 * N * w["nprobe"] + 4 * N) / GiB,
         "core_h": core_s["prepare"] / 3600, "task_h": core_s["prepare"] / 3600 / cores},
        {"stage": "graph shard", "tasks": shards, "own_gib": c("chunk_own_gib") * w["chunk_bytes"],
         "mapped_gib": 4 * N * d / GiB, "disk_gib": 8 * N * K / shards / GiB,
         "core_h": core_s["shard"] / 3600,
         "task_h": core_s["shard"] * chunks_per_task / nchunks / 3600 / cores},
        {"stage": "graph merge", "tasks": 1, "own_gib": c("merge_own_gib") * w["merge_bytes"],
         "mapped_gib": 0.0, "disk_gib": (4 * N * d + 8 * N * K) / GiB,
         "core_h": core_s["merge"] / 3600, "task_h": core_s["merge"] / 3600},
        # own memory: the base-class vectors and a block of results (a count, not fitted)
        {"stage": "completion cache (once per split)", "tasks": 1,
         "own_gib": (6.0 * nbase * d + 2**26) / GiB,
         "mapped_gib": (4 * N * d) / GiB, "disk_gib": w["cache_disk"] / GiB,
         "core_h": core_s["cache"] / 3600, "task_h": core_s["cache"] / 3600 / cores},
        {"stage": "diffusion (one run)", "tasks": 1, "own_gib": c("diffusion_own_gib") * w["diffusion_bytes"],
         "mapped_gib": (4 * N * d + 8 * N * K) / GiB, "disk_gib": 0.0,
         "core_h": core_s["diffusion"] / 3600, "task_h": core_s["diffusion"] / 3600 / cores},
    ]
    return {"N": N, "shards": shards, "nchunks": nchunks, "nlist": w["nlist"], "nprobe": w["nprobe"],
            "pairs": w["pairs"], "stages": rows}


def format_plan(p):
    out = ["N = %d: IVF %d lists, nprobe %d, %.3g pairs; the table in %d chunks over %d shard tasks" % (
        p["N"], p["nlist"], p["nprobe"], p["pairs"], p["nchunks"], p["shards"]),
        "",
        "| stage | tasks | own RAM / task | mapped inputs | disk written | CPU core-hours | hours / task |",
        "|---|---|---|---|---|---|---|"]
    for r in p["stages"]:
        out.append("| %s | %d | %.1f GiB | %.1f GiB | %.1f GiB | %.2f | %.2f |" % (
            r["stage"], r["tasks"], r["own_gib"], r["mapped_gib"], r["disk_gib"], r["core_h"], r["task_h"]))
    return "\n".join(out)


def check():
    """The fitted model against each measurement."""
    coef = fit()
    lines = ["| N | quantity | measured | predicted | predicted / measured |", "|---|---|---|---|---|"]
    for N, m in sorted(MEASURED.items()):
        w = _work_of(N, m)
        for q, (wkey, mkey) in FORMULAS.items():
            if m.get(mkey) and q in coef:
                pred = coef[q] * w[wkey]
                lines.append("| %d | %s | %.3g | %.3g | %.2f |" % (N, q, m[mkey], pred, pred / m[mkey]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lowshot.plan", description=__doc__, allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument("N", type=int, nargs="?", help="background vectors")
    p.add_argument("--shards", type=int, default=1, help="graph shard tasks (build_graph.py --shard i/S)")
    p.add_argument("--d", type=int, default=256, help="dimension of the background vectors")
    p.add_argument("--k", type=int, default=30, help="graph neighbours of the diffusion")
    p.add_argument("--nclass", type=int, default=507, help="classes diffused (test split: 507)")
    p.add_argument("--lslice", type=int, default=None, help="diffusion.py --lslice")
    p.add_argument("--cores", type=int, default=CORES_MEASURED, help="cores per task (for hours / task)")
    p.add_argument("--check", action="store_true", help="print the model against its measurements")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    args = p.parse_args(argv)
    if args.check:
        print(check())
        return 0
    if not args.N or args.N < 2 or args.shards < 1 or args.cores < 1:
        p.error("need N >= 2, --shards >= 1, --cores >= 1")
    res = plan(args.N, args.shards, args.d, stored_graph.graph_K(args.k), args.k, args.nclass, args.lslice, args.cores)
    print(json.dumps(res, sort_keys=True) if args.json else format_plan(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
