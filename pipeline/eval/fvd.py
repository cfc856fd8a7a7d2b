"""FVD: the Fréchet distance between I3D features of generated and real videos.

The network is the standard Kinetics-400 Inception-I3D used by FVD implementations in PyTorch (the
architecture of cd-fvd's `InceptionI3d`, which matches the widely used `i3d_pretrained_400.pt`
weights); we take the network definition from the cd-fvd package and nothing else: the weights come
from a local file the user gives (safetensors, or a PyTorch state dict read with weights_only=True;
nothing is downloaded), and feature statistics, the distance and the caching are ours so they can be
summed across ranks and cached with a fingerprint.

Features (the usual FVD definition): each frame is resized to `resolution` x `resolution` (bilinear;
224 is the standard), values in [-1, 1] on 8-bit levels, and the 400 Kinetics logits of the network,
averaged over time, are the video's feature. For 224 this is exactly `InceptionI3d.forward`; other
sizes pool the last feature map globally in space (the network's fixed 7x7 pool only fits 224).

Statistics are float64 sums (count, sum of features, sum of outer products): a rank's share and a
cached file add up exactly, so any number of processes gives the same mean and covariance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.encode.fingerprint import hash_state_dict
from pipeline.eval.clip_score import quantize

FEATURE_DIM = 400
STANDARD_RESOLUTION = 224


def build_i3d() -> torch.nn.Module:
    """A Kinetics-400 Inception-I3D with random weights (load a state dict into it)."""
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    return InceptionI3d(num_classes=FEATURE_DIM, in_channels=3)


def load_i3d(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The I3D network with the weights of `path` (.safetensors, or .pt/.pth state dict read weights-only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights {path}: no such file; give the Kinetics-400 I3D state dict "
                                "(e.g. i3d_pretrained_400.pt) with --i3d")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise many types
        raise ValueError(f"I3D weights {path}: cannot be read as a state dict ({type(err).__name__}: {err}); "
                         "give a .safetensors file or a PyTorch state dict (.pt) of InceptionI3d") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = build_i3d()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshapen:
        raise ValueError(f"I3D weights {path} do not fit the Kinetics-400 InceptionI3d: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, misshapen {misshapen[:3]} (of {len(expected)} tensors)")
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def save_i3d(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the network's weights as safetensors (tests save random-weight networks this way)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def network_fingerprint(model: torch.nn.Module) -> str:
    return hash_state_dict(model)


def i3d_input(videos: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 3, T, r, r) on 8-bit levels, frames resized bilinearly."""
    b, c, t, h, w = videos.shape
    frames = quantize(videos.float()).transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
    frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return frames.reshape(b, t, c, resolution, resolution).transpose(1, 2).contiguous()  # (B, 3, T, r, r)


@torch.no_grad()
def i3d_features(model: torch.nn.Module, videos: torch.Tensor, *, resolution: int = STANDARD_RESOLUTION) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 400) float64 features on the CPU."""
    device = next(model.parameters()).device
    x = i3d_input(videos, resolution).to(device)
    pre = model.extract_pre_pool_features(x)  # (B, 1024, T', h, w)
    # The network's AvgPool3d([2, 7, 7], stride 1): a 2-frame window (1 when T' is 1), the whole 7x7 map.
    pooled = F.avg_pool3d(pre, kernel_size=(min(2, pre.shape[2]), pre.shape[3], pre.shape[4]), stride=1)
    logits = model.logits(pooled)  # (B, 400, t, 1, 1)
    return logits.flatten(3).squeeze(3).mean(dim=2).double().cpu()  # (B, 400)


@dataclass
class FeatureStats:
    """Running sums of features: mergeable across ranks and files (float64)."""

    count: int
    total: np.ndarray
    """(D,) sum of features."""
    outer: np.ndarray
    """(D, D) sum of outer products."""

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)  # (N, D)
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def to_tensor(self) -> torch.Tensor:
        """(1 + D + D*D,) float64: count, sums, outer sums (for an all-reduce)."""
        return torch.from_numpy(np.concatenate([[float(self.count)], self.total, self.outer.ravel()]))

    @classmethod
    def from_tensor(cls, flat: torch.Tensor, dim: int = FEATURE_DIM) -> FeatureStats:
        values = flat.double().cpu().numpy()
        return cls(int(round(values[0])), values[1:1 + dim].copy(), values[1 + dim:].reshape(dim, dim).copy())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"FVD needs at least 2 videos on each side, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import scipy.linalg

    mu_a, cov_a = a.mean_cov()
    mu_b, cov_b = b.mean_cov()
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: the usual fix, a small offset on the diagonal
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
    return max(value, 0.0)  # rounding can give -1e-9 for identical sets
