"""pathdistill command line: parses arguments and calls the stages. No logic lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import ConfigError, load_config
from pipeline.progress import console
from pipeline.stores import StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil pathology foundation models into small nested-embedding students.")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="run configuration (YAML); default: configs/demo.yaml")]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="run directory (overrides 'run' in the config)")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: start a local Ray)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


@app.command("demo-data")
def demo_data(dest: Annotated[Path, typer.Option(help="where to put the demo slides")] = Path("data/demo")) -> None:
    """Put the embedded demo slides under data/demo/ (a real H&E SVS and generated pyramidal TIFFs)."""
    from pipeline.demo_data import make_demo_slides

    for path in make_demo_slides(dest):
        console.print(str(path))


@app.command()
def tiles(
    slides: Annotated[Optional[list[Path]], typer.Argument(help="slide files, folders or manifests; replace the config's list")] = None,
    config: ConfigOption = None,
    out: OutOption = None,
    address: AddressOption = None,
    target_mpp: Annotated[Optional[float], typer.Option(help="micrometres per pixel of the tiles")] = None,
    tile_px: Annotated[Optional[int], typer.Option(help="tile side in pixels at the target mpp")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing tile store made from other slides or settings")] = False,
    strict: Annotated[bool, typer.Option(help="exit non-zero if any slide failed")] = False,
    as_json: JsonOption = False,
) -> None:
    """Slides -> RUN/tiles.zarr (resumable: a rerun does only the missing units)."""
    from pipeline.tile_stage import print_summary, run_tiles

    try:
        settings = load_config(config, {
            "run": out, "slides": [str(s) for s in slides] if slides else None, "ray.address": address,
            "tiling.target_mpp": target_mpp, "tiling.tile_px": tile_px,
        })
        summary = run_tiles(settings, overwrite=overwrite)
    except (ConfigError, StoreError, FileNotFoundError) as error:
        fail(error)
    if as_json:
        print(json.dumps(summary.as_record(), indent=2))
    else:
        print_summary(summary)
    if len(summary.failed_slides) == len(summary.slides) or (strict and summary.failed_slides):
        raise typer.Exit(1)


@app.command()
def features(
    config: ConfigOption = None,
    out: OutOption = None,
    address: AddressOption = None,
    teachers: Annotated[Optional[str], typer.Option(help="comma-separated teacher names (default: the config's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace feature stores that are finished or were computed differently")] = False,
    as_json: JsonOption = False,
) -> None:
    """RUN/tiles.zarr + teachers -> RUN/features/<teacher>.zarr (every teacher reads each tile once; resumable)."""
    from pipeline.feature_stage import print_summary, run_features
    from pipeline.teachers import UnknownTeacherError

    try:
        settings = load_config(config, {"run": out, "ray.address": address})
        summary = run_features(settings, teachers.split(",") if teachers else None, overwrite=overwrite)
    except (ConfigError, StoreError, UnknownTeacherError) as error:
        fail(error)
    if as_json:
        print(json.dumps(summary.as_record(), indent=2))
    else:
        print_summary(summary)


@app.command("teachers")
def list_teachers(as_json: JsonOption = False) -> None:
    """The teacher registry: name, parameters, embedding widths, recipes, mpp, source."""
    from pipeline.progress import results, table
    from pipeline.teachers import describe_teachers

    entries = describe_teachers()
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    results.print(table("teachers", ["name", "params", "widths", "mpp", "source"], [
        [
            e["name"] + (" (random stand-in)" if e["stand_in"] else ""), f"{e['params'] / 1e6:.1f}M",
            ", ".join(f"{r} {w}" for r, w in e["widths"].items()), str(e["mpp"]), e["source"],
        ]
        for e in entries
    ]))


@app.command("inspect-store")
def inspect_store(
    path: Annotated[Path, typer.Argument(help="a tiles.zarr or features/<teacher>.zarr store")],
    as_json: JsonOption = False,
    verify: Annotated[bool, typer.Option("--verify", help="read every chunk: completeness, checksums, NaN/Inf")] = False,
) -> None:
    """Human summary of a store (read-only)."""
    from pipeline.inspect_store import describe_store, print_description

    try:
        description = describe_store(path, verify=verify)
    except StoreError as error:
        fail(error)
    if as_json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print_description(description)
    if verify and not description["verify"]["ok"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
