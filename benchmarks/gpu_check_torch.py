"""GPU check of the torch backend (torch with CUDA, no faiss-gpu needed): one command.

  python benchmarks/gpu_check_torch.py                      # 1M and 10M, ~5 min on one H200 (planned)
  python benchmarks/gpu_check_torch.py --sizes 1000000      # 1M only
  python benchmarks/gpu_check_torch.py --device torch-cpu --sizes 20000   # the script itself, on a CPU

1. equality: tests/test_torch_backend.py with LOWSHOT_TORCH_DEVICE=cuda (the torch scan against brute
   force and graph_utils, the exact and IVF graphs and the diffusion against --device cpu);
2. for each size N: a generated data root (generate_ddir.py, reused when present), the background
   graph on the device (build_graph.py N --device DEV: time, recall@10 against exact search), the
   F(N) experiment on the device twice (the first run computes the completion cache), and up to
   --cpu_max once with --device cpu (same protocol as the README: test, n = 2, seed 1, k = 30, 3
   iterations): times, top-5, and whether device and CPU agree (within 1e-4). Above --cpu_max the
   CPU numbers to compare with are docs/scale.md's ( F10M 138 s, top-5 0.542).

Prints one JSON line per step, then a summary; writes them to WORKDIR/gpu_check.json. Exit status 1
when a check fails, 2 when torch sees no GPU (with --device cuda).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env=None):
    """Run a project script; its last stdout line is its result JSON. Returns (result, wall s)."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        print(r.stdout[-2000:] + r.stderr[-4000:], flush=True)
        return None, wall
    try:
        return json.loads(r.stdout.strip().splitlines()[-1]), wall
    except (ValueError, IndexError):
        return {"stdout_tail": r.stdout[-500:]}, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or torch-cpu to try the script on a CPU")
    p.add_argument("--sizes", default="1000000,10000000", help="background sizes, comma-separated")
    p.add_argument("--workdir", default="/tmp/gpu_check", help="generated data roots and the report")
    p.add_argument("--report", default=None, help="also write the report JSON here (e.g. $OUT/gpu_check.json)")
    p.add_argument("--cpu_max", type=int, default=10**6, help="largest size also run with --device cpu")
    p.add_argument("--skip_tests", action="store_true", help="skip step 1")
    args = p.parse_args()
    import torch
    py = sys.executable
    report = {"device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpu_threads": torch.get_num_threads(), "steps": []}
    print(json.dumps(report), flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return 2
    fails = []

    def step(name, res, wall, **extra):
        row = dict(step=name, wall_s=round(wall, 2), ok=res is not None, **extra)
        report["steps"].append(row)
        print(json.dumps(row), flush=True)
        if res is None:
            fails.append(name)
        return row

    if not args.skip_tests:
        t0 = time.time()
        r = subprocess.run([py, "-m", "pytest", "-q", "tests/test_torch_backend.py"], cwd=ROOT,
                           env=dict(os.environ, LOWSHOT_TORCH_DEVICE=args.device), capture_output=True, text=True)
        print(r.stdout[-1500:], flush=True)
        step("equality tests on %s" % args.device, {} if r.returncode == 0 else None, time.time() - t0)
    os.makedirs(args.workdir, exist_ok=True)
    for N in (int(s) for s in args.sizes.split(",")):
        ddir = os.path.join(args.workdir, "f%d" % N)
        if not os.path.isfile(os.path.join(ddir, "features", "f100m", "concatenated_PCAR256.raw")):
            res, wall = run([py, "generate_ddir.py", ddir, "--nbg", str(N)])
            step("generate F%d" % N, res, wall)
        res, wall = run([py, "build_graph.py", str(N), "--ddir", ddir, "--device", args.device, "--force"])
        step("graph %d on %s" % (N, args.device), res, wall, **{k: (res or {}).get(k) for k in (
            "method", "time_total", "recall@10", "backend", "own_peak_gib")})
        proto = ["diffusion.py", "--ddir", ddir, "--split", os.path.join(ddir, "label_idx.json"), "--mode", "test",
                 "--nlabeled", "2", "--seed", "1", "--k", "30", "--nbg", str(N), "--niter", "3"]
        tops = {}
        runs = [("cache", args.device), ("warm", args.device)] + ([("cpu", "cpu")] if N <= args.cpu_max else [])
        for name, dev in runs:
            res, wall = run([py] + proto + ["--device", dev])
            step("F%d diffusion.py --device %s (%s)" % (N, dev, name), res, wall, **{k: (res or {}).get(k) for k in (
                "top5", "top5_novel", "time_total", "times", "backend", "own_peak_gib")})
            tops[name] = (res or {}).get("top5")
        if N > args.cpu_max:
            continue
        # scores agree to float tolerance: a near-tie may move one test image of ~25k
        same = None not in (tops["warm"], tops["cpu"]) and abs(tops["warm"] - tops["cpu"]) <= 1e-4
        step("F%d top-5 on %s and cpu within 1e-4" % (N, args.device), {} if same else None, 0.0,
             device=tops["warm"], cpu=tops["cpu"])
    report["failed"] = fails
    for path in filter(None, (os.path.join(args.workdir, "gpu_check.json"), args.report)):
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print("%s: %d steps, %d failed %s" % ("FAIL" if fails else "PASS", len(report["steps"]), len(fails), fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
