"""Sample quality: the Frechet distance between two image sets in a feature space the pipeline owns.

Frechet distance between Gaussians fitted to the features of two sets (Heusel et al. 2017, FID):

    FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Standard FID takes the 2048-d pool features of an ImageNet Inception-v3. Those weights are not
shipped with the pipeline (and are never downloaded by it); they also see 8x8 digits through a
299x299 upscale. Instead the feature space is the penultimate layer of a small CNN classifier that
the pipeline trains, seeded, on the *train* split of the run's own dataset (``DigitCNN``; a few
seconds on a CPU for digits). It is cached next to the dataset, ``<data.url>/feature-net/<key>.pt``,
keyed by a hash of its configuration and of the train split's shard checksums, so every evaluation of
every run on that dataset uses the same feature space. Its held-out accuracy (on the eval split) is
recorded with every evaluation. Numbers are comparable only within one feature space: the metric is
named after it (``fd_digitcnn`` for the digits dataset), never "FID". ``quality_metrics`` is what
an evaluation reports: the distance to the eval split and the real-data floors beside it.

Importable without Ray and MLflow.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data import DataError, NotFoundError, load_split_arrays, open_manifest
from pipeline.data.storage import join_url, read_bytes, write_bytes

FEATURE_NET_VERSION = 1
FEATURE_NET_DIR = "feature-net"


# ------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``scipy.linalg.sqrtm`` of ``sigma1 @ sigma2``. That product's eigenvalues are real and >= 0 in
    exact arithmetic, but rounding gives tiny imaginary parts (dropped: an error above 1e-3 of the
    trace scale raises), and a singular product (fewer samples than dimensions) can give a
    non-finite root: then ``eps`` is added to both diagonals, as pytorch-fid does.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular products (dead ReLU features) warn but have a valid root; non-finite ones are handled.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean.real).max()))
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(
                f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g}): "
                "covariances are not positive semi-definite?"
            )
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    # Rounding can make identical sets come out at -1e-12.
    return max(fd, 0.0)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# ------------------------------------------------------------------------------------------------
# The feature network


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture and training of the classifier whose penultimate layer is the feature space."""

    image_size: int
    channels: int
    num_classes: int
    width: int = 32  # channels of the first convolution (then 2x)
    feature_dim: int = 64  # size of the penultimate layer: the feature space
    dropout: float = 0.25
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DigitCNN(nn.Module):
    """conv-conv-pool-conv, 2x2 average pool, a ``feature_dim`` ReLU layer, then the class logits.

    Any image size >= 4 works (the 2x2 adaptive pool fixes the flattened size).
    """

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if cfg.image_size >= 8 else nn.Identity(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(8 * w, cfg.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], the sampler's range."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@dataclass
class FeatureNet:
    """A trained feature network and what is known about it."""

    model: DigitCNN
    config: FeatureNetConfig
    name: str  # the feature space's name in metric keys, e.g. "digitcnn"
    key: str = ""  # cache key (hash of config + training data)
    url: str | None = None  # where it is cached
    info: dict[str, Any] = field(default_factory=dict)  # accuracy, train time, ...

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """(N, feature_dim) float64 features of uint8 NHWC images; reads ``images`` in chunks (memmap ok)."""
        self.model.eval()
        out = np.empty((len(images), self.config.feature_dim), dtype=np.float64)
        for i in range(0, len(images), batch_size):
            out[i : i + batch_size] = self.model.features(to_input(images[i : i + batch_size])).double().numpy()
        return out

    @torch.no_grad()
    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        self.model.eval()
        correct = 0
        for i in range(0, len(images), 2048):
            pred = self.model(to_input(images[i : i + 2048])).argmax(1).numpy()
            correct += int((pred == np.asarray(labels[i : i + 2048])).sum())
        return correct / max(len(images), 1)


def train_feature_net(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: FeatureNetConfig,
    *,
    name: str = "cnn",
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
) -> FeatureNet:
    """Train the classifier, seeded and single-threaded (so the same data gives the same net)."""
    if len(np.unique(labels)) < 2:
        raise ValueError("the feature network is a classifier: the training split needs at least 2 classes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = DigitCNN(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * -(-len(images) // cfg.batch_size)
        )
        x_all, y_all = to_input(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
        g = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x_all), generator=g)
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval().requires_grad_(False)
        net = FeatureNet(model=model, config=cfg, name=name)
        net.info = {
            "train_images": len(images),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "train_accuracy": net.accuracy(images, labels),
        }
        if eval_images is not None and eval_labels is not None and len(eval_images):
            net.info["eval_images"] = len(eval_images)
            net.info["eval_accuracy"] = net.accuracy(eval_images, eval_labels)
        return net
    finally:
        torch.set_num_threads(threads)


def feature_space_name(manifest_source: dict[str, Any] | None, key: str) -> str:
    """``digitcnn`` for the digits dataset; ``cnn_<key[:8]>`` for any other dataset's classifier."""
    if (manifest_source or {}).get("kind") == "digits":
        return "digitcnn"
    return f"cnn_{key[:8]}"


def feature_net_key(cfg: FeatureNetConfig, train_shard_sha256: list[str]) -> str:
    blob = json.dumps(
        {"version": FEATURE_NET_VERSION, "config": cfg.to_dict(), "train_shards": list(train_shard_sha256)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_feature_net(net: FeatureNet) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "version": FEATURE_NET_VERSION,
            "config": net.config.to_dict(),
            "state_dict": net.model.state_dict(),
            "name": net.name,
            "key": net.key,
            "info": json.dumps(net.info),
        },
        buf,
    )
    return buf.getvalue()


