#!/usr/bin/env python3
"""GPU check of logreg (< 2 min): the CUDA path trains the same model as the CPU path (same batches,
weights equal to float32 rounding), and how much faster it runs at the paper's size (507 classes,
D 2048, batch 128). Prints PASS/FAIL lines and one JSON line; skips (exit 0) without a GPU.

  python benchmarks/gpu_check_logreg.py
"""
import json
import sys
import time

import numpy as np
import torch

from lowshot import logreg


def main():
    if not torch.cuda.is_available():
        print("SKIP: torch sees no GPU")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 64)).astype(np.float32)
    y = rng.integers(0, 40, 3000)
    m_cpu = logreg.train(X, y, 40, 0.05, 0.01, 0.9, 32, 300, 1, verbose=0, device="cpu")
    m_gpu = logreg.train(X, y, 40, 0.05, 0.01, 0.9, 32, 300, 1, verbose=0, device="cuda")
    err = float((m_cpu.weight.detach() - m_gpu.weight.detach().cpu()).abs().max())
    good = err < 1e-3
    ok &= good
    print("%s: cuda vs cpu weights after 300 SGD steps, max abs diff %.2e" % ("PASS" if good else "FAIL", err))
    S_cpu = logreg.scores(m_cpu.weight.detach(), m_cpu.bias.detach(), X)
    S_gpu = logreg.scores(m_gpu.weight.detach(), m_gpu.bias.detach(), X)
    agree = float((S_cpu.argmax(1) == S_gpu.argmax(1)).mean())
    good = agree > 0.99
    ok &= good
    print("%s: top-1 agreement of cpu and cuda scores %.4f" % ("PASS" if good else "FAIL", agree))

    Xb = rng.standard_normal((10422, 2048)).astype(np.float32)
    yb = rng.integers(0, 507, 10422)
    times = {}
    for dev, iters in (("cpu", 300), ("cuda", 3000)):
        logreg.train(Xb, yb, 507, 0.001, 0.01, 0.0, 128, 20, 1, verbose=0, device=dev)   # warm-up
        t0 = time.time()
        m = logreg.train(Xb, yb, 507, 0.001, 0.01, 0.0, 128, iters, 1, verbose=0, device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        times[dev] = (time.time() - t0) / iters
        del m
    speedup = times["cpu"] / times["cuda"]
    print("INFO: 507 classes, D 2048, batch 128: cpu %.2f ms/iter (%d threads), cuda %.3f ms/iter, "
          "speed-up %.1fx" % (1e3 * times["cpu"], torch.get_num_threads(), 1e3 * times["cuda"], speedup))
    print(json.dumps({"check": "logreg", "ok": bool(ok), "cpu_ms_per_iter": 1e3 * times["cpu"],
                      "cuda_ms_per_iter": 1e3 * times["cuda"], "device": torch.cuda.get_device_name()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
