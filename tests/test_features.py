"""Feature extraction: network layouts, checkpoints, datasets, hdf5 output, resuming, EfficientNet."""
import functools
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import save_features
from lowshot import features, networks
from lowshot.common import InputError
from lowshot.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALE, CROP = 36, 32      # tiny inputs keep the CPU tests fast


@pytest.fixture(autouse=True)
def one_thread():
    # other jobs share the cores: a single thread avoids OpenMP spin-waiting
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- networks

def documented_resnet50_layout(num_classes=1000):
    """Keys and shapes of the 89.tar ResNet-50 state dict, written out from the issue's description."""
    bn = lambda p, c: [(p + s, (c,)) for s in (".weight", ".bias", ".running_mean", ".running_var")]
    keys = [("trunk.0.weight", (64, 3, 7, 7))] + bn("trunk.1", 64)
    idx, indim = 4, 64
    for width, n in zip((256, 512, 1024, 2048), (3, 4, 6, 3)):
        inner = width // 4
        for j in range(n):
            p = "trunk.%d." % idx
            keys += [(p + "C1.weight", (inner, indim, 1, 1))] + bn(p + "BN1", inner)
            keys += [(p + "C2.weight", (inner, inner, 3, 3)), (p + "C2.bias", (inner,))]
            keys += bn(p + "BN2", inner)
            keys += [(p + "C3.weight", (width, inner, 1, 1))] + bn(p + "BN3", width)
            if j == 0:
                keys.append((p + "shortcut.weight", (width, indim, 1, 1)))
            idx, indim = idx + 1, width
    keys.append(("classifier.weight", (num_classes, 2048)))
    return keys


def test_resnet50_state_dict_layout():
    model = networks.build("ResNet50")
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    want = documented_resnet50_layout()
    assert len(want) == 266
    assert sorted(got) == sorted(want)
    # 224 px input: 7x7 final map, pooled to a 2048-d feature; stages 2-4 halve the resolution
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        sizes = []
        h = x
        for layer in model.trunk:
            h = layer(h)
            sizes.append(h.shape[-1])
    assert sizes[3] == 56 and sizes[6] == 56 and sizes[7] == 28 and sizes[18] == 7 and sizes[19] == 7
    assert model.features(x).shape == (1, 2048)


@pytest.mark.parametrize("name,dim,nkeys", [("ResNet10", 512, 61), ("ResNet18", 512, 101),
                                            ("ResNet34", 512, 181), ("ResNet101", 2048, 538)])
def test_other_resnets(name, dim, nkeys):
    model = networks.build(name, num_classes=7)
    sd = model.state_dict()
    nblocks = sum(networks.RESNETS[name][1])
    assert model.feature_dim == dim and len(sd) == nkeys
    assert "trunk.%d.C1.weight" % (3 + nblocks) in sd and "trunk.%d.C1.weight" % (4 + nblocks) not in sd
    assert sd["classifier.weight"].shape == (7, dim) and "classifier.bias" not in sd
    # basic blocks: BN on the shortcut, none in stage 1 (64 -> 64)
    if dim == 512:
        assert "trunk.4.shortcut.weight" not in sd
        assert sd["trunk.%d.BNshortcut.running_var" % (4 + networks.RESNETS[name][1][0])].shape == (128,)


def test_checkpoint_89tar_roundtrip(tmp_path):
    torch.manual_seed(0)
    ref = networks.build("ResNet50").eval()
    for m in ref.modules():     # non-trivial BN statistics so a wrong load shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
    sd = ref.state_dict()
    dp = {"module." + k: v for k, v in sd.items()}
    dp["module.classifier.bias"] = torch.zeros(1000)      # dropped: the model has no bias
    for name, state in (("prefixed", dp), ("plain", dict(sd))):
        path = str(tmp_path / ("%s_89.tar" % name))
        torch.save({"epoch": 89, "state": state}, path)
        model = networks.build("ResNet50").eval()
        info = networks.load_checkpoint(model, path)
        assert info == {"epoch": 89, "nkeys": 266}
        with torch.no_grad():
            assert torch.equal(model(x), want)
    # anything else is an error naming the keys
    bad = dict(dp)
    del bad["module.trunk.7.BN2.running_var"]
    bad["module.extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.tar")
    torch.save({"epoch": 1, "state": bad}, path)
    with pytest.raises(InputError, match=r"missing keys: trunk\.7\.BN2\.running_var.*"
                                         r"unexpected keys: extra\.weight"):
        networks.load_checkpoint(networks.build("ResNet50"), path)
    with pytest.raises(InputError, match="shape mismatches: classifier.weight"):
        networks.load_checkpoint(networks.build("ResNet50", num_classes=10), str(tmp_path / "plain_89.tar"))


