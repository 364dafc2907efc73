"""Distillation end to end on real Zarr stores of real H&E tiles and learnable synthetic teachers: it
learns, records, exports and embeds; a run killed with SIGKILL resumes to bitwise the same weights;
two DDP processes each read and train on their half of every global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import zarr

from distill import load_student
from distill.embed import embed_tile_store
from distill.export import StudentError
from distill.data import Rows
from distill.standardize import Standardizer, fit_standardizer
from distill.student import NestedHeads
from distill.ema import EMA
from distill.train import Distiller, build_student, compile_student, forward_backward, learning_rate, load_optimizer_state, make_optimizer, optimizer_step, run_distill, seed_everything, validate
from distill_run import config_for, make_run, write_config
from pipeline.config import ConfigError, DistillConfig
from pipeline.run_report import read_report
from pipeline.stores import StoreError, open_feature_store, open_tile_store

REPO = Path(__file__).resolve().parent.parent
RUNNER = """
import sys
import torch
torch.set_num_threads(1)
from distill.train import run_distill
from pipeline.config import load_config
run_distill(load_config(sys.argv[1]), resume=sys.argv[2:] == ["resume"])
"""
TRAINING = dict(steps=60, batch_size=16, lr=2e-3, warmup_steps=10, eval_every=20, checkpoint_every=20, loader_workers=2, pool_chunks=4, ema=0.9)


@pytest.fixture
def one_thread():
    """Single-threaded torch, so runs in this process and in subprocesses do the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, he_pixels):
    """One uninterrupted bf16 run of TRAINING, in this process."""
    run_dir = tmp_path_factory.mktemp("trained")
    make_run(run_dir, he_pixels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary = run_distill(config_for(run_dir, **TRAINING))
    torch.set_num_threads(threads)
    return run_dir, summary


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "student" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def runner(tmp_path: Path) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return script


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_training_lowers_the_loss_and_raises_validation_cosine(trained):
    run_dir, summary = trained
    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 20, 40, 60] and evals[0]["rows"] == 83
    for teacher in ("alpha", "beta"):
        for m in ("16", "64", "192"):
            before, after = evals[0]["val"][teacher][m], evals[-1]["val"][teacher][m]
            assert after["cos"] > 0.45 and after["cos"] > before["cos"] + 0.3
            assert after["r2"] > 0.1 > before["r2"]
            assert after["cos_raw"] > before["cos_raw"] and set(evals[-1]["ema"][teacher][m]) == {"cos", "cos_raw", "r2"}
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert summary["final_val"] == evals[-1]["val"] and summary["rows"] == {"train": 297, "val": 83}


