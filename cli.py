"""pathdistill command line: parses arguments and calls the stages. No logic lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from pipeline.config import load_config
from pipeline.console import console
from pipeline.errors import PathdistillError
from pipeline.submit import KubernetesStage, RayStage


class ReportErrors(TyperGroup):
    """Every command runs inside this group's invoke, so `python cli.py`, the `pathdistill` script and
    CliRunner alike turn a PathdistillError into one line `error: MESSAGE` on stderr and exit code 2.
    Any other exception is a bug: it propagates with its traceback."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PathdistillError as error:
            # Raised in a Ray task, the error arrives as RayTaskError(ItsClass), whose str is the remote traceback.
            message = str(getattr(error, "cause", error))
            console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=ReportErrors, add_completion=False, no_args_is_help=True,
    help="Distil pathology foundation models into small nested-embedding students.",
)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="run configuration (YAML); default: configs/demo.yaml")]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="run directory (overrides 'run' in the config)")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: start a local Ray)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


@app.command("demo-data")
def demo_data(dest: Annotated[Path, typer.Option(help="where to put the demo slides")] = Path("data/demo")) -> None:
    """Put the embedded demo slides under data/demo/ (a real H&E SVS and generated pyramidal TIFFs)."""
    from pipeline.demo.slides import make_demo_slides

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
    from pipeline.tiles.stage import print_summary, run_tiles

    settings = load_config(config, {
        "run": out, "slides": _paths(slides), "ray.address": address,
        "tiling.target_mpp": target_mpp, "tiling.tile_px": tile_px,
    })
    summary = run_tiles(settings, overwrite=overwrite)
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
    from pipeline.features.stage import print_summary, run_features

    settings = load_config(config, {"run": out, "ray.address": address})
    summary = run_features(settings, teachers.split(",") if teachers else None, overwrite=overwrite)
    if as_json:
        print(json.dumps(summary.as_record(), indent=2))
    else:
        print_summary(summary)


@app.command()
def distill(
    config: ConfigOption = None,
    out: OutOption = None,
    resume: Annotated[bool, typer.Option(help="continue exactly from the newest checkpoint in RUN/student/checkpoints")] = False,
    resume_with_changes: Annotated[bool, typer.Option(
        help="--resume, accepting settings that differ from the checkpoint's (lr, batch size, ...; recorded in the settings history)",
    )] = False,
    steps: Annotated[Optional[int], typer.Option(help="training steps (overrides distill.steps)")] = None,
    runs: Annotated[Optional[list[Path]], typer.Option(
        "--runs", help="a run whose tile and feature stores join the training set; repeat for several (overrides distill.runs; default: the run itself)",
    )] = None,
    as_json: JsonOption = False,
) -> None:
    """Tile + feature stores (of RUN, or of every --runs) -> RUN/student/ (nested-embedding student; runs under torchrun for several GPUs)."""
    from distill.train_log import print_summary
    from distill.train import run_distill

    settings = load_config(config, {"run": out, "distill.steps": steps, "distill.runs": _paths(runs)})
    summary = run_distill(settings, resume=resume or resume_with_changes, accept_changes=resume_with_changes)
    if not summary:  # ranks other than 0 under torchrun
        return
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)


@app.command()
def embed(
    student: Annotated[Path, typer.Option(help="exported student directory (RUN/student)")],
    tiles_store: Annotated[Path, typer.Option("--tiles", help="tile store to embed")],
    out_store: Annotated[Path, typer.Option("--out", help="feature store to write (schema pathdistill.features/2)")],
    dim: Annotated[int, typer.Option(help="nested embedding width to keep")],
) -> None:
    """Student embeddings at one nested width for a tile store, into a feature store."""
    from distill.embed import embed_tile_store

    summary = embed_tile_store(student, tiles_store, out_store, dim)
    console.print(f"{out_store}: {summary.rows_done} rows embedded, {summary.units_run}/{summary.units_total} units run")


@app.command()
def evaluate(
    config: ConfigOption = None,
    out: OutOption = None,
    student: Annotated[Optional[Path], typer.Option(help="exported student directory (default: RUN/student)")] = None,
    runs: Annotated[Optional[list[Path]], typer.Option(
        "--runs", help="a run the student was trained on, for its held-out fidelity; repeat for several (overrides distill.runs; default: the runs student.json records)",
    )] = None,
    as_json: JsonOption = False,
) -> None:
    """Student (every nested dim) and teachers on labelled tiles -> RUN/evaluate/ (JSON, table, plots)."""
    from distill.evaluate.run import print_summary, run_evaluate

    settings = load_config(config, {"run": out, "evaluate.student": str(student) if student else None, "distill.runs": _paths(runs)})
    result = run_evaluate(settings)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result)