# ----------------------------------------------------------------------------- preprocessing

def test_to_rgb_composites_alpha_on_white():
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (9, 11, 4)).astype(np.uint8)
    rgba[0, 0, 3] = 0
    rgba[1, 1, 3] = 255
    got = np.asarray(features.to_rgb(Image.fromarray(rgba, "RGBA"))).astype(float)
    a = rgba[..., 3:] / 255.0
    want = a * rgba[..., :3] + (1 - a) * 255
    assert np.abs(got - want).max() <= 1.0
    assert (got[0, 0] == 255).all() and (got[1, 1] == rgba[1, 1, :3]).all()


def test_to_rgb_image_kinds():
    """Greyscale, CMYK, 16-bit greyscale, palette with transparency and EXIF-rotated images all
    become upright 8-bit RGB (against hand-computed values)."""
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    got = np.asarray(features.to_rgb(Image.fromarray(grey, "L")))
    assert got.shape == (3, 4, 3) and (got == grey[..., None]).all()
    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    im16 = Image.fromarray(g16)
    assert im16.mode.startswith("I")
    got = np.asarray(features.to_rgb(im16))
    assert (got[..., 0] == (g16 >> 8)).all()
    cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))           # no black, full magenta + yellow
    assert np.asarray(features.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 0
    assert np.asarray(features.to_rgb(pal)).tolist() == [[[255, 255, 255], [200, 100, 50]],
                                                         [[200, 100, 50], [255, 255, 255]]]
    # a 2x3 photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)
    import io
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[0, 0] = 255                                       # top-left of the stored pixels
    im = Image.fromarray(stored, "RGB")
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    got = np.asarray(features.to_rgb(Image.open(io.BytesIO(buf.getvalue()))))
    assert got.shape == (3, 2, 3) and (got[0, 1] == 255).all()   # now top-right, image upright


def reference_preprocess(img, scale, crop, mean, std):
    """Independent numpy version: shorter side to ``scale`` (old torchvision Scale), center crop."""
    w, h = img.size
    ow, oh = (scale, int(scale * h / w)) if w < h else (int(scale * w / h), scale)
    a = np.asarray(img.convert("RGB").resize((ow, oh), Image.BILINEAR), dtype=np.float64) / 255
    top, left = int(round((oh - crop) / 2.0)), int(round((ow - crop) / 2.0))
    a = a[top:top + crop, left:left + crop]
    a = (a - np.array(mean)) / np.array(std)
    return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32))


def test_transform_matches_reference():
    rng = np.random.RandomState(1)
    t = features.Transform({"transform_list": list(features.TRANSFORMS), "scale": SCALE,
                            "crop": CROP, "mean": None, "std": None},
                           networks.IMAGENET_MEAN, networks.IMAGENET_STD)
    for h, w in ((40, 61), (77, 50), (36, 36)):
        img = Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8))
        want = reference_preprocess(img, SCALE, CROP, networks.IMAGENET_MEAN, networks.IMAGENET_STD)
        got = t(img)
        assert got.shape == (3, CROP, CROP)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- YFCC100M tree

