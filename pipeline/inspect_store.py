"""``inspect-store``: what a store holds, how it is laid out, and whether it is complete and intact.

Opens stores read-only (Zarr's read-only mode), so looking can never change what is on disk.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr
from rich.markup import escape
from zarr.codecs import BytesCodec

from pipeline.console import progress_bar, results, table
from pipeline.effective_rank import SHARE, effective_rank
from pipeline.stores import FLAG_PADDED, FLAG_READ_FAILED, GRID, FeatureStoreAttrs, RunDir, Store, StoreError, open_store, open_tile_store
from pipeline.tile_codec import JpegTileCodec


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def describe_array(array: zarr.Array, path: Path) -> dict:
    stored = directory_bytes(path / array.basename)
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "shards": list(array.shards) if array.shards else None,
        "codecs": [codec_name(codec) for codec in (*([] if isinstance(array.serializer, BytesCodec) else [array.serializer]), *array.compressors)],
        "bytes": int(array.nbytes),
        "stored_bytes": stored,
        "stored_bytes_per_row": round(stored / array.shape[0], 1) if array.shape[0] else None,
        "compression_ratio": round(array.nbytes / stored, 2) if stored else None,
    }


def codec_name(codec: object) -> str:
    """Short codec names for tables: ``blosc-zstd-1``, ``jpeg-q90-4:4:4``, ``crc32c``."""
    if hasattr(codec, "cname"):
        return f"blosc-{codec.cname.value}-{codec.clevel}"
    if isinstance(codec, JpegTileCodec):
        return f"jpeg-q{codec.quality}-{codec.subsampling}"
    return type(codec).__name__.removesuffix("Codec").lower()


def tiles_on_disk(path: Path) -> str:
    """One line on how a tile store's tiles are stored: codec and bytes per tile against raw pixels."""
    store = open_tile_store(path)
    tiles, settings = store["tiles"], store.attrs.tiling.store
    codec = f"JPEG q{settings['jpeg_quality']} {settings['jpeg_subsampling']}" if settings["tile_codec"] == "jpeg" else f"lossless blosc-{settings['codec']}-{settings['clevel']}"
    stored = directory_bytes(Path(path) / tiles.basename)
    return f"tiles stored as {codec}: {stored / max(1, tiles.shape[0]) / 1024:.1f} KiB per tile ({tiles.nbytes / max(1, stored):.1f}x smaller than raw pixels)"


def grid_cost(array: zarr.Array) -> dict:
    """What a feature store's ``grid`` array [N, V, k*k, C] costs per tile: float16 raw and as stored."""
    rows, views, cells, width = array.shape
    stored = directory_bytes(Path(array.store_path.store.root) / array.path)
    return {
        "k": math.isqrt(cells), "views": views, "width": width,
        "raw_bytes_per_view": cells * width * array.dtype.itemsize,
        "raw_bytes_per_tile": views * cells * width * array.dtype.itemsize,
        "stored_bytes_per_tile": round(stored / rows, 1) if rows else None,
    }


def describe_grid_cost(cost: dict) -> str:
    """``grid 4 x 4 cells of 1280 features, 1 view: 40.0 KiB per tile raw (40.0 KiB a view), 37.2 KiB stored``."""
    stored = "-" if cost["stored_bytes_per_tile"] is None else f"{cost['stored_bytes_per_tile'] / 1024:.1f} KiB"
    return (
        f"grid {cost['k']} x {cost['k']} cells of {cost['width']} features, {cost['views']} view{'s' if cost['views'] > 1 else ''}: "
        f"{cost['raw_bytes_per_tile'] / 1024:.1f} KiB per tile raw ({cost['raw_bytes_per_view'] / 1024:.1f} KiB a view), {stored} stored"
    )