def test_the_run_records_split_plots_report_and_stage(trained):
    run_dir, summary = trained
    student_dir = run_dir / "student"
    split = json.loads((student_dir / "split.json").read_text())
    assert [s["name"] for s in split["val"]] == ["slide-3"] and records(run_dir, "split")[0]["val"] == split["val"]
    train = records(run_dir, "train")[-1]
    assert set(train) == {"kind", "step", "loss", "lr", "samples_per_s", "slides", "loss_by_dim", "grad_norm"}
    assert all(1 <= r["slides"] <= 3 for r in records(run_dir, "train"))  # the three training slides
    assert set(train["loss_by_dim"]["beta"]) == {"16", "64", "192"}
    for plot in ("loss.png", "grad_norm.png", "val_cosine.png"):
        assert (student_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    report = (student_dir / "report.md").read_text()
    assert "| alpha | 0." in report and "loader alone" in report and "slide-3" in report
    norms = [r["grad_norm"] for r in records(run_dir, "train")]
    assert summary["grad_norm"]["max"] == max(norms) and summary["grad_norm"]["clipped_share"] == np.mean(np.array(norms) > 1.0)
    assert "Pre-clip gradient norm over 60 steps" in report and "ema weights:" in report and "trained weights (exported):" in report
    mix = summary["loader"]["slides_per_batch"]
    assert mix["batches"] == 60 and 1 <= mix["min"] <= mix["mean"] <= 3 and "distinct slides per batch" in report
    stage = read_report(run_dir)[-1]
    assert stage["stage"] == "distill" and stage["steps"] == 60 and stage["loader_samples_per_second"] > 0
    assert summary["speed"]["step"] > 0 and summary["speed"]["loader"] > 0
    assert sorted(p.name for p in (student_dir / "checkpoints").iterdir()) == ["step-00000040.pt", "step-00000060.pt"]
    checkpoint = torch.load(student_dir / "checkpoints" / "step-00000060.pt", weights_only=True)
    assert checkpoint["step"] == 60 and checkpoint["loader"] == {"rows": 60 * 16, "world_size": 1}


def test_the_exported_student_loads_and_embeds_a_tile_store(trained, tmp_path, local_ray):
    run_dir, _ = trained
    student = load_student(run_dir / "student")
    record = json.loads((run_dir / "student" / "student.json").read_text())
    assert record["input_px"] == 64 and record["target_mpp"] == 0.5 and record["nested_dims"] == [16, 64, 192]
    assert record["mean"] == [0.5, 0.5, 0.5] and set(record["distilled_from"]) == {"alpha", "beta"}

    out = tmp_path / "student-embeddings.zarr"
    embed_tile_store(run_dir / "student", run_dir / "tiles.zarr", out, dim=64)
    tiles = open_tile_store(run_dir / "tiles.zarr")
    store = open_feature_store(out, tiles)
    assert store.attrs.recipes == {"embedding": 64} and store.attrs.views == [{"name": "identity"}]
    assert store.attrs.teacher["stand_in"] is False and store.attrs.teacher["student"]["arch"] == "vit_tiny_patch16_224"
    embeddings = zarr.open_array(str(out / "embedding"), mode="r")
    assert embeddings.shape == (384, 1, 64) and embeddings.dtype == np.float16 and embeddings.chunks[0] == 8
    rows = tiles["tiles"][40:48]
    pixels = (torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = student.embed(pixels, dim=64).numpy()
    assert np.allclose(embeddings[40:48, 0].astype(np.float32), expected, atol=2e-2, rtol=1e-2)
    # a finished store left alone and an interrupted one resumed: embed_pool's, tested in test_feature_stage.py
    with pytest.raises(StoreError, match=r"(?s)computed differently:\n  - teacher: .*'dim': 64.*Use --overwrite"):
        embed_tile_store(run_dir / "student", run_dir / "tiles.zarr", out, dim=32)
    with pytest.raises(StudentError, match=r"choose 1..192"):
        embed_tile_store(run_dir / "student", run_dir / "tiles.zarr", tmp_path / "other.zarr", dim=400)


def test_a_killed_run_resumes_to_bitwise_identical_weights(trained, tmp_path, he_pixels, one_thread):
    reference, _ = trained
    run_dir = tmp_path / "run"
    make_run(run_dir, he_pixels)
    config = config_for(run_dir, **TRAINING)
    config_file = write_config(config, tmp_path / "config.yaml")
    process = subprocess.Popen([sys.executable, str(runner(tmp_path)), str(config_file)], cwd=REPO, env=subprocess_env())
    checkpoints = run_dir / "student" / "checkpoints"
    while not list(checkpoints.glob("step-*.pt")) and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "student" / "student.json").exists()

    with pytest.raises(StoreError, match="holds checkpoints of an earlier run: resume it"):
        run_distill(config)
    run_distill(config, resume=True)

    for name in ("student.safetensors", "heads.safetensors"):
        expected, resumed = tensors(reference / "student" / name), tensors(run_dir / "student" / name)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    expected, resumed = (torch.load(run / "student" / "checkpoints" / "step-00000060.pt", weights_only=True)["ema"] for run in (reference, run_dir))
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[key], resumed[key]) for key in expected)  # the EMA too
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 61))
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 20, 40, 60]
    assert read_report(run_dir)[-1]["resumed_from"] in (20, 40)


