"""The runs of each experiment of the phases (logreg, diffusion, fusion): their commands, result files
and expected parameters, for validation (phase 1) and test (phase 3). A mixin of lowshot.phases.Phases,
which provides the paths, the config and the resources.
"""
from lowshot.launch import Run
from lowshot.phase_config import method_name, parse_method, run_name, variant_name


class RunGrid:
    """The run builders of :class:`lowshot.phases.Phases`."""

    def logreg_val_runs(self):
        """Phase 1: the validation grid."""
        c = self.cfg["logreg"]
        runs = []
        for n in self.cfg["nlabeled"]:
            for lr in c["lr"]:
                for wd in c["wd"]:
                    for bs in c["batchsize"]:
                        for s in self.cfg["seeds"]:
                            runs.append(self._logreg_run("val", "val", n, s, lr, wd, bs,
                                                         c["maxiter"], grid=True))
        return runs

    def _logreg_run(self, mode, sub, n, s, lr, wd, bs, maxiter, grid=False, scores=False,
                    model=False):
        name = run_name(n, s, lr=lr, wd=wd, batchsize=bs) if grid else run_name(n, s)
        base = self.path("logreg", sub, name)
        cmd = self._script("logreg.py") + [
            "--mode", mode, "--nlabeled", n, "--seed", s, "--lr", repr(lr), "--wd", repr(wd),
            "--batchsize", bs, "--maxiter", maxiter, "--result", base + ".json"]
        outputs = [base + ".json"]
        if scores:
            cmd += ["--storeL", base + ".npy"]
            outputs.append(base + ".npy")
        if model:
            cmd += ["--storemodel", base + ".pt"]
            outputs.append(base + ".pt")
        cmd += self._common() + list(self.cfg["logreg"]["args"])
        expect = {"mode": mode, "nlabeled": n, "seed": s, "lr": float(lr), "wd": float(wd),
                  "batchsize": bs, "maxiter": maxiter}
        return Run(name, cmd, outputs, base + ".log", expect=expect,
                   resources=self._resources("logreg"))

    def logreg_test_runs(self, chosen):
        """Phase 3: test runs with the chosen parameters, and the validation re-runs storing scores."""
        fusion = bool(self.fusion_variants())
        runs = []
        for n in self.cfg["nlabeled"]:
            p = chosen.get(n)
            if p is None:
                continue
            for s in self.cfg["seeds"]:
                runs.append(self._logreg_run("test", "test", n, s, p["lr"], p["wd"], p["batchsize"],
                                             p["maxiter"], scores=fusion,
                                             model=self.cfg["logreg"]["store_model"]))
                if fusion:
                    runs.append(self._logreg_run("val", "val_scores", n, s, p["lr"], p["wd"],
                                                 p["batchsize"], p["maxiter"], scores=True))
        return runs

    def logreg_scores_path(self, mode, n, s):
        return self.path("logreg", "test" if mode == "test" else "val_scores",
                         run_name(n, s) + ".npy")

    # ---------------------------------------------------------------- diffusion runs

    def _diffusion_runs(self, mode, sub, n, s, nbg, indomain, niter, scores=False, spec="douze18",
                        suffix=""):
        """One diffusion run of the method ``spec`` (variant[:weights]): either one process, or class
        slices + a merge (two lists). ``suffix``: the method's part of the file names (validation
        runs; a test run's name is its background's alone, its result records the method)."""
        d = self.cfg["diffusion"]
        name = run_name(n, s, variant_name(nbg, indomain) + suffix)
        base = self.path("diffusion", sub, name)
        m = parse_method(spec)
        cmd = self._script("diffusion.py") + [
            "--mode", mode, "--nlabeled", n, "--seed", s, "--k", d["k"], "--nbg", nbg,
            "--niter", niter]
        if suffix or method_name(spec):           # the paper's method keeps the commands it had
            cmd += ["--variant", m.variant, "--weights", m.weights]
        lslice = self.per_nbg("lslice", nbg)
        if lslice:
            cmd += ["--lslice", lslice]
        if indomain:
            cmd.append("--indomain")
        extra = self._common() + list(d["args"])
        expect = {"mode": mode, "nlabeled": n, "seed": s, "k": d["k"], "nbg": nbg, "niter": niter,
                  "indomain": indomain, "variant": m.variant, "weights": m.weights}
        res = self._resources("diffusion", nbg)
        m = self.nslices(nbg)
        if scores or m == 1:
            outputs = [base + ".json"]
            cmd2 = cmd + ["--result", base + ".json"]
            if scores:
                cmd2 += ["--storeL", base + ".npy"]
                outputs.append(base + ".npy")
            return [Run(name, cmd2 + extra, outputs, base + ".log", expect=expect,
                        resources=res)], []
        C = self.nclass(mode)
        slices = []
        for i in range(m):
            a, b = i * C // m, (i + 1) * C // m
            # slices have no result JSON to check: their names carry the parameters
            sname = "%s.k%d.niter%d.slice%dof%d" % (name, d["k"], niter, i, m)
            sbase = self.path("diffusion", sub, "slices", sname)
            slices.append(Run(sname,
                              cmd + ["--class_range", "%d:%d" % (a, b), "--store_slice",
                                     sbase + ".npz"] + extra,
                              [sbase + ".npz"], sbase + ".log", resources=res))
        merge = Run(name, self._script("diffusion.py") + ["--merge_slices"]
                    + [r.outputs[0] for r in slices] + ["--result", base + ".json"],
                    [base + ".json"], base + ".log", deps=[r.outputs[0] for r in slices],
                    expect=expect, resources=self._resources("diffusion"))
        return slices, [merge]

    def diffusion_val_runs(self):
        """Phase 1: (runs or slices, merges) of the validation grid."""
        first, merges = [], []
        for n in self.cfg["nlabeled"]:
            for nbg, ind in self.variants():
                for spec in self.cfg["diffusion"]["methods"]:
                    for s in self.cfg["seeds"]:
                        a, b = self._diffusion_runs("val", "val", n, s, nbg, ind, self.cfg["diffusion"]["niter"],
                                                    spec=spec, suffix=method_name(spec))
                        first += a
                        merges += b
        return first, merges

    def diffusion_test_runs(self, chosen):
        """Phase 3: test runs (scores stored for the fused backgrounds) and validation re-runs."""
        fused = set(self.fusion_variants())
        first, merges = [], []
        for n in self.cfg["nlabeled"]:
            for nbg, ind in self.variants():
                p = chosen.get(n, {}).get(variant_name(nbg, ind))
                if p is None:
                    continue
                spec = p.get("method", "douze18")
                for s in self.cfg["seeds"]:
                    fuse = (nbg, ind) in fused
                    a, b = self._diffusion_runs("test", "test", n, s, nbg, ind, p["niter"],
                                                scores=fuse, spec=spec)
                    first += a
                    merges += b
                    if fuse:
                        first += self._diffusion_runs("val", "val_scores", n, s, nbg, ind,
                                                      p["niter"], scores=True, spec=spec)[0]
        return first, merges

    # ---------------------------------------------------------------- fusion runs

    def fusion_runs(self, mode, weights=None):
        """Fusion on val over the weight grid, or on test with the chosen weights."""
        runs = []
        for n in self.cfg["nlabeled"]:
            for nbg, ind in self.fusion_variants():
                vn = variant_name(nbg, ind)
                if mode == "test":
                    w = (weights or {}).get(n, {}).get(vn)
                    if w is None:
                        continue
                    wlist = [float(w["weight"])]
                    ws = ["--weight", repr(wlist[0])]
                else:
                    wlist = [float(w) for w in self.cfg["fusion"]["weights"]]
                    ws = ["--weights", ",".join(repr(w) for w in wlist), "--metric", self.cfg["metric"]]
                for s in self.cfg["seeds"]:
                    name = run_name(n, s, vn)
                    base = self.path("fusion", mode, name)
                    sub = "test" if mode == "test" else "val_scores"
                    A = self.logreg_scores_path(mode, n, s)
                    B = self.path("diffusion", sub, name + ".npy")
                    cmd = self._script("fusion.py") + [
                        "--mode", mode, "--nlabeled", n, "--seed", s, "--logreg_scores", A,
                        "--diffusion_scores", B] + ws + ["--result", base + ".json"]
                    cmd += self._common() + list(self.cfg["fusion"]["args"])
                    runs.append(Run(name, cmd, [base + ".json"], base + ".log", deps=[A, B],
                                    expect={"mode": mode, "nlabeled": n, "seed": s,
                                            "weights": wlist},
                                    resources=self._resources("fusion")))
        return runs

    # ---------------------------------------------------------------- executing runs
