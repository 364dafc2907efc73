"""Which stored pixels each teacher is given: its published field of view at its published mpp.

A teacher was published with a transform (resize, centre crop; ``TeacherSpec``) applied to tiles of
``field_px`` pixels at ``target_mpp``. A tile store holds squares of ``stored_px = tile_px + 2 *
context_px`` pixels at ``tiling.target_mpp``, each centred on its tile. The rule, checked for every
teacher before any model is built:

1. Scale: the store's mpp is the teacher's, within ``tiling.mpp_tolerance``. Otherwise the run is
   refused, unless the teacher is named in ``features.off_scale``: then it is given its published
   pixels at the store's mpp (another magnification), and the feature store's provenance says so.
2. Field: the teacher is given the ``field_px`` square centred on each view's tile (a crop view moves
   it with the tile, a dihedral view turns it), cut from the stored pixels by ``apply_view``, and then
   its published transform. That is pixel for pixel the published transform of a ``field_px`` tile
   read at the teacher's scale. A field larger than the tile needs a context margin that holds it for
   every view; a smaller one is the centre of the tile. The field is centred exactly, so its side and
   the stored side must differ by an even number of pixels.

Prov-GigaPath (256 px at 0.5 um/px, centre-cropped to 224) on 224 px tiles therefore needs
``tiling.context_px`` 16: the 256 px field is the tile and its 16 px margin, and the model sees the
central 224 px, the student's tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pipeline.errors import PathdistillError
from pipeline.geometry import same_mpp
from pipeline.stores import Tiling
from pipeline.teachers import TeacherSpec


class TeacherScaleError(PathdistillError, ValueError):
    """A teacher would be given another scale or field of view than it was published with."""


@dataclass(frozen=True)
class TeacherInput:
    """How one teacher's input is cut from a tile store; recorded as ``input`` in its provenance."""

    field_px: int  # side of the square cut around each view's tile, at the store's mpp
    published_mpp: float
    store_mpp: float
    stored_px: int
    off_scale: bool  # the store's mpp is not the published one (allowed by features.off_scale)

    def as_record(self) -> dict:
        return asdict(self)


def plan_teacher_inputs(
    specs: Sequence[TeacherSpec], tiling: Tiling, views: list[dict], off_scale: Sequence[str] = (),
) -> dict[str, TeacherInput]:
    """Each teacher's input on this tile store, or one error listing every teacher that does not fit and the fix."""
    plans, problems = {}, []
    for spec in specs:
        try:
            plans[spec.name] = plan_teacher_input(spec, tiling, views, spec.name in off_scale)
        except TeacherScaleError as error:
            problems.append(str(error))
    if problems:
        raise TeacherScaleError("the tile store does not hold what these teachers were published with:\n  - " + "\n  - ".join(problems))
    return plans


def plan_teacher_input(spec: TeacherSpec, tiling: Tiling, views: list[dict], off_scale: bool = False) -> TeacherInput:
    """The rule of this module for one teacher, or TeacherScaleError naming both scales and each fix."""
    field, tile, stored = spec.field_px, tiling.tile_px, tiling.stored_px
    on_scale = same_mpp(tiling.target_mpp, spec.target_mpp, tiling.mpp_tolerance)
    problems = []
    if not on_scale and not off_scale:
        problems.append(
            f"it was published at {spec.target_mpp} um/px, the tile store holds {tiling.target_mpp} um/px: tile at "
            f"tiling.target_mpp: {spec.target_mpp}, or run it off its published scale with features.off_scale: [{spec.name}]"
        )
    offset = max((max(abs(view["dx"]), abs(view["dy"])) for view in views if view["name"] == "crop"), default=0)
    centred_tile = tile + (stored - field) % 2  # a tile side on which the field is centred exactly
    if centred_tile != tile:
        problems.append(
            f"its {field} px field cannot be centred on {tile} px tiles (the sides differ by an odd number of pixels): "
            f"use tiling.tile_px: {centred_tile}"
        )
    needed = (field - centred_tile) // 2 + offset  # the margin that holds the field around every view's tile
    if tiling.context_px < needed:
        moved = f" and crop views move it by up to {offset} px" if offset else ""
        problems.append(
            f"it takes a {field} px field centred on each {centred_tile} px tile{moved}, the tile store holds {stored} px "
            f"(tiling.tile_px {tile} + 2 x tiling.context_px {tiling.context_px}): set tiling.context_px: {needed}"
        )
    if problems:
        raise TeacherScaleError(
            f"teacher {spec.name!r} ({field} px tiles at {spec.target_mpp} um/px): " + "; ".join(problems)
            + ". A changed tiling means rerunning tiles (in another run directory, or with --overwrite)"
        )
    return TeacherInput(field_px=field, published_mpp=spec.target_mpp, store_mpp=tiling.target_mpp, stored_px=stored, off_scale=not on_scale)