def test_two_ddp_processes_each_read_half_of_every_global_batch(tmp_path, he_pixels, one_thread):
    """Which rows each rank reads (disjoint pools, union the epoch, exact resume) is tested on the loader
    (tests/test_distill_data.py); here two real gloo processes train on their halves and save a state
    that only two processes may resume."""
    settings = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, precision="fp32", eval_every=100, checkpoint_every=100)
    run_dir = tmp_path / "double"
    make_run(run_dir, he_pixels)
    config_file = write_config(config_for(run_dir, **settings), tmp_path / "config.yaml")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(runner(tmp_path)), str(config_file)],
        cwd=REPO, env=subprocess_env(), check=True,
    )
    assert len(records(run_dir, "train")) == 4 and [r["stage"] for r in read_report(run_dir)] == ["distill"]
    checkpoint = torch.load(run_dir / "student" / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert checkpoint["loader"] == {"rows": 4 * 8 // 2, "world_size": 2}  # rank 0 read 4 of each 8-row global batch
    with pytest.raises(ConfigError, match=r"saved by a run of 2 process\(es\); resume it with that many, not 1"):
        run_distill(config_for(run_dir, **{**settings, "steps": 6}), resume=True)


def test_learning_rate_warms_up_linearly_then_decays_to_zero_on_a_cosine():
    settings = DistillConfig(lr=1.0, warmup_steps=4, steps=14)
    assert [learning_rate(step, settings) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, settings) == pytest.approx(0.5)
    assert learning_rate(14, settings) == pytest.approx(0.0)


def test_resume_refuses_changed_training_settings_unless_accepted_and_records_them(tmp_path, he_pixels, one_thread):
    run_dir = tmp_path / "run"
    make_run(run_dir, he_pixels)
    short = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=2, checkpoint_every=2, loader_workers=0, precision="fp32")
    run_distill(config_for(run_dir, **short))
    checkpoints = run_dir / "student" / "checkpoints"
    first = config_for(run_dir, **short).distill.model_dump(mode="json")
    assert torch.load(checkpoints / "step-00000004.pt", weights_only=True)["settings_history"] == [{"from_step": 0, "settings": first, "changed": {}}]

    changed = {**short, "steps": 6, "lr": 5e-4, "batch_size": 16}
    before = {path.name: path.read_bytes() for path in checkpoints.iterdir()}
    with pytest.raises(ConfigError, match=r"distill.batch_size: 8 -> 16; distill.lr: 0.001 -> 0.0005 \(checkpoint value -> now\)\. .*--resume-with-changes") as refused:
        run_distill(config_for(run_dir, **changed), resume=True)
    assert "distill.steps" not in str(refused.value)  # a longer run needs no permission
    assert {path.name: path.read_bytes() for path in checkpoints.iterdir()} == before

    summary = run_distill(config_for(run_dir, **changed), resume=True, accept_changes=True)
    assert summary["steps"] == 6 and summary["resumed_from"] == 4
    history = [(stretch["from_step"], stretch["changed"]) for stretch in summary["settings_history"]]
    assert history == [(0, {}), (4, {"batch_size": [8, 16], "lr": [1e-3, 5e-4], "steps": [4, 6]})]
    assert summary["settings_history"][0]["settings"] == first and summary["settings"]["lr"] == 5e-4
    assert "from step 4: steps 4 -> 6, batch_size 8 -> 16, lr 0.001 -> 0.0005." in (run_dir / "student" / "report.md").read_text()
    assert json.loads((run_dir / "student" / "student.json").read_text())["distill_history"] == summary["settings_history"]
    lrs = {r["step"]: r["lr"] for r in records(run_dir, "train")}
    assert lrs[4] == learning_rate(3, DistillConfig(**short)) and lrs[5] == learning_rate(4, DistillConfig(**changed))

    longer = run_distill(config_for(run_dir, **{**changed, "steps": 8}), resume=True)  # steps alone: no flag needed
    assert longer["steps"] == 8 and [s["changed"] for s in longer["settings_history"]][2:] == [{"steps": [6, 8]}]
    with pytest.raises(ConfigError, match="distill.steps 5 is below step 8"):
        run_distill(config_for(run_dir, **{**changed, "steps": 5}), resume=True, accept_changes=True)


TINY = DistillConfig(
    student="vit_tiny_patch16_224", student_kwargs={"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
    nested_dims=[16, 32], head_hidden=16, precision="fp32", warmup_steps=0,
)


def tiny_distiller(settings: DistillConfig) -> Distiller:
    seed_everything(0)
    student = build_student(settings, 32)
    heads = NestedHeads({"alpha": 12}, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    return Distiller(student, heads, {"alpha": Standardizer(torch.zeros(12), torch.ones(12))}, settings)


@pytest.mark.slow
def test_a_compiled_student_takes_the_steps_of_the_eager_one(one_thread):
    """distill.compile through inductor (gcc here): ~2 min the first time on a machine, ~15 s once
    inductor's cache holds the kernels. Same losses and weights as eager, same state_dict keys."""
    rng = np.random.default_rng(0)
    batch = Rows(
        rows=np.arange(8), slides=np.zeros(8, int), views=np.zeros(8, int),
        tiles=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), targets={"alpha": rng.normal(size=(8, 12)).astype(np.float16)},
    )

    def train(compiled: bool) -> tuple[list[float], dict]:
        model = tiny_distiller(TINY.model_copy(update={"compile": compiled}))
        if compiled:
            compile_student(model)
        optimizer = make_optimizer(model, TINY)
        losses = []
        for _ in range(3):
            loss, _, _ = forward_backward(model, model, batch, TINY)
            optimizer_step(model, optimizer, TINY)
            losses.append(loss.item())
        return losses, model.student.state_dict()

    eager_losses, eager_weights = train(False)
    compiled_losses, compiled_weights = train(True)
    assert list(compiled_weights) == list(eager_weights)  # checkpoints and exports cannot tell
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-3, atol=1e-5)


def test_a_checkpoint_of_a_fused_optimizer_resumes_with_this_machines_kernel():
    """AdamW is fused only on a GPU; a GPU run's optimizer state resumed on this CPU keeps its moments but not the flag."""
    model = tiny_distiller(TINY)
    optimizer = make_optimizer(model, TINY)
    assert [group["fused"] for group in optimizer.param_groups] == [False, False]
    on_gpu = make_optimizer(model, TINY)
    for group in on_gpu.param_groups:
        group["fused"] = True  # as make_optimizer sets it for parameters on a GPU (torch also runs it on CPUs)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    on_gpu.step()
    load_optimizer_state(optimizer, on_gpu.state_dict())
    assert [group["fused"] for group in optimizer.param_groups] == [False, False]
    first = next(model.parameters())
    assert torch.equal(optimizer.state[first]["exp_avg"], on_gpu.state[first]["exp_avg"]) and optimizer.state[first]["exp_avg"].abs().sum() > 0
    with pytest.raises(ValueError, match="compile"):
        DistillConfig(compile="sometimes")


def fixed_batch(rows: int = 8, width: int = 12) -> Rows:
    rng = np.random.default_rng(0)
    return Rows(
        rows=np.arange(rows), slides=np.zeros(rows, int), views=np.zeros(rows, int),
        tiles=rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8), targets={"alpha": (rng.normal(size=(rows, width)) * 3 + 1).astype(np.float16)},
    )