def jpeg_bytes(seed):
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 256, (30 + seed % 13, 30 + seed % 17, 3)).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def yfcc(tmp_path_factory):
    """Mini YFCC100M tree: images 990..999 in 00/000.zip (995 corrupt), 00/001.zip missing,
    images 999995..1000004 across 00/999.zip and 01/000.zip (1000002 absent from its zip)."""
    root = tmp_path_factory.mktemp("yfcc")
    images = {}
    for i in list(range(990, 1000)) + list(range(999995, 1000005)):
        images[i] = jpeg_bytes(i)
    images[995] = images[995][:200]         # truncated jpeg
    del images[1000002]
    zips = {}
    for i, data in images.items():
        zname, entry = "%02d/%03d.zip" % (i // 10**6, (i // 1000) % 1000), "%03d.jpg" % (i % 1000)
        zips.setdefault(zname, []).append((entry, data))
    for zname, entries in zips.items():
        os.makedirs(root / os.path.dirname(zname), exist_ok=True)
        with zipfile.ZipFile(root / zname, "w", zipfile.ZIP_STORED) as z:
            for entry, data in entries:
                z.writestr(entry, data)
    torch.manual_seed(1)
    model = networks.build("ResNet10").eval()
    ckpt = str(root / "r10_89.tar")
    torch.save({"epoch": 89, "state": {"module." + k: v for k, v in model.state_dict().items()}},
               ckpt)
    return {"root": str(root), "images": images, "ckpt": ckpt, "model": model}


def yfcc_config(tmp_path, root, **loader):
    cfg = {"dataset": {"type": "yfcc100m", "path": root},
           "transform": {"scale": SCALE, "crop": CROP},
           "loader": dict({"batch_size": 4, "num_workers": 0, "threads": 1}, **loader),
           "block_size": 8}
    path = str(tmp_path / "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def read_h5(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def expected_rows(yfcc, i0, i1):
    """Features computed image by image: decoded here, preprocessed by the numpy reference."""
    xs, bad = [], []
    for i in range(i0, i1):
        img = None
        if i in yfcc["images"] and i != 995:
            img = Image.open(io.BytesIO(yfcc["images"][i])).convert("RGB")
        if img is None:
            bad.append(i)
            img = Image.new("RGB", (256, 256))
        xs.append(reference_preprocess(img, SCALE, CROP, networks.IMAGENET_MEAN,
                                       networks.IMAGENET_STD))
    with torch.no_grad():
        feats = yfcc["model"].features(torch.stack(xs)).numpy()
    return feats, bad


def test_yfcc_rows_and_bad_images(yfcc, tmp_path):
    cfg = yfcc_config(tmp_path, yfcc["root"], num_workers=1)
    out = str(tmp_path / "block.hdf5")
    save_features.main(["--cfg", cfg, "--model", "ResNet10", "--modelfile", yfcc["ckpt"],
                        "--outfile", out, "--i0", "990", "--i1", "1010"])
    d, attrs = read_h5(out)
    feats, bad = expected_rows(yfcc, 990, 1010)
    assert bad == [995] + list(range(1000, 1010))
    assert d["all_feats"].dtype == np.float32 and d["all_feats"].shape == (20, 512)
    assert d["all_labels"].dtype == np.int32 and (d["all_labels"] == -1).all()
    assert d["count"].tolist() == [20]
    assert d["bad_images"].tolist() == bad
    np.testing.assert_allclose(d["all_feats"], feats, rtol=1e-4, atol=1e-5)
    assert attrs["model"] == "ResNet10" and attrs["checkpoint"] == yfcc["ckpt"]
    assert (attrs["i0"], attrs["i1"]) == (990, 1010)
    assert json.loads(attrs["config"])["dataset"]["type"] == "yfcc100m"
    # OUTFILE.bad names each unreadable image: index, zip:entry, reason
    assert sorted(os.listdir(tmp_path)) == ["block.hdf5", "block.hdf5.bad", "cfg.yaml"]
    lines = [l.split("\t") for l in open(out + ".bad").read().splitlines()]
    assert [int(l[0]) for l in lines] == bad
    assert lines[0][1] == os.path.join(yfcc["root"], "00", "000.zip") + ":995.jpg"
    assert lines[-1][1] == os.path.join(yfcc["root"], "00", "001.zip") + ":009.jpg" and lines[-1][2]


def test_blocks_concatenate_to_whole(yfcc, tmp_path):
    cfg = yfcc_config(tmp_path, yfcc["root"])
    parts = []
    for i0, i1 in ((999995, 1000004), (999995, 1000000), (1000000, 1000004)):
        out = str(tmp_path / ("b%d_%d.hdf5" % (i0, i1)))
        save_features.main(["--cfg", cfg, "--model", "ResNet10", "--modelfile", yfcc["ckpt"],
                            "--outfile", out, "--i0", str(i0), "--i1", str(i1)])
        parts.append(read_h5(out)[0])
    whole, a, b = parts
    np.testing.assert_allclose(np.vstack([a["all_feats"], b["all_feats"]]), whole["all_feats"],
                               rtol=1e-5, atol=1e-6)
    assert np.concatenate([a["bad_images"], b["bad_images"]]).tolist() == [1000002]
    assert whole["bad_images"].tolist() == [1000002]
    feats, _ = expected_rows(yfcc, 999995, 1000004)
    np.testing.assert_allclose(whole["all_feats"], feats, rtol=1e-4, atol=1e-5)


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_interrupted_run_resumes_to_identical_file(yfcc, tmp_path):
    cfg = features.load_config(yfcc_config(tmp_path, yfcc["root"]))
    ref = str(tmp_path / "ref.hdf5")
    features.extract_features(cfg, ref, "ResNet10", yfcc["ckpt"], i0=990, i1=1010)

    class Stop(Exception):
        pass

    def stop_after_first(rows):
        raise Stop

    out = str(tmp_path / "out.hdf5")
    with pytest.raises(Stop):
        features.extract_features(cfg, out, "ResNet10", yfcc["ckpt"], i0=990, i1=1010,
                                  after_block=stop_after_first)
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    with h5py.File(out + ".partial", "r") as f:
        assert f["count"][0] == 8
    # a different model or range must not continue this file
    with pytest.raises(InputError, match="other settings"):
        features.extract_features(cfg, out, "ResNet10", yfcc["ckpt"], i0=990, i1=1011)
    res = features.extract_features(cfg, out, "ResNet10", yfcc["ckpt"], i0=990, i1=1010)
    assert res["rows_this_run"] == 12
    assert md5(out) == md5(ref)
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".partial.bad")

    # killed outright (no clean close) after the second block, then resumed
    out2 = str(tmp_path / "killed.hdf5")
    code = ("import os, signal\n"
            "import torch; torch.set_num_threads(1)\n"
            "from lowshot import features\n"
            "cfg = features.load_config(%r)\n"
            "def kill(rows):\n"
            "    if rows >= 16: os.kill(os.getpid(), signal.SIGKILL)\n"
            "features.extract_features(cfg, %r, 'ResNet10', %r, i0=990, i1=1010, after_block=kill)\n"
            % (str(tmp_path / "cfg.yaml"), out2, yfcc["ckpt"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    res = features.extract_features(cfg, out2, "ResNet10", yfcc["ckpt"], i0=990, i1=1010)
    assert res["rows_this_run"] == 4
    assert md5(out2) == md5(ref)


# ----------------------------------------------------------------------------- lists and folders

def test_image_list_and_folder(tmp_path):
    rng = np.random.RandomState(3)
    names, labels, imgs = [], [], []
    for k in range(7):
        c = k % 3
        rel = "c%d/img%d.png" % (c, k)
        os.makedirs(tmp_path / "imgs" / ("c%d" % c), exist_ok=True)
        a = rng.randint(0, 256, (20 + k, 25, 4)).astype(np.uint8)     # RGBA, like emoji PNGs
        Image.fromarray(a, "RGBA").save(tmp_path / "imgs" / rel)
        names.append(rel)
        labels.append(c)
        imgs.append(features.to_rgb(Image.fromarray(a, "RGBA")))
    names.append("c0/missing.png")
    labels.append(0)
    with open(tmp_path / "list.json", "w") as f:
        json.dump({"image_names": names, "image_labels": labels}, f)
    torch.manual_seed(2)
    model = networks.build("ResNet18").eval()
    ckpt = str(tmp_path / "r18.pth")
    torch.save(model.state_dict(), ckpt)
    cfg = {"dataset": {"type": "image_list", "path": "$DDIR/list.json", "root": "$DDIR/imgs"},
           "transform": {"scale": 24, "crop": 24},
           "loader": {"batch_size": 3, "num_workers": 0, "threads": 1}}
    with open(tmp_path / "cfg.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    out = str(tmp_path / "list.hdf5")
    save_features.main(["--cfg", str(tmp_path / "cfg.yaml"), "--ddir", str(tmp_path),
                        "--model", "ResNet18", "--modelfile", ckpt, "--outfile", out])
    d, _ = read_h5(out)
    xs = [reference_preprocess(im, 24, 24, networks.IMAGENET_MEAN, networks.IMAGENET_STD)
          for im in imgs + [Image.new("RGB", (256, 256))]]
    with torch.no_grad():
        want = model.features(torch.stack(xs)).numpy()
    np.testing.assert_allclose(d["all_feats"], want, rtol=1e-4, atol=1e-5)
    assert d["all_labels"].tolist() == labels and d["bad_images"].tolist() == [7]

    # the same images as a folder tree: classes sorted, files sorted within a class
    out2 = str(tmp_path / "folder.hdf5")
    with open(tmp_path / "cfg.yaml") as f:
        folder_cfg = yaml.safe_load(f)
    folder_cfg["dataset"] = {"type": "image_folder", "path": str(tmp_path / "imgs")}
    with open(tmp_path / "cfg.yaml", "w") as f:
        yaml.safe_dump(folder_cfg, f)
    save_features.main(["--cfg", str(tmp_path / "cfg.yaml"), "--model", "ResNet18",
                        "--modelfile", ckpt, "--outfile", out2, "--i0", "1", "--i1", "5"])
    d2, attrs = read_h5(out2)
    order = sorted(range(7), key=lambda k: (labels[k], names[k]))[1:5]
    np.testing.assert_allclose(d2["all_feats"], want[order], rtol=1e-4, atol=1e-5)
    assert d2["all_labels"].tolist() == [labels[k] for k in order]
    assert (attrs["i0"], attrs["i1"]) == (1, 5)


def test_bad_inputs(tmp_path, capsys):
    cfg = str(tmp_path / "cfg.yaml")
    with open(cfg, "w") as f:
        f.write("dataset: {type: yfcc100m, path: %s}\nloader: {batch_sise: 3}\n" % tmp_path)
    with pytest.raises(InputError, match="unknown key 'batch_sise'"):
        features.load_config(cfg)
    with open(cfg, "w") as f:
        f.write("dataset: {type: yfcc100m, path: %s}\n" % tmp_path)
    with pytest.raises(SystemExit):
        save_features.run_main(save_features.main,
                               ["--cfg", cfg, "--model", "ResNet10", "--outfile", str(tmp_path / "o")])
    assert "error: yfcc100m dataset: i1 (the end of the image range) is required" in capsys.readouterr().err
    # a wrong root would silently give black-image features: refused
    with pytest.raises(InputError, match=r"none of the zips of images \[5000, 7000\) exists .*"
                                         r"00/005.zip ... 00/006.zip"):
        features.make_dataset({"type": "yfcc100m", "path": str(tmp_path)}, 5000, 7000)
    with open(tmp_path / "list.json", "w") as f:
        json.dump({"image_names": ["a.png", "b.png"], "image_labels": [0, 1]}, f)
    with pytest.raises(InputError, match="none of its first images exists"):
        features.make_dataset({"type": "image_list", "path": str(tmp_path / "list.json"),
                               "root": str(tmp_path / "elsewhere")})


# ----------------------------------------------------------------------------- EfficientNet-Lite0

def skimage_photos():
    import skimage.data
    return {name: getattr(skimage.data, name)() for name in
            ("chelsea", "astronaut", "coffee", "rocket")}


def test_efficientnet_lite0_classifies_chelsea():
    model = networks.load_model("EfficientNetLite0", image_size=224)
    t = features.Transform({"transform_list": list(features.TRANSFORMS), "scale": 224,
                            "crop": 224, "mean": None, "std": None}, model.mean, model.std)
    photos = skimage_photos()
    x = torch.stack([t(Image.fromarray(photos["chelsea"])), t(Image.fromarray(photos["coffee"]))])
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    top = logits.argmax(1).tolist()
    assert top == [285, 967]          # Egyptian cat, espresso
    assert feats.shape == (2, 1280)


def test_efficientnet_lite0_normalisation_matches_its_batchnorm():
    """The weights' first BN layer saw inputs normalised as (pixel - 127) / 128: its running
    variance matches that preprocessing, not the ImageNet mean/std (which gives ~5x the variance)."""
    model = networks.load_model("EfficientNetLite0", image_size=224)
    imgs = []
    for a in skimage_photos().values():
        im = Image.fromarray(a[..., :3])
        imgs.append(np.asarray(features.center_crop(features.scale(im, 224), 224), dtype=np.float32))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 255
    bn0 = model.net._bn0
    err = {}
    for name, (mean, std) in {"lite": (model.mean, model.std),
                              "imagenet": (networks.IMAGENET_MEAN, networks.IMAGENET_STD)}.items():
        xn = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            y = model.net._conv_stem(xn)
        err[name] = float(torch.log(y.var((0, 2, 3)) / bn0.running_var).median())
    assert abs(err["lite"]) < 0.5 < abs(err["imagenet"])
    assert model.mean == networks.LITE_MEAN


# ----------------------------------------------------------------------------- progress and locking

def test_progress_lines_in_a_log_file(yfcc, tmp_path, monkeypatch, capsys):
    cfg = features.load_config(yfcc_config(tmp_path, yfcc["root"]))
    # a line at every batch instead of every 30 s (stderr is not a terminal under pytest)
    monkeypatch.setattr(features, "Progress", functools.partial(Progress, every=0.0))
    features.extract_features(cfg, str(tmp_path / "o.hdf5"), "ResNet10", yfcc["ckpt"], i0=990, i1=1000)
    got = re.findall(r"extracting rows 0\.\.10: (\d+) / 10 images \(.* images/s, ETA \d+ s\)",
                     capsys.readouterr().out)
    assert [int(g) for g in got] == [4, 8, 10]      # batches of 4


def test_concurrent_runs_on_one_output_take_turns(yfcc, tmp_path):
    """The second run waits for the first (which holds the lock until the test lets it go), then
    finds its file: both exit 0, the file is the first one's, no lock or partial file is left."""
    cfg = yfcc_config(tmp_path, yfcc["root"])
    out = str(tmp_path / "block.hdf5")
    go = str(tmp_path / "go")
    argv = ["--cfg", cfg, "--model", "ResNet10", "--modelfile", yfcc["ckpt"], "--outfile", out,
            "--i0", "990", "--i1", "1010"]
    first_code = ("import os, sys, time\n"
                  "import torch; torch.set_num_threads(1)\n"
                  "import save_features\n"
                  "from lowshot import features\n"
                  "extract = features.extract_features\n"
                  "def held(*a, **k):\n"
                  "    def wait(rows):\n"
                  "        while not os.path.exists(%r): time.sleep(0.05)\n"
                  "    return extract(*a, after_block=wait, **k)\n"
                  "features.extract_features = held\n"
                  "save_features.run_main(save_features.main, sys.argv[1:])\n" % go)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", first_code] + argv, cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None
    try:
        assert "extracting 20 images" in read_until(first, "extracting ")
        second = subprocess.Popen([sys.executable, "save_features.py"] + argv, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert "waiting for it to finish" in read_until(second, "another run holds")
        open(go, "w").close()
        out1, out2 = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert json.loads(out1.splitlines()[-1])["rows_this_run"] == 20
    assert json.loads(out2.splitlines()[-1])["reused"] is True
    assert "was written by the run waited for: nothing to do" in out2
    feats, bad = expected_rows(yfcc, 990, 1010)
    d, _ = read_h5(out)
    np.testing.assert_allclose(d["all_feats"], feats, rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["block.hdf5", "block.hdf5.bad", "cfg.yaml", "go"]
    # what the waiting run checks: the file's settings are its own, not another range's
    loaded = features.load_config(cfg)
    assert features.written(out, loaded, "ResNet10", yfcc["ckpt"], 990, 1010)
    assert not features.written(out, loaded, "ResNet10", yfcc["ckpt"], 990, 1011)
    assert not features.written(out, loaded, "ResNet18", yfcc["ckpt"], 990, 1010)


def read_until(proc, text, timeout=120):
    """The output of ``proc`` up to (at least) ``text``, or all of it if it ends first; read from
    the descriptor (no buffer of its own: ``communicate`` later reads the rest)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = b"", time.time() + timeout
    while text.encode() not in seen and time.time() < deadline:
        if sel.select(timeout=1):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen.decode()