def describe_store(path: Path, verify: bool = False) -> dict:
    """A JSON-able description of any pathdistill store; with ``verify``, reads every chunk."""
    path = Path(path)
    store = open_store(path)
    attrs = store.attrs
    arrays = {name: store[name] for name in store.array_names()}
    n_rows = attrs.n_rows
    description = {
        "path": str(path),
        "schema": attrs.SCHEMA,
        "store_id": attrs.store_id,
        "n_rows": n_rows,
        "created": attrs.created,
        "versions": attrs.versions,
        "arrays": {name: describe_array(array, path) for name, array in arrays.items()},
        "stored_bytes": directory_bytes(path),
    }
    description["compression_ratio"] = round(sum(a["bytes"] for a in description["arrays"].values()) / description["stored_bytes"], 2)
    units = len(store.units())
    description["units"] = {"total": units, "marked_done": units - len(store.missing_units())}
    if isinstance(attrs, FeatureStoreAttrs):
        description.update(teacher=attrs.teacher, views=attrs.views, recipes=attrs.recipes, grid=grid_cost(arrays[GRID]) if attrs.grid else None)
        description["tile_store"] = tile_store_link(path, attrs)
        description["statistics"] = {name: feature_statistics(array, path, verify) for name, array in arrays.items()}
    else:
        description["tiling"] = attrs.tiling.to_dict()
        description["tiles_on_disk"] = tiles_on_disk(path)
        description["slides"] = [slide.to_dict() for slide in attrs.slides]
    if verify:
        description["verify"] = verify_store(store)
    return description


def tile_store_link(path: Path, attrs: FeatureStoreAttrs) -> dict:
    """Whether the tile store beside ``features/`` is the one these features were computed from."""
    tiles_path = RunDir.of_feature_store(path).tiles
    link = {"path": str(tiles_path), "expected_id": attrs.tile_store_id}
    try:
        tiles = open_tile_store(tiles_path)
    except StoreError as error:
        return {**link, "status": f"not found: {error}"}
    matches = tiles.attrs.store_id == attrs.tile_store_id and tiles.attrs.n_rows == attrs.n_rows
    return {**link, "status": "matches" if matches else f"does not match (its id is {tiles.attrs.store_id})"}