def test_the_logged_gradient_norm_is_the_norm_before_clipping(one_thread):
    settings = TINY.model_copy(update={"grad_clip": 1e-3})  # far below the norm: the step clips
    model = tiny_distiller(settings)
    optimizer = make_optimizer(model, settings)
    forward_backward(model, model, fixed_batch(), settings)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))
    assert optimizer_step(model, optimizer, settings).item() == pytest.approx(norm.item(), rel=1e-6) and norm > 1e-3


def test_raw_space_cosine_is_measured_after_the_inverse_standardizer(one_thread):
    model = tiny_distiller(TINY)
    batch = fixed_batch()
    model.standardizers["alpha"] = fit_standardizer(np.random.default_rng(1).normal(size=(64, 12)) * 3 + 1, "phi-s")
    scores, rows = validate(model, [batch], "fp32")
    with torch.no_grad():
        predictions = model.heads(model.student(model.student.preprocess(torch.from_numpy(batch.tiles))))
    for m in (16, 32):
        raw = model.standardizers["alpha"].inverse(predictions["alpha", m])
        expected = F.cosine_similarity(raw.double(), torch.from_numpy(batch.targets["alpha"]).double(), dim=-1).mean()
        assert rows == 8 and scores["alpha"][str(m)]["cos_raw"] == pytest.approx(expected.item(), abs=1e-6)
        assert scores["alpha"][str(m)]["cos_raw"] != pytest.approx(scores["alpha"][str(m)]["cos"], abs=1e-3)  # another space
    assert model.training  # validate leaves the mode as it found it


