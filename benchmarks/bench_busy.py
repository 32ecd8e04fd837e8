"""Speed of the stages on a busy machine: each stage alone, beside one single-threaded CPU-bound
process, and beside one 2-thread job, as a fraction of its idle speed.

A shared machine (a cluster node, a laptop, a CI runner) runs other work beside ours. A stage that
gets half the CPU should run at about half its idle speed; multi-threaded code whose threads spin
or wait at barriers for a descheduled sibling runs far slower than that. This script measures it:

  stage       command (one process, run from the repository root)
  build       build_graph.py NBG --ddir DDIR --force --recall_nq 0          (wall time)
  diffusion   diffusion.py --ddir DDIR --split SPLIT --nbg NBG --nlabeled 2 --seed 1 --k 30 --niter 3
              (wall time; the completion cache is computed by a warm-up run first)
  features    save_features.py on NIMG generated 224 x 224 PNGs, EfficientNetLite0   (images/s)
  logreg      logreg.py --ddir DDIR --split SPLIT --nlabeled 2 --maxiter MAXITER --verbose 0 (wall)

  load        what runs beside the stage, started 2 s before it and killed after it
  none        nothing (the machine otherwise idle)
  yes         ``yes > /dev/null``: one single-threaded CPU-bound process
  torch2      a torch matrix-product loop with 2 threads (2048 x 2048 float32 products), the
              environment as the user's (OpenMP's default wait policy)

  python benchmarks/bench_busy.py --ddir /tmp/f1m --nbg 1000000
  python benchmarks/bench_busy.py --ddir /tmp/f1m --nbg 200000 --stages build --loads none,torch2

The stages run with the environment of this process; the scripts set ``GOMP_SPINCOUNT=1000`` unless
it or ``OMP_WAIT_POLICY`` is set (lowshot/omp_env.py). ``OMP_WAIT_POLICY= python
benchmarks/bench_busy.py ...`` (an empty value, which GNU OpenMP ignores with a warning) measures
GNU OpenMP's default; ``OMP_WAIT_POLICY= GOMP_SPINCOUNT=N`` another spin. Prints one line per measurement and a
final JSON line; run it on an otherwise idle machine, nothing else timed at the same time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH_LOOP = """
import torch
torch.set_num_threads(2)
a = torch.randn(2048, 2048)
while True:
    a = torch.mm(a, a)
    a /= a.norm()
"""


def start_load(kind):
    """Start the process that runs beside the stage (None for 'none')."""
    if kind == "none":
        return None
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if kind == "yes":
        cmd = ["yes"]
    elif kind == "torch2":
        cmd = [sys.executable, "-c", TORCH_LOOP]
    else:
        raise SystemExit("error: unknown load %r (none, yes, torch2)" % kind)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    time.sleep(2.0)
    return p


def stop_load(p):
    if p is not None:
        p.kill()
        p.wait()


def make_images(folder, nimg):
    """NIMG random-texture 224 x 224 RGB PNGs and a list json naming them."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    names = []
    for i in range(nimg):
        a = rng.randint(0, 256, (14, 14, 3)).astype(np.uint8)
        Image.fromarray(a, "RGB").resize((224, 224), Image.BILINEAR).save(os.path.join(folder, "%05d.png" % i))
        names.append("%05d.png" % i)
    list_json = os.path.join(folder, "list.json")
    with open(list_json, "w") as f:
        json.dump({"image_names": names, "image_labels": [0] * nimg}, f)
    cfg = os.path.join(folder, "save_data.yaml")
    with open(cfg, "w") as f:
        f.write("dataset: {type: image_list, path: %s, root: %s}\n"
                "transform: {scale: 224, crop: 224}\n"
                "loader: {batch_size: 32, num_workers: 0, threads: 0}\n"
                "block_size: 256\n" % (list_json, folder))
    return cfg


def stage_command(stage, args, tmp):
    py = [sys.executable]
    if stage == "build":
        return py + [os.path.join(ROOT, "build_graph.py"), str(args.nbg), "--ddir", args.ddir, "--force",
                     "--recall_nq", "0"]
    if stage == "diffusion":
        return py + [os.path.join(ROOT, "diffusion.py"), "--ddir", args.ddir, "--split", args.split,
                     "--nbg", str(args.nbg), "--nlabeled", "2", "--seed", "1", "--k", "30", "--niter", "3"]
    if stage == "features":
        return py + [os.path.join(ROOT, "save_features.py"), "--cfg", args.features_cfg, "--model",
                     "EfficientNetLite0", "--outfile", os.path.join(tmp, "f.hdf5"), "--device", "cpu"]
    if stage == "logreg":
        return py + [os.path.join(ROOT, "logreg.py"), "--ddir", args.ddir, "--split", args.split,
                     "--nlabeled", "2", "--maxiter", str(args.maxiter), "--verbose", "0", "--device", "cpu"]
    raise SystemExit("error: unknown stage %r (build, diffusion, features, logreg)" % stage)


def run_stage(stage, cmd, tmp):
    """Run one stage; returns (seconds, rate) where rate is the stage's speed (higher is faster)."""
    if stage == "features":
        out = os.path.join(tmp, "f.hdf5")
        if os.path.exists(out):
            os.unlink(out)
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    wall = time.time() - t0
    if r.returncode != 0:
        sys.stdout.write(r.stdout[-3000:])
        raise SystemExit("error: %s exited %d" % (" ".join(cmd), r.returncode))
    if stage == "features":
        res = json.loads(r.stdout.strip().splitlines()[-1])
        return wall, float(res["images_per_s"])
    return wall, 1.0 / wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddir", required=True, help="a data root with features and the background (generate_ddir.py)")
    p.add_argument("--split", default=None, help="class split (default: DDIR/label_idx.json)")
    p.add_argument("--nbg", type=int, default=1000000, help="background rows of build and diffusion")
    p.add_argument("--stages", default="build,diffusion,features,logreg")
    p.add_argument("--loads", default="none,yes,torch2")
    p.add_argument("--nimg", type=int, default=512, help="images of the features stage")
    p.add_argument("--maxiter", type=int, default=4000, help="SGD iterations of the logreg stage")
    args = p.parse_args()
    args.split = args.split or os.path.join(args.ddir, "label_idx.json")
    loads = args.loads.split(",")
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        if var in os.environ:
            print("note: %s=%r for the stages" % (var, os.environ[var]), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            if stage == "features":
                args.features_cfg = make_images(tmp, args.nimg)
            cmd = stage_command(stage, args, tmp)
            if stage in ("diffusion", "features"):   # warm-up: completion cache, model weights, page cache
                run_stage(stage, cmd, tmp)
            idle = None
            for load in loads:
                lp = start_load(load)
                try:
                    wall, rate = run_stage(stage, cmd, tmp)
                finally:
                    stop_load(lp)
                idle = rate if load == "none" else idle
                frac = rate / idle if idle else float("nan")
                results.append({"stage": stage, "load": load, "wall_s": round(wall, 2), "rate": rate,
                                "of_idle": round(frac, 3)})
                print("%-9s beside %-6s %8.1f s wall  %s  %5.0f%% of idle" % (
                    stage, load, wall, "%.1f images/s" % rate if stage == "features" else "",
                    100 * frac), flush=True)
    print(json.dumps({"bench": "busy", "nbg": args.nbg, "results": results}))


if __name__ == "__main__":
    main()