def feature_statistics(array: zarr.Array, path: Path, verify: bool, sample_rows: int = 4096) -> dict:
    """Mean L2 norm, per-dimension spread and effective rank (pipeline/effective_rank.py) of the embeddings,
    rows x views flattened (a grid's: its cells), over evenly spaced whole chunks of about ``sample_rows``
    rows (a grid's: rows / k^2, the same count of vectors); or, when a sampled chunk fails its checksum,
    why they are unreadable (the rest is still described)."""
    step = array.chunks[0]
    starts = range(0, array.shape[0], step)
    rows = max(1, sample_rows // math.prod(array.shape[2:-1]))
    chosen = list(starts)[:: max(1, len(starts) * step // rows)]
    try:
        sample = np.concatenate([array[start : start + step] for start in chosen]).astype(np.float32).reshape(-1, array.shape[-1])
    except (ValueError, OSError) as error:  # a checksum (ValueError) or an I/O error of a sampled chunk
        where = "the corrupt chunks are listed under verify" if verify else f"run `inspect-store --verify {path}` to list the corrupt chunks"
        return {"unreadable": f"{type(error).__name__}: {error}; {where}"}
    finite = sample[np.isfinite(sample).all(axis=1)]
    return {
        "rows_sampled": int(len(sample) // max(1, math.prod(array.shape[1:-1]))),
        "mean_norm": round(float(np.linalg.norm(finite, axis=1).mean()), 4) if len(finite) else None,
        "mean_dim_std": round(float(finite.std(axis=0).mean()), 4) if len(finite) else None,
        "effective_rank": effective_rank(finite) if len(finite) else None,
        "embeddings_sampled": len(finite),
    }


def verify_store(store: Store) -> dict:
    """Every stored object on disk (missing ones listed with their unit, and whether that unit is
    marked finished), then every chunk read: checksum failures, non-finite values and flagged tiles."""
    arrays = {name: store[name] for name in store.array_names()}
    n_rows = store.attrs.n_rows
    finished = store.markers().done()
    missing = [{**entry, "finished": entry["unit"] in finished} for entry in store.missing_objects()]
    lost = {(entry["array"], entry["rows"][0]) for entry in missing}
    report: dict = {"missing_chunks": missing, "corrupt_chunks": [], "non_finite": {}, "ok": True}
    if "flags" in arrays:
        report.update(read_failed_tiles=0, padded_tiles=0)
    with progress_bar() as progress:
        task = progress.add_task("verifying", total=sum(a.nchunks for a in arrays.values()), rate="")
        for name, array in arrays.items():
            object_rows = (array.shards or array.chunks)[0]  # rows per stored object: a shard, or an unsharded chunk
            step = array.chunks[0]
            non_finite = 0
            for start in range(0, n_rows, step):
                progress.advance(task)
                rows = [start, min(n_rows, start + step)]
                if (name, start - start % object_rows) in lost:
                    continue  # reads as the fill value; listed as missing above
                try:
                    block = array[start : start + step]
                except Exception as error:  # noqa: BLE001 - a checksum or codec failure names the chunk
                    report["corrupt_chunks"].append({"array": name, "rows": rows, "error": str(error)})
                    continue
                if np.issubdtype(block.dtype, np.floating):
                    non_finite += int(np.count_nonzero(~np.isfinite(block)))
                if name == "flags":
                    report["read_failed_tiles"] += int(np.count_nonzero(block & FLAG_READ_FAILED))
                    report["padded_tiles"] += int(np.count_nonzero(block & FLAG_PADDED))
            if np.issubdtype(array.dtype, np.floating):
                report["non_finite"][name] = non_finite
    report["ok"] = not report["missing_chunks"] and not report["corrupt_chunks"] and not any(report["non_finite"].values())
    return report


def print_description(description: dict) -> None:
    out = results
    out.print(f"[bold]{description['path']}[/bold]  schema {description['schema']}  id {description['store_id']}")
    out.print(f"rows {description['n_rows']}  created {description['created']}  on disk {description['stored_bytes'] / 2**20:.1f} MiB  compression x{description['compression_ratio']}")
    if "tiling" in description:
        t = description["tiling"]
        out.print(f"tiling: {t['tile_px']} px at {t['target_mpp']} um/px, overlap {t['overlap_px']}, context {t['context_px']}, tolerance {t['mpp_tolerance']}, tissue >= {t['tissue']['min_fraction']} (mask at {t['tissue']['mask_mpp']} um/px)")
        out.print(description["tiles_on_disk"])
        out.print(table("slides", ["id", "name", "mpp (source)", "dimensions", "read", "rows", "status"], [
            [
                str(s["id"]), s["name"], f"{s['mpp']:.4f} ({s['mpp_source']})" if s.get("mpp") else "-",
                "x".join(map(str, s.get("dimensions", []))) or "-", describe_read(s.get("read")),
                f"{s['rows'][0]}-{s['rows'][1]}", "ok" if s["status"] == "ok" else f"[red]{s['error']}[/red]",
            ]
            for s in description["slides"]
        ]))
    if "teacher" in description:
        # A registry teacher's record has every field; a student's (embed) or a test's has fewer.
        teacher = {key: "-" for key in ("arch", "source", "weights_sha256", "input_px", "resize", "mean", "std", "precision", "target_mpp")} | description["teacher"]
        stand_in = " [yellow](stand-in, not a pathology model)[/yellow]" if teacher.get("stand_in") else ""
        out.print(f"teacher: {teacher['name']}{stand_in}  {teacher['arch']}  source {teacher['source']}  weights sha256 {teacher['weights_sha256'][:16]}")
        out.print(f"  input {teacher['input_px']} px ({teacher['resize']}), mean {teacher['mean']}, std {teacher['std']}, precision {teacher['precision']}, target mpp {teacher['target_mpp']}")
        if "input" in teacher:  # how the features stage cut its input (pipeline/teacher_input.py)
            given = teacher["input"]
            scale = "[red]off its published scale (features.off_scale)[/red]" if given["off_scale"] else "its published scale"
            out.print(f"  given {given['field_px']} px fields at {given['store_mpp']} um/px from {given['stored_px']} px stored tiles; published at {given['published_mpp']} um/px: {scale}", soft_wrap=True)
        out.print("views: " + ", ".join(describe_view(view) for view in description["views"]))
        out.print(f"tile store: {description['tile_store']['path']} {description['tile_store']['status']}")
        widths = dict(description["recipes"])
        if description["grid"]:
            grid = description["grid"]
            widths[GRID] = f"{grid['k']}x{grid['k']} cells x {grid['width']}"
            out.print(describe_grid_cost(grid))
        out.print(table("recipes", ["recipe", "width", "mean norm", "mean per-dim std", f"rank at {SHARE:.0%} variance", "rows sampled"], [
            [name, str(widths[name]), *(
                ["[red]unreadable[/red]", "-", "-", "-"] if "unreadable" in stats else
                [str(stats["mean_norm"]), str(stats["mean_dim_std"]), str(stats["effective_rank"]), f"{stats['rows_sampled']} ({stats['embeddings_sampled']} embeddings: rows x views)"]
            )]
            for name, stats in description["statistics"].items()
        ]))
        for name, stats in description["statistics"].items():
            if "unreadable" in stats:
                out.print(f"[red]statistics of {name!r} unreadable[/red]: {escape(stats['unreadable'])}", soft_wrap=True)
    out.print(f"units: {description['units']['marked_done']}/{description['units']['total']} marked done")
    out.print(table("arrays", ["array", "shape", "dtype", "chunks", "shards", "codecs", "stored MiB", "KiB/row", "ratio"], [
        [name, str(a["shape"]), a["dtype"], str(a["chunks"]), str(a["shards"]), ", ".join(a["codecs"]), f"{a['stored_bytes'] / 2**20:.2f}", f"{(a['stored_bytes_per_row'] or 0) / 1024:.2f}", str(a["compression_ratio"])]
        for name, a in description["arrays"].items()
    ]))
    if "verify" in description:
        v = description["verify"]
        verdict = "[green]ok[/green]" if v["ok"] else "[red]FAILED[/red]"
        missing = v["missing_chunks"]
        out.print(
            f"verify: {verdict}; missing stored objects {len(missing)} ({sum(m['finished'] for m in missing)} in units marked finished), "
            f"corrupt chunks {len(v['corrupt_chunks'])}, non-finite {sum(v['non_finite'].values())}, "
            f"blank after read errors {v.get('read_failed_tiles', 0)}, padded {v.get('padded_tiles', 0)}"
        )
        for m in missing[:10]:
            state = "marked finished" if m["finished"] else "unfinished"
            out.print(f"  missing: array {m['array']!r} rows {m['rows']} (unit {m['unit']}, {state}): {m['file']}", soft_wrap=True, markup=False)
        for c in v["corrupt_chunks"][:10]:
            out.print(f"  corrupt: array {c['array']!r} rows {c['rows']}: {c['error']}", soft_wrap=True, markup=False)


def describe_view(view: dict) -> str:
    return f"crop({view['dx']},{view['dy']})" if view["name"] == "crop" else view["name"]


def describe_read(read: dict | None) -> str:
    """``level 1 (x2.00), 448 -> 224 px`` for a slide's read plan."""
    if not read:
        return "-"
    resize = f"{read['read_px']} -> {read['tile_px']} px" if read["resized"] else f"{read['tile_px']} px"
    return f"level {read['level']} (x{read['level_downsample']:.2f}), {resize}"