@app.command("teachers")
def list_teachers(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="also list the teachers this config defines (features.teacher_specs)")] = None,
    as_json: JsonOption = False,
) -> None:
    """The teacher registry and the config's own teachers: name, library, parameters, widths, published scale (tile px at mpp), source."""
    from pipeline.console import results, table
    from pipeline.teacher_specs import parse_teacher_specs, spec_origin
    from pipeline.teachers import describe_teachers

    specs = load_config(config).features.teacher_specs if config else None
    entries = describe_teachers(parse_teacher_specs(specs), spec_origin(specs))
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    results.print(table("teachers", ["name", "loader", "params", "widths", "published tile", "source", "defined in"], [
        [
            e["name"] + (" (stand-in)" if e["stand_in"] else ""), e["loader"], f"{e['params'] / 1e6:.1f}M",
            ", ".join(f"{r} {w}" for r, w in e["widths"].items()), f"{e['field_px']} px at {e['mpp']} um/px", e["source"], e["defined_in"],
        ]
        for e in entries
    ]))
    results.print("recipes read from:")
    for e in entries:
        if e["cites"]:
            results.print(f"  {e['name']}: " + " ".join(e["cites"]), soft_wrap=True)


@app.command("inspect-store")
def inspect_store(
    path: Annotated[Path, typer.Argument(help="a tiles.zarr or features/<teacher>.zarr store")],
    as_json: JsonOption = False,
    verify: Annotated[bool, typer.Option("--verify", help="read every chunk: completeness, checksums, NaN/Inf")] = False,
) -> None:
    """Human summary of a store (read-only)."""
    from pipeline.inspect_store import describe_store, print_description

    description = describe_store(path, verify=verify)
    if as_json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print_description(description)
    if verify and not description["verify"]["ok"]:
        raise typer.Exit(1)


@app.command("forget-units")
def forget_units(
    path: Annotated[Path, typer.Argument(help="a tiles.zarr or features/<teacher>.zarr store")],
    units: Annotated[str, typer.Argument(help="units as an error names them, e.g. 0,4-6")],
) -> None:
    """Count finished units of a store unfinished again (damaged ones, say): a rerun of its stage rewrites them."""
    from pipeline.stores import forget_units as forget, parse_units

    wanted = parse_units(units)
    forgotten = forget(path, wanted)
    console.print(f"{path}: {len(forgotten)} of the {len(wanted)} units given were finished and are now forgotten; rerun the stage that made the store to rewrite them", soft_wrap=True)


submit_app = typer.Typer(no_args_is_help=True, help="Render clusters/ templates for a run and submit them (Slurm or Kubernetes).")
app.add_typer(submit_app, name="submit")
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="print what would be submitted; submit nothing")]


@submit_app.command("slurm")
def submit_slurm(
    stage: Annotated[RayStage, typer.Argument(help="the stage to run on a Ray cluster over the allocation")],
    config: ConfigOption = None,
    nodes: Annotated[int, typer.Option(min=1, help="nodes (one Ray node each)")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=0, help="GPUs per node")] = 0,
    cpus_per_node: Annotated[Optional[int], typer.Option(min=1, help="CPUs per node (default: whole nodes)")] = None,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition")] = None,
    time: Annotated[Optional[str], typer.Option(help="time limit, e.g. 12:00:00")] = None,
    python: Annotated[Optional[Path], typer.Option(help="interpreter on the nodes (default: this one)")] = None,
    dry_run: DryRunOption = False,
) -> None:
    """Render clusters/slurm/ray-stage.sbatch into RUN/slurm/STAGE.sbatch and sbatch it (resubmit it to resume)."""
    from pipeline.submit import SlurmOptions, render_sbatch, submit_slurm as submit

    options = SlurmOptions(**_given(
        stage=stage, config=config, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node,
        partition=partition, time=time, python=python,
    ))
    if dry_run:
        print(render_sbatch(options), end="")
        return
    job_id, script = submit(options)
    console.print(f"submitted Slurm job {job_id}: {script}")


@submit_app.command("k8s")
def submit_k8s(
    stage: Annotated[KubernetesStage, typer.Argument(help="tiles or features (a RayJob), distill (a Job on one GPU node)")],
    image: Annotated[str, typer.Option(help="image built from clusters/Dockerfile")],
    pvc: Annotated[str, typer.Option(help="ReadWriteMany PersistentVolumeClaim holding slides and runs")],
    config: ConfigOption = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray worker pods")] = 1,
    gpus_per_worker: Annotated[Optional[int], typer.Option(min=0, help="GPUs per worker pod (default: the manifest's)")] = None,
    dry_run: DryRunOption = False,
) -> None:
    """Render clusters/k8s/ for a run (a ConfigMap with the config + the RayJob or Job) and kubectl apply it."""
    from pipeline.submit import KubernetesOptions, render_kubernetes, submit_kubernetes

    options = KubernetesOptions(**_given(
        stage=stage, config=config, image=image, pvc=pvc, workers=workers, gpus_per_worker=gpus_per_worker,
    ))
    print(render_kubernetes(options) if dry_run else submit_kubernetes(options), end="")


def _paths(paths: list[Path] | None) -> list[str] | None:
    """Paths as a config override; none given leaves the config's value."""
    return [str(path) for path in paths] if paths else None


def _given(**values):
    """Options the user set; the rest keep the defaults of the options model."""
    return {key: value for key, value in values.items() if value is not None}


if __name__ == "__main__":
    app()