def load_feature_net(data: bytes, url: str | None = None) -> FeatureNet:
    d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if d.get("version") != FEATURE_NET_VERSION:
        raise ValueError(f"feature net {url}: version {d.get('version')!r}, expected {FEATURE_NET_VERSION}")
    cfg = FeatureNetConfig(**d["config"])
    model = DigitCNN(cfg)
    model.load_state_dict(d["state_dict"])
    model.eval().requires_grad_(False)
    return FeatureNet(model=model, config=cfg, name=d["name"], key=d["key"], url=url, info=json.loads(d["info"]))


def load_or_train_feature_net(
    data_url: str,
    storage: Any = None,
    *,
    eval_split: tuple[np.ndarray, np.ndarray] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    log: Callable[[str], None] = print,
) -> FeatureNet:
    """The dataset's feature network: from ``<data_url>/feature-net/<key>.pt`` or trained and cached there.

    ``eval_split`` is (uint8 NHWC images, labels) if the caller already has it; otherwise it is read,
    as the train split is, with ``pipeline.data.load_split_arrays`` when training is needed.
    ``image_size``/``channels``: what the images are read as (default: the manifest's; indexed shards
    have none).
    """
    manifest = open_manifest(data_url, storage, "train")
    size = {"image_size": image_size or manifest.image_size, "channels": channels or manifest.channels}
    cfg = FeatureNetConfig(**size, num_classes=len(manifest.class_names))
    key = feature_net_key(cfg, [s.sha256 for s in manifest.shards])
    url = join_url(data_url, FEATURE_NET_DIR, f"{key}.pt")
    try:
        net = load_feature_net(read_bytes(url, storage), url=url)
        net.info["cached"] = True
        log(f"feature net: reusing {url} (held-out accuracy {net.info.get('eval_accuracy', float('nan')):.4f})")
        return net
    except NotFoundError:
        pass
    s = load_split_arrays(data_url, storage, "train", **size)
    train = (s.images, s.labels)
    if eval_split is None:
        s = load_split_arrays(data_url, storage, "eval", **size)
        eval_split = (s.images, s.labels)
    log(f"feature net: training a {cfg.feature_dim}-feature CNN classifier on {len(train[0])} train images")
    net = train_feature_net(
        *train,
        cfg,
        name=feature_space_name(manifest.source, key),
        eval_images=eval_split[0],
        eval_labels=eval_split[1],
    )
    net.key, net.url = key, url
    net.info["dataset"] = data_url
    write_bytes(url, save_feature_net(net), storage, content_type="application/octet-stream")
    net.info["cached"] = False
    log(
        f"feature net: held-out accuracy {net.info.get('eval_accuracy', float('nan')):.4f} "
        f"({net.info['train_seconds']} s); cached at {url}"
    )
    return net


# ------------------------------------------------------------------------------------------------
# An evaluation's quality figures


def quality_metrics(
    images: np.ndarray, data_url: str, storage: Any = None, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Frechet distance of ``images`` (uint8 NHWC, may be a memmap) to the eval split, and the real floor.

    Floor: the same distance between real images and the eval split: the first images of the
    *train* split (its samples are shuffled when written), as many as were generated (at most the
    whole split). Same reference, same sample size as the generated set. Also reported: two
    disjoint halves of the eval split (smaller samples, so higher).
    """

    t0 = time.perf_counter()
    size = {"image_size": images.shape[1], "channels": images.shape[3]}  # an indexed dataset's are the model's
    ev = load_split_arrays(data_url, storage, "eval", **size)
    if ev.images.shape[1:] != images.shape[1:]:
        raise DataError(
            f"the eval split at {data_url} holds {ev.images.shape[1:]} images (HWC) but the model makes "
            f"{images.shape[1:]}: not the run's dataset?"
        )
    if len(ev.images) < 4:
        raise DataError(f"the eval split at {data_url} has {len(ev.images)} images: too few for a Frechet distance")
    # Reads the train split only if the feature net has to be trained (it is cached after that).
    net = load_or_train_feature_net(data_url, storage, eval_split=(ev.images, ev.labels), log=log, **size)
    tr = load_split_arrays(data_url, storage, "train", limit=len(images), **size)
    name = net.name
    f_eval = net.features(ev.images)
    stats_eval = gaussian_stats(f_eval)
    fd = frechet_distance(*gaussian_stats(net.features(images)), *stats_eval)
    floor = frechet_distance(*gaussian_stats(net.features(tr.images)), *stats_eval)
    perm = np.random.default_rng(1).permutation(len(f_eval))
    half = len(perm) // 2
    floor_halves = frechet_distance_features(f_eval[perm[:half]], f_eval[perm[half : 2 * half]])
    return {
        "feature_space": name,
        f"fd_{name}": fd,
        f"fd_{name}_floor": floor,
        f"fd_{name}_floor_eval_halves": floor_halves,
        f"{name}_eval_accuracy": net.info.get("eval_accuracy"),
        "reference": f"{data_url} eval split ({len(ev.images)} images)",
        "floor": f"the first {len(tr.images)} train images vs the eval split",
        "floor_eval_halves": f"two disjoint halves of the eval split ({half} images each)",
        "generated_images": len(images),
        "feature_net": {"name": name, "key": net.key, "url": net.url, "config": net.config.to_dict(), **net.info},
        "seconds": round(time.perf_counter() - t0, 2),
    }
