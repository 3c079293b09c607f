"""What the server puts after the pooled backbone features: MocoSFL's projection heads (per --moco_version) and
SwAV's projection with prototypes."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from functions.core.errors import UserError
from models.layers import L2Normalize
from models.split import Head

# Bounds of the head and queue sizes (--K_dim, --feat_dim, --hidden_mlp, --nmb_prototypes; --K, --queue_length): far
# above any published setting (2048 dimensions, 65536 keys), low enough that a typo is one line, not an allocator's
# traceback.
MAX_HEAD_DIM = 65536
MAX_QUEUE_KEYS = 2**20


@dataclass(frozen=True)
class MocoVersion:
    """What a MocoSFL --moco_version fixes: the head, the key dimension, the views, the loss and the schedule."""

    mlp: bool
    K_dim: int
    pairloader_option: str
    symmetric: bool
    cos: bool | None          # None: the version leaves --cos alone
    CLR_option: str           # recorded as MocoSFL does; it never changes the training


MOCO_VERSIONS: dict[str, MocoVersion] = {
    "V1": MocoVersion(mlp=False, K_dim=128, pairloader_option="mocov1", symmetric=False, cos=False,
                      CLR_option="multistep"),
    "smallV2": MocoVersion(mlp=True, K_dim=512, pairloader_option="mocov2", symmetric=True, cos=True, CLR_option="cos"),
    "V2": MocoVersion(mlp=True, K_dim=1024, pairloader_option="mocov2", symmetric=True, cos=True, CLR_option="cos"),
    "largeV2": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=True,
                           CLR_option="cos"),
    "largeV2_aggressive": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=None,
                                      CLR_option="aggressive"),
    "largeV2_highmomen": MocoVersion(mlp=True, K_dim=2048, pairloader_option="mocov2", symmetric=True, cos=None,
                                     CLR_option="highmomen"),
}


LARGE_V2_HIDDEN = 4096  # the larger classifier of Zhuang et al. (divergence-aware FSSL), as MocoSFL builds it


def _xavier(module: nn.Module) -> nn.Module:
    """MocoSFL's init of its heads: Xavier-uniform weights, zero biases, on every Linear layer."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight, gain=1.0)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_moco_head(feature_dim: int, moco_version: str = "V2", K_dim: int = 1024, mlp: bool = True,
                    expansion: int = 1) -> Head:
    """MocoSFL's projection heads: without --mlp one Linear layer to K_dim; with it, for largeV2, Linear to 4096,
    BatchNorm, ReLU, Linear to K_dim; for the other V2 versions Linear to K_dim * expansion, ReLU, Linear to
    K_dim (expansion: the architecture's, 4 for bottleneck ResNets). Xavier-initialised, as MocoSFL does."""
    if moco_version not in MOCO_VERSIONS:
        raise UserError(f"--moco_version {moco_version} is not supported; choose one of {', '.join(MOCO_VERSIONS)}")
    if isinstance(K_dim, bool) or not isinstance(K_dim, int) or K_dim <= 0:
        raise UserError(f"--K_dim must be a positive integer, got {K_dim}")
    if not mlp:
        return Head(_xavier(nn.Linear(feature_dim, K_dim)))
    if moco_version == "V1":
        raise UserError("--mlp needs a V2 version (--moco_version smallV2, V2 or largeV2): MocoSFL has no V1 MLP head")
    if moco_version == "largeV2":
        layers = [nn.Linear(feature_dim, LARGE_V2_HIDDEN), nn.BatchNorm1d(LARGE_V2_HIDDEN), nn.ReLU(),
                  nn.Linear(LARGE_V2_HIDDEN, K_dim)]
    else:
        hidden = K_dim * expansion
        layers = [nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, K_dim)]
    return Head(_xavier(nn.Sequential(*layers)))


def build_swav_head(feature_dim: int, hidden_mlp: int = 2048, feat_dim: int = 128, nmb_prototypes: int = 300) -> Head:
    """SwAV's head: projection MLP (linear when hidden_mlp is 0) to an L2-normalised embedding, and prototypes."""
    for name, value in (("feat_dim", feat_dim), ("nmb_prototypes", nmb_prototypes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if isinstance(hidden_mlp, bool) or not isinstance(hidden_mlp, int) or hidden_mlp < 0:
        raise UserError(f"--hidden_mlp must be 0 (single linear layer) or a positive integer, got {hidden_mlp}")
    if hidden_mlp == 0:
        projection: nn.Module = nn.Linear(feature_dim, feat_dim)
    else:
        projection = nn.Sequential(nn.Linear(feature_dim, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(),
                                   nn.Linear(hidden_mlp, feat_dim))
    return Head(nn.Sequential(projection, L2Normalize()), nn.Linear(feat_dim, nmb_prototypes, bias=False))
