"""Where a kernel's result goes: into its destination region, adopted as a fresh image's
storage, or written there directly by a fast engine (no result copy)."""
from __future__ import annotations

import torch

from ..core.kernel import Region
from ..images import formats as fm
from ..images.image import MPSImage, MPSTemporaryImage

__all__ = ["direct_out", "result_dtype", "write_result"]


def write_result(dest: MPSImage, region: Region, values: torch.Tensor) -> None:
    """Store ``values`` into ``dest``'s region, rounded once to the destination's format; when
    the region is all of a fresh image that mpsnn owns, adopt the tensor (converted to the
    storage dtype first where it differs) as its storage instead of copying (zero-copy
    results). Nothing to do when ``values`` already is the destination's region (written in
    place)."""
    if dest.is_allocated:
        view = dest.tensor[region.index()]
        if values.data_ptr() == view.data_ptr() and values.shape == view.shape and values.stride() == view.stride():
            return
    if (region.covers(dest) and dest.parent is None and not dest._wrapped and dest._storage is None
            and values.is_contiguous() and values.shape == dest.shape
            and dest.feature_channel_format not in fm.UNORM_MAX and values.device == dest.device.torch_device):
        if values.dtype != dest.dtype:
            values = values.to(dest.dtype)
        dest._storage = values
        if isinstance(dest, MPSTemporaryImage):
            dest._flat = values.view(-1)
        return
    dest.store(values, region.index())


def result_dtype(dest: MPSImage) -> torch.dtype | None:
    """The dtype a fast engine may write the result in: the destination's (one rounding, no
    conversion pass), unless the destination stores unorm values (quantised on store) or is
    float64 (computed by the torch path)."""
    return None if dest.feature_channel_format in fm.UNORM_MAX or dest.dtype == torch.float64 else dest.dtype


def direct_out(dest: MPSImage, region: Region, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The destination region as a tensor a fast engine may write the result into directly:
    an allocated destination whose :func:`result_dtype` is not None (and whose region has
    ``shape`` where given). Engines that cannot use it ignore it."""
    if not dest.is_allocated or result_dtype(dest) is None:
        return None
    view = dest.tensor[region.index()]
    return view if shape is None or tuple(view.shape) == tuple(shape) else None