def test_linear_heads_train(one_thread):
    settings = TINY.model_copy(update={"head": "linear", "head_hidden": None, "lr": 3e-3})
    model = tiny_distiller(settings)
    assert model.heads.kind == "linear"
    optimizer = make_optimizer(model, settings)
    losses = []
    for _ in range(15):
        loss, _, _ = forward_backward(model, model, fixed_batch(), settings)
        optimizer_step(model, optimizer, settings)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_the_ema_is_the_running_average_of_the_weights_after_each_step(one_thread):
    model = tiny_distiller(TINY)
    optimizer = make_optimizer(model, TINY)
    ema = EMA(model, 0.7)
    expected = {key: value.double().clone() for key, value in model.state_dict().items()}  # starts at the initial weights
    for _ in range(3):
        forward_backward(model, model, fixed_batch(), TINY)
        optimizer_step(model, optimizer, TINY)
        ema.update(model)
        for key, value in model.state_dict().items():
            expected[key] = 0.7 * expected[key] + 0.3 * value.double()
    averaged = ema.state_dict()
    assert averaged.keys() == expected.keys() and not ema.model.training
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].double(), value, rtol=1e-6, atol=1e-7)
    moved = [key for key in expected if not torch.equal(averaged[key], model.state_dict()[key])]
    assert any(key.startswith("student.") for key in moved) and any(key.startswith("heads.") for key in moved)
    with pytest.raises(ValueError, match="between 0 and 1"):
        EMA(model, 1.0)


def test_export_ema_exports_the_averaged_student_and_koleo_is_logged(tmp_path, he_pixels, one_thread):
    run_dir = tmp_path / "run"
    make_run(run_dir, he_pixels)
    short = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=4, checkpoint_every=4, loader_workers=0, precision="fp32",
                 ema=0.5, export_ema=True, koleo_weight=0.1)
    summary = run_distill(config_for(run_dir, **short))
    ema = torch.load(run_dir / "student" / "checkpoints" / "step-00000004.pt", weights_only=True)["ema"]
    exported = tensors(run_dir / "student" / "student.safetensors")
    assert all(torch.equal(value, ema[f"student.backbone.{key}"]) for key, value in exported.items())
    heads = tensors(run_dir / "student" / "heads.safetensors")
    assert all(torch.equal(heads[key], ema[key]) for key in heads if key.startswith("heads."))
    record = json.loads((run_dir / "student" / "student.json").read_text())
    last = records(run_dir, "eval")[-1]
    assert record["exported_weights"] == "ema" and record["final_val"] == last["ema"] == summary["final_val"] != last["val"]
    assert all(r["koleo"] > 0 for r in records(run_dir, "train"))
    with pytest.raises(ValueError, match="export_ema exports the EMA student, but ema is off"):
        config_for(run_dir, **{**short, "ema": None})
