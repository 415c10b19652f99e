"""vkd: orthogonal-projection knowledge distillation (VkD, CVPR 2024) and the projector study (SRD, AAAI 2024)."""

from . import models  # noqa: F401  (registers the CIFAR models with timm)
from .losses import (
    DISTANCES,
    DKDLoss,
    FitNetLoss,
    KDLoss,
    SRDLoss,
    VkDLoss,
    get_distance,
    logsum,
    mse,
    pool_features,
    smooth_l1,
)
from .normalization import (
    NORMALIZATIONS,
    batch_normalize,
    get_normalization,
    l2_normalize,
    layer_normalize,
    whiten,
)
from .projectors import (
    ORTHOGONAL_METHODS,
    PROJECTORS,
    EnsembleProjector,
    LinearProjector,
    MLPProjector,
    OrthogonalProjector,
    build_projector,
    random_orthonormal,
    retract_,
)

__version__ = "0.1.0"
