"""CPU throughput of feature extraction: images/s of a network at several input sizes.

Times the network alone (random input batches, after one warm-up batch) with channels_last and
with the default contiguous layout, in the same process, and the whole save_features pipeline
(PNG decoding, preprocessing, hdf5 writing) on generated 64x64 RGBA images.

  python benchmarks/bench_features.py                          # EfficientNetLite0, 224 and 128 px
  python benchmarks/bench_features.py --model ResNet50 --sizes 224 --threads 2

Prints one line per measurement and a final JSON line.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from lowshot import features, networks


def network_rate(model, size, batch, nbatch, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    with torch.inference_mode():
        m.features(x)
        t0 = time.time()
        for _ in range(nbatch):
            m.features(x)
    return batch * nbatch / (time.time() - t0)


def pipeline_rate(model_name, size, nimg, batch, workers, d):
    list_json = os.path.join(d, "list.json")
    if not os.path.exists(list_json):
        rng = np.random.RandomState(0)
        names = []
        for k in range(nimg):
            a = rng.randint(0, 256, (8, 8, 4)).astype(np.uint8)
            Image.fromarray(a, "RGBA").resize((64, 64), Image.BILINEAR).save(
                os.path.join(d, "%05d.png" % k))
            names.append("%05d.png" % k)
        with open(list_json, "w") as f:
            json.dump({"image_names": names, "image_labels": [0] * nimg}, f)
    cfg = features.load_config(None, overrides={
        "dataset": {"type": "image_list", "path": list_json},
        "transform": {"scale": size, "crop": size},
        "loader": {"batch_size": batch, "num_workers": workers, "threads": 0},
        "block_size": 4 * batch})
    out = os.path.join(d, "f%d.hdf5" % size)
    return features.extract_features(cfg, out, model_name, device="cpu")["images_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="EfficientNetLite0", choices=networks.MODELS)
    p.add_argument("--sizes", default="224,128", help="input sides")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--nbatch", type=int, default=3, help="timed batches per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--nimg", type=int, default=256, help="images of the pipeline measurement")
    p.add_argument("--workers", type=int, default=1, help="pipeline decoding processes")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = {"model": args.model, "threads": torch.get_num_threads(),
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    print("model %s, %d torch threads, load average %.2f" % (args.model, res["threads"],
                                                            res["loadavg_1min"]), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for size in [int(s) for s in args.sizes.split(",")]:
            model = networks.load_model(args.model, image_size=size)
            for cl in (True, False):
                r = network_rate(model, size, args.batch, args.nbatch, cl)
                key = "%dpx_network_%s" % (size, "channels_last" if cl else "contiguous")
                res[key] = round(r, 1)
                print("%s: %.1f images/s" % (key, r), flush=True)
            r = pipeline_rate(args.model, size, args.nimg, args.batch, args.workers, d)
            res["%dpx_pipeline" % size] = r
            print("%dpx_pipeline (save_features, %d images): %.1f images/s" % (size, args.nimg, r),
                  flush=True)
    print(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    main()
