"""Evaluation: probes on small real-image datasets with known answers, dataset errors, PLISM metrics on
hand-made pairs, the demo labelled set, fidelity re-measured on a run, and the whole stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from distill.evaluate.demo_set import LABEL_RULE, TILES_PER_CLASS, build_demo_set, demo_dataset
from distill.evaluate.models import StoredFeatures, StudentEmbedder, cached_embeddings, check_teacher_names, fit_to_model
from distill.evaluate.run import EvaluateError, run_evaluate
from distill.export import export_student
from distill.evaluate.fidelity import fidelity
from distill.evaluate.datasets import open_labelled
from distill.evaluate.probes import ProbeData, knn_probe, linear_probe, logistic_probe, nearest, retrieval_accuracy, scores
from distill.evaluate.robustness import PairSet, pair_cosine, pair_top_k, paired_folder, proxy_pairs, rescan, restain, robustness
from distill.standardize import fit_standardizer
from distill.student import NestedHeads, Student
from distill_run import make_run, synthetic_slide, synthetic_tile_attrs
from pipeline.config import Config, EvalDatasetConfig, EvaluateConfig, StoreConfig, load_config
from pipeline.stores import FLAG_READ_FAILED, FeatureStoreAttrs, create_feature_store, create_tile_store, open_tile_store, write_rows
from pipeline.geometry import resize_area

REPO = Path(__file__).resolve().parent.parent
TINY = dict(img_size=32, depth=2)  # vit_tiny: D = 192
META = dict(input_px=32, target_mpp=0.5)
CROP = 48  # px of the dataset images, at 0.5 um/px: the tiny student's 32 px field is their centre
PER_SPLIT = {"train": 40, "val": 20, "test": 40}  # images per class


def recoloured(images: np.ndarray) -> np.ndarray:
    """The same tissue with its colour channels turned (R, G, B) -> (B, R, G): pink and purple become green."""
    return np.ascontiguousarray(images[..., [2, 0, 1]])


def write_imagefolder(root: Path, classes: dict[str, np.ndarray], per_split: dict[str, int]) -> Path:
    """root/<split>/<class>/<index>.png from each class's images, taken in order."""
    for name, images in classes.items():
        taken = 0
        for split, count in per_split.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(images[taken + index]).save(folder / f"{taken + index:04d}.png")
            taken += count
    return root


@pytest.fixture(scope="module")
def crops(he_pixels) -> np.ndarray:
    """Real H&E crops of CROP px that hold tissue (not glass)."""
    side = CROP
    rows, cols = he_pixels.shape[0] // side, he_pixels.shape[1] // side
    grid = he_pixels[: rows * side, : cols * side].reshape(rows, side, cols, side, 3).swapaxes(1, 2).reshape(-1, side, side, 3)
    return np.ascontiguousarray(grid[grid.mean(axis=(1, 2, 3)) < 200][: sum(PER_SPLIT.values())])


@pytest.fixture(scope="module")
def separable(tmp_path_factory, crops) -> EvalDatasetConfig:
    """Class 'he' = tissue crops, class 'recoloured' = the same crops recoloured: any embedding separates them."""
    root = write_imagefolder(tmp_path_factory.mktemp("separable"), {"he": crops, "recoloured": recoloured(crops)}, PER_SPLIT)
    return EvalDatasetConfig(name="separable", kind="imagefolder", path=root, mpp=0.5)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny random-weight student exported as `distill` exports one (no run record)."""
    student = Student("vit_tiny_patch16_224", TINY, init="random:0")
    widths = {"demo-vit": 192}
    heads = NestedHeads(widths, student.nested_dims, hidden=32)
    standardizers = {"demo-vit": fit_standardizer(np.random.default_rng(0).normal(size=(16, 192)), "zscore")}
    directory = tmp_path_factory.mktemp("student")
    export_student(student, directory, META, standardizers, heads)
    return directory


@pytest.fixture(scope="module")
def separable_data(tmp_path_factory, separable, student_dir) -> ProbeData:
    """The student's full-width embeddings of the separable set, through the evaluation's own loading."""
    dataset = open_labelled(separable)
    embedded = cached_embeddings(StudentEmbedder(student_dir), dataset.images, tmp_path_factory.mktemp("cache"), 64)
    return ProbeData.from_splits(embedded.outputs["z"], dataset.labels, dataset.splits, len(dataset.classes))


def shuffled(data: ProbeData) -> ProbeData:
    """The same embeddings with labels drawn at random: nothing to learn."""
    rng = np.random.default_rng(1)
    return ProbeData(
        data.train, rng.permutation(data.train_labels), data.val, rng.permutation(data.val_labels),
        data.test, rng.permutation(data.test_labels), data.n_classes,
    )


PROBES = {
    "logreg": lambda data: logistic_probe(data, EvaluateConfig().logreg_c)[0],
    "knn": lambda data: knn_probe(data, 20),
    "linear": lambda data: linear_probe(data, seed=0, steps=1000, lr=3e-4, batch_size=256),
}


@pytest.mark.parametrize("probe", PROBES)
def test_each_probe_separates_a_separable_set_and_not_shuffled_labels(probe, separable_data):
    assert separable_data.test.shape == (80, 192)
    separated = scores(separable_data.test_labels, PROBES[probe](separable_data))
    assert separated["balanced_accuracy"] > 0.95 and separated["macro_f1"] > 0.95 and separated["auroc"] > 0.98
    chance = scores(shuffled(separable_data).test_labels, PROBES[probe](shuffled(separable_data)))
    assert 0.3 < chance["balanced_accuracy"] < 0.7 and 0.25 < chance["auroc"] < 0.75


def test_scores_on_known_predictions():
    labels = np.array([0, 0, 0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 0, 1, 1, 2, 0]]  # class 0: 2/3 right, class 1: 1/1, class 2: 1/2
    found = scores(labels, probabilities)
    assert found["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert found["auroc"] is None
    binary = scores(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]))
    assert binary["auroc"] == 1.0 and binary["balanced_accuracy"] == 0.75


def test_retrieval_counts_a_hit_when_a_same_class_item_is_among_the_k_nearest():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    data = ProbeData(train, np.array([0, 1, 1]), train, np.array([0, 1, 1]), np.array([[1.0, 0.02], [0.1, 1.0]]), np.array([1, 0]), 2)
    # query 0 is nearest to item 0 (class 0), then item 1 (class 1); query 1 nearest to item 2 (class 1), then 1, then 0
    assert retrieval_accuracy(data, [1, 2, 3]) == {"top1": 0.0, "top2": 0.5, "top3": 1.0}
    assert nearest(train, train, 1, exclude_self=True)[:, 0].tolist() == [1, 0, 1]


def test_the_pair_metrics_on_a_hand_made_pair_set():
    a = np.eye(4)
    assert pair_cosine(a, a * 3) == pytest.approx(1.0)
    assert pair_cosine(a, np.roll(a, 1, axis=0)) == pytest.approx(0.0)
    # b_i close to a_i: every row's nearest other row is its partner
    assert pair_top_k(a, a + 0.1, [1]) == {"top1": 1.0}
    # b_i = -a_i: the partner is the least similar of the 7 other rows
    assert pair_top_k(a, -a, [1, 6, 7]) == {"top1": 0.0, "top6": 0.0, "top7": 1.0}
    # three conditions, each pair in its own group: y is x slightly changed, z is x reversed
    conditions = np.stack([a, a + 0.1, -a])
    groups = {(0, 1): "cross-scanner", (0, 2): "cross-staining", (1, 2): "cross-both"}
    found = robustness(conditions.reshape(12, 4), PairSet(None, ("x", "y", "z"), 4, groups, "hand-made"), [1, 10])
    assert [found["groups"][g]["top1"] for g in ("cross-scanner", "cross-staining", "cross-both")] == [1.0, 0.0, 0.0]
    assert found["groups"]["all"]["top1"] == 0.0  # the median of 1, 0, 0
    assert found["groups"]["cross-staining"]["cosine"] == pytest.approx(-1.0)
    assert found["groups"]["all"]["cosine"] == pytest.approx(found["groups"]["cross-both"]["cosine"])  # the middle one
    top10 = [found["groups"][g]["top10"] for g in ("cross-scanner", "cross-staining", "cross-both")]
    assert top10 == [1.0, 1.0, 1.0]  # 10 neighbours of 7 other rows: every partner is found
    assert found["score"] == pytest.approx(np.mean([found["groups"]["all"]["cosine"], *top10]))


def test_the_proxy_pairs_are_stains_times_scanners_of_real_tiles(separable, crops):
    pairs = proxy_pairs(open_labelled(separable).images, n_tiles=5)
    assert len(pairs.conditions) == 6 and len(pairs.images) == 30 and len(pairs.groups) == 15
    counts = {group: list(pairs.groups.values()).count(group) for group in set(pairs.groups.values())}
    assert counts == {"cross-scanner": 3, "cross-staining": 6, "cross-both": 6}
    first = pairs.images.read(np.arange(0, 30, 5))  # tile 0 under every condition
    assert np.array_equal(first[0], pairs.images.base.read(pairs.images.tiles[:1])[0])  # as scanned, as is
    assert all(image.shape == first[0].shape for image in first)
    assert len({image.tobytes() for image in first}) == 6
    tile = crops[0]
    assert restain(tile, None) is tile and rescan(tile, None) is tile
    more_haematoxylin = restain(tile, (1.6, 0.7, 1.0)).astype(float)
    assert more_haematoxylin[..., 0].mean() < tile[..., 0].mean()  # haematoxylin absorbs red: darker in R


def test_a_paired_folder_needs_the_same_names_under_every_condition(tmp_path, crops):
    for condition in ("scanner-a", "scanner-b"):
        (tmp_path / condition).mkdir()
        for index in range(3):
            Image.fromarray(crops[index]).save(tmp_path / condition / f"tile{index}.png")
    pairs = paired_folder(tmp_path, 0.5, n_tiles=2)
    assert pairs.conditions == ("scanner-a", "scanner-b") and pairs.n_tiles == 2 and set(pairs.groups.values()) == {"all"}
    assert [p.name for p in pairs.images.paths] == ["tile0.png", "tile1.png"] * 2
    (tmp_path / "scanner-b" / "tile2.png").rename(tmp_path / "scanner-b" / "other.png")
    with pytest.raises(EvaluateError, match="same file names"):
        paired_folder(tmp_path, 0.5, n_tiles=2)
    with pytest.raises(EvaluateError, match="pairs_mpp"):
        paired_folder(tmp_path, None, n_tiles=2)


def imagefolder_entry(root: Path, **fields) -> EvalDatasetConfig:
    return EvalDatasetConfig(**{"name": "bench", "kind": "imagefolder", "path": root, "mpp": 0.5, **fields})


def test_dataset_errors_name_the_input_and_the_fix(tmp_path, crops):
    with pytest.raises(EvaluateError, match=r"'bench': .*missing does not exist; download"):
        open_labelled(imagefolder_entry(tmp_path / "missing"))
    flat = write_imagefolder(tmp_path / "flat", {"a": crops, "b": crops}, {"train": 2})
    for split_folder in flat.iterdir():
        for class_folder in split_folder.iterdir():
            class_folder.rename(flat / class_folder.name)
        split_folder.rmdir()
    with pytest.raises(EvaluateError, match=r"no train/, val/ or test/ folder.*split_file"):
        open_labelled(imagefolder_entry(flat))
    with pytest.raises(EvaluateError, match=r"has no mpp: set mpp"):
        open_labelled(imagefolder_entry(flat, mpp=None))
    empty = write_imagefolder(tmp_path / "empty", {"a": crops}, {"train": 2, "test": 1})
    (empty / "test" / "b").mkdir()
    with pytest.raises(EvaluateError, match=r"class folder .*test/b holds no images"):
        open_labelled(imagefolder_entry(empty))
    with pytest.raises(EvaluateError, match="split file .* does not exist"):
        open_labelled(imagefolder_entry(flat, split_file=tmp_path / "nope.csv"))
    bad_split = tmp_path / "bad.csv"
    bad_split.write_text("item,split\na/0000.png,training\n")
    with pytest.raises(EvaluateError, match=r"splits \['training'\]; use only train, val, test"):
        open_labelled(imagefolder_entry(flat, split_file=bad_split))
    with pytest.raises(EvaluateError, match=r"unknown teacher 'uni3'.*choose one of"):
        check_teacher_names(["uni3"])


def test_a_split_file_assigns_items_and_missing_splits_are_completed(tmp_path, crops):
    flat = tmp_path / "flat"
    for name, images in {"a": crops[:10], "b": crops[10:20]}.items():
        (flat / name).mkdir(parents=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(flat / name / f"{index}.png")
    split_file = tmp_path / "splits.csv"
    with split_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "split"])
        writer.writerows([(f"{name}/{index}.png", "train" if index < 8 else "val") for name in "ab" for index in range(10)])
    dataset = open_labelled(imagefolder_entry(flat, split_file=split_file))
    counts = dataset.describe()["counts"]
    # no test split: val (2 per class) becomes test, and val is carved from train (20% of 8 per class)
    assert counts == {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}
    assert dataset.notes == ("no test split: the given val split is the test split", "val carved from train: 20% of each class, seed 0")
    with pytest.raises(EvaluateError, match="needs train and at least one of val, test"):
        open_labelled(imagefolder_entry(write_imagefolder(tmp_path / "train-only", {"a": crops}, {"train": 2})))


def test_images_reach_a_model_at_its_mpp_and_input_size(crops):
    image = np.ascontiguousarray(np.concatenate([crops[0], crops[1]], axis=1))  # 48 x 96 px at 0.25 um/px
    tile, seen = fit_to_model(image, image_mpp=0.25, model_mpp=0.5, tile_px=24)
    assert seen == 0.5 and np.array_equal(tile, resize_area(np.ascontiguousarray(image[:, 24:72]), 24))
    small, seen = fit_to_model(crops[0], image_mpp=0.5, model_mpp=0.5, tile_px=96)  # 48 px: smaller than the field
    assert small.shape == (96, 96, 3) and seen == 0.25
    same, seen = fit_to_model(crops[0], image_mpp=0.499, model_mpp=0.5, tile_px=48)  # within a pixel: used as is
    assert np.array_equal(same, crops[0]) and seen == pytest.approx(0.499)


def test_embeddings_are_cached_per_model_and_image_set(tmp_path, separable, student_dir):
    dataset = open_labelled(separable)
    student = StudentEmbedder(student_dir, dims=[16, 192])
    first = cached_embeddings(student, dataset.images, tmp_path, 64)
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 1 and files[0].parent.name == f"student-{student.identity[:12]}"
    again = cached_embeddings(student, dataset.images, tmp_path, 64)
    assert np.array_equal(first.outputs["z"], again.outputs["z"]) and np.all(again.seen_mpp == 0.5)
    assert student.widths == {"z": [16, 192]}
    with pytest.raises(EvaluateError, match=r"evaluate.dims \[500\] are outside"):
        StudentEmbedder(student_dir, dims=[500])
    with pytest.raises(EvaluateError, match="run `make distill` first"):
        StudentEmbedder(tmp_path / "nowhere")


def labelled_tile_store(path: Path, crops: np.ndarray, per_split: dict[str, int] = PER_SPLIT) -> Path:
    """A tile store of tissue crops and their recoloured copies, with 'label' and 'split' arrays."""
    split_of_crop = np.repeat([0, 1, 2], list(per_split.values()))
    crops = crops[: len(split_of_crop)]
    tiles = np.concatenate([crops, recoloured(crops)])
    n = len(tiles)
    store = StoreConfig(chunk_rows=20, shard_rows=200)
    group = create_tile_store(path, synthetic_tile_attrs(n, CROP, [], store=store, label_names=["he", "recoloured"]), store).group
    write_rows(path, 0, {"tiles": tiles, "flags": np.zeros(n, np.uint8)})
    group.create_array("label", data=np.repeat([0, 1], len(crops)).astype(np.int32))
    group.create_array("split", data=np.tile(split_of_crop, 2).astype(np.uint8))
    return path


def test_a_feature_store_stands_in_for_its_model_on_its_tile_store(tmp_path, crops, student_dir):
    store = labelled_tile_store(tmp_path / "labelled.zarr", crops)
    dataset = open_labelled(EvalDatasetConfig(name="store", kind="tile_store", path=store))
    assert dataset.classes == ("he", "recoloured") and dataset.images.mpp == 0.5
    student = StudentEmbedder(student_dir)
    z = cached_embeddings(student, dataset.images, tmp_path / "cache", 64).outputs["z"]
    tile_attrs = open_tile_store(store).attrs
    teacher = {"name": "student-copy", "stand_in": True}
    create_feature_store(tmp_path / "features.zarr", FeatureStoreAttrs.new(tile_attrs, teacher, {"embedding": 192}, [{"name": "identity"}]), 20, 200, StoreConfig())
    write_rows(tmp_path / "features.zarr", 0, {"embedding": z[:, None].astype(np.float16)})
    stored = StoredFeatures(tmp_path / "features.zarr")
    assert stored.name == "student-copy (stored)" and stored.tile_store_id == dataset.images.store_id
    assert np.allclose(stored.rows(dataset.images).outputs["embedding"], z, atol=1e-2, rtol=1e-3)
    unlabelled = tmp_path / "unlabelled.zarr"
    create_tile_store(unlabelled, synthetic_tile_attrs(2, CROP, []), StoreConfig(chunk_rows=2, shard_rows=2))
    with pytest.raises(EvaluateError, match="has no 'label' array"):
        open_labelled(EvalDatasetConfig(name="bare", kind="tile_store", path=unlabelled))
    with pytest.raises(EvaluateError, match=r"mpp 1.0 is declared but the store's tiles are at 0.5"):
        open_labelled(EvalDatasetConfig(name="store", kind="tile_store", path=store, mpp=1.0))


def demo_like_store(run_dir: Path, crops: np.ndarray) -> Path:
    """RUN/tiles.zarr of three slides made from two source images, listed in a SOURCES.json beside them."""
    slides_dir = run_dir / "slides"
    slides_dir.mkdir(parents=True)
    sources = {"a.svs": "pkg/cmu.svs", "b.tiff": "pkg/cmu.svs", "c.tiff": "other/target.png"}
    (slides_dir / "SOURCES.json").write_text(json.dumps({name: {"inputs": {"source": {"member": member}}} for name, member in sources.items()}))
    counts = (50, 70, 60)
    starts = np.cumsum((0, *counts))
    slides = [synthetic_slide(i, Path(name).stem, (starts[i], starts[i + 1]), path=str(slides_dir / name)) for i, name in enumerate(sources)]
    n = int(starts[-1])
    path = run_dir / "tiles.zarr"
    store = StoreConfig(chunk_rows=10, shard_rows=40)
    create_tile_store(path, synthetic_tile_attrs(n, CROP, slides, store=store), store)
    tiles = np.concatenate([crops[:120], recoloured(crops[:60])])
    write_rows(path, 0, {"tiles": tiles, "slide": np.repeat(np.arange(3, dtype=np.int32), counts), "flags": np.zeros(n, np.uint8)})
    return path


def test_the_demo_set_labels_tiles_by_their_source_image(tmp_path, crops):
    source = demo_like_store(tmp_path, crops)
    entry = demo_dataset(tmp_path)
    dataset = open_labelled(entry)
    assert dataset.classes == ("cmu.svs", "target.png")
    # 120 tiles of the first source (capped at TILES_PER_CLASS = 100) and 60 of the second, split 50/25/25
    assert TILES_PER_CLASS == 100
    assert dataset.describe()["counts"] == {"train": {"cmu.svs": 50, "target.png": 30}, "val": {"cmu.svs": 25, "target.png": 15}, "test": {"cmu.svs": 25, "target.png": 15}}
    assert dataset.notes == (f"labels: {LABEL_RULE}",)
    built = zarr.open_group(str(entry.path), mode="r")
    source_group = zarr.open_group(str(source), mode="r")
    slide_of_row = built["slide"][:]
    assert np.array_equal(built["label"][:], (slide_of_row == 2).astype(np.int32))  # slide c is the other source
    for slide in built.attrs["slides"]:  # each slide's rows stay contiguous, as the schema requires
        start, end = slide["rows"]
        assert (slide_of_row[start:end] == slide["id"]).all() and slide["n_tiles"] == end - start
    source_tiles, source_slides = source_group["tiles"][:], source_group["slide"][:]
    for row in (0, len(slide_of_row) - 1):  # built rows are copies of source rows of the same slide
        copies = np.flatnonzero((source_tiles == built["tiles"][row]).all(axis=(1, 2, 3)))
        assert len(copies) and (source_slides[copies] == slide_of_row[row]).all()
    store_id = built.attrs["store_id"]
    assert zarr.open_group(str(demo_dataset(tmp_path).path), mode="r").attrs["store_id"] == store_id  # reused, not rebuilt
    with pytest.raises(EvaluateError, match=r"evaluate.datasets is empty, so the demo set is made from .*tiles.zarr"):
        demo_dataset(tmp_path / "no-run")
    (tmp_path / "slides" / "SOURCES.json").unlink()
    with pytest.raises(EvaluateError, match="not a demo slide: list labelled sets under evaluate.datasets"):
        build_demo_set(source, tmp_path / "again.zarr")


def test_fidelity_is_re_measured_on_the_run_s_held_out_slides(tmp_path, he_pixels, student_dir):
    """A student exported with a run record: the re-measure uses the run's split, stores and heads."""
    run = make_run(tmp_path, he_pixels)  # 4 slides, the last held out; teachers alpha (40) and beta (24)
    student = Student("vit_tiny_patch16_224", dict(img_size=64, depth=2), nested_dims=[16, 192])
    widths = {"alpha": 40, "beta": 24}
    heads = NestedHeads(widths, [16, 192], hidden=32)
    standardizers = {t: fit_standardizer(np.random.default_rng(0).normal(size=(64, w)), "zscore") for t, w in widths.items()}
    tiles = zarr.open_group(str(tmp_path / "tiles.zarr"), mode="r")
    run_record = {
        "distill": {"val_slides": 1, "val_rows": None, "precision": "fp32", "student": "vit_tiny_patch16_224"},
        "distilled_from": {t: {"recipe": "cls"} for t in widths},
        "split": {"val": [{"run": str(tmp_path), "id": 3, "name": "slide-3", "rows": [300, 384]}]},
        "composition": [{"run": str(tmp_path), "tile_store_id": tiles.attrs["store_id"], "slides": {"val": [{"id": 3, "name": "slide-3"}]}}],
        "final_val": {"alpha": {"16": {"cos": 0.5, "r2": 0.1}}},
    }
    export_student(student, tmp_path / "student", {**META, "input_px": 64, **run_record}, standardizers, heads)
    found = fidelity(None, tmp_path / "student", None)  # on the runs the student records
    assert [s["name"] for s in found["held_out_slides"]] == ["slide-3"] and found["rows"] == 83  # 84 rows, one unreadable
    assert found["run"] == run_record["final_val"]
    assert set(found["recomputed"]) == {"alpha", "beta"} and set(found["recomputed"]["alpha"]) == {"16", "192"}
    # an untrained student predicts the teachers badly: R^2 near or below zero, cosine well below 1
    assert all(s["r2"] < 0.2 and -1 <= s["cos"] < 0.9 for by_dim in found["recomputed"].values() for s in by_dim.values())
    rows = np.flatnonzero((run["slide"] == 3) & ((run["flags"] & FLAG_READ_FAILED) == 0))
    with torch.no_grad():
        z = student(student.preprocess(torch.from_numpy(run["tiles"][rows])))
        predicted = heads.head("beta", 16)(z[:, :16])
        target = standardizers["beta"](torch.from_numpy(run["targets"]["beta"][rows, 0].astype(np.float32)))
    assert found["recomputed"]["beta"]["16"]["cos"] == pytest.approx(F.cosine_similarity(predicted, target).mean().item(), abs=1e-4)
    raw = torch.from_numpy(run["targets"]["beta"][rows, 0].astype(np.float32))  # in the teacher's own space
    expected_raw = F.cosine_similarity(standardizers["beta"].inverse(predicted), raw).mean().item()
    assert found["recomputed"]["beta"]["16"]["cos_raw"] == pytest.approx(expected_raw, abs=1e-4)
    assert "student.json lacks" in fidelity(None, student_dir, None)["skipped"]


def test_evaluate_writes_json_table_and_plots(tmp_path, crops, student_dir):
    small = {"train": 6, "val": 3, "test": 3}
    root = write_imagefolder(tmp_path / "small", {"he": crops, "recoloured": recoloured(crops)}, small)
    store = labelled_tile_store(tmp_path / "labelled.zarr", crops, small)
    # a feature store computed earlier for the labelled tile store: each tile's mean colour
    tile_group = open_tile_store(store)
    colour = tmp_path / "colour.zarr"
    create_feature_store(colour, FeatureStoreAttrs.new(tile_group.attrs, {"name": "colour"}, {"mean": 3}, [{"name": "identity"}]), 20, 200, StoreConfig())
    write_rows(colour, 0, {"mean": tile_group["tiles"][:].mean(axis=(1, 2))[:, None].astype(np.float16)})
    settings = EvaluateConfig(
        datasets=[EvalDatasetConfig(name="small", kind="imagefolder", path=root, mpp=0.5), EvalDatasetConfig(name="store", kind="tile_store", path=store)],
        student=student_dir, dims=[16, 64, 192], teachers=["demo-vit"], feature_stores=[colour], seeds=2, linear_steps=100,
        logreg_c=[0.01, 1.0], pair_tiles=4, pair_k=[1, 3, 5, 10],
    )
    config = Config(run=tmp_path / "run", evaluate=settings)
    result = run_evaluate(config)
    out = tmp_path / "run" / "evaluate"
    assert json.loads((out / "evaluate.json").read_text()) == json.loads(json.dumps(result))
    rows = {(r["dataset"], r["model"], r["output"], r["dim"]) for r in result["classification"]}
    expected_models = [("student", "z", d) for d in (16, 64, 192)] + [("demo-vit", "cls", 192), ("demo-vit", "cls_mean", 384)]
    assert rows == {(d, *m) for d in ("small", "store") for m in expected_models} | {("store", "colour (stored)", "mean", 3)}
    stored = next(r for r in result["classification"] if r["model"] == "colour (stored)")
    assert stored["probes"]["logreg"]["balanced_accuracy"]["mean"] == 1.0  # mean colours tell the recoloured tiles apart
    for record in result["classification"]:
        assert set(record["probes"]) == {"logreg", "knn", "linear"} and record["probes"]["linear"]["runs"] == 2
        assert set(record["retrieval"]) == {"top1", "top5"}
    teacher_small = next(r for r in result["classification"] if r["model"] == "demo-vit" and r["dataset"] == "small")
    assert teacher_small["seen_mpp"] == [pytest.approx(48 * 0.5 / 224)] * 2 and "smaller than the model's field" in teacher_small["notes"][0]
    robust = result["robustness"]
    assert robust["source"].startswith("proxy (not PLISM data)") and len(robust["results"]) == 5
    assert all(r["score"] is not None and set(r["groups"]) == {"all", "cross-scanner", "cross-staining", "cross-both"} for r in robust["results"])
    assert "skipped" in result["fidelity"]
    table = (out / "evaluate.md").read_text()
    assert "| student* | 16 |" in table and "| demo-vit* cls_mean | 384 |" in table and "small logreg" in table
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["robustness.png", "small.png", "store.png"]
    assert len(list((out / "cache").rglob("*.npz"))) == 2 * 3  # (student, demo-vit) x (small, store, pairs)
    stage = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]
    assert stage["stage"] == "evaluate" and stage["models"] == ["student", "demo-vit", "colour (stored)"]
    with pytest.raises(EvaluateError, match="unknown teacher"):
        run_evaluate(config.model_copy(update={"evaluate": settings.model_copy(update={"teachers": ["virchow3"]})}))


def test_the_example_benchmark_config_validates():
    config = load_config(REPO / "configs" / "evaluate-crc.yaml")
    assert config.evaluate.datasets[0].kind == "imagefolder" and config.evaluate.datasets[0].mpp == 0.5


def test_students_side_by_side_are_each_labelled_by_their_directory_in_the_robustness_table(tmp_path, crops, student_dir):
    """evaluate.students: another exported student (here a RUN/student, labelled by its run) is evaluated beside evaluate.student."""
    other = Student("vit_tiny_patch16_224", TINY, init="random:1")
    other_dir = tmp_path / "augmented" / "student"
    export_student(other, other_dir, META, {"demo-vit": fit_standardizer(np.random.default_rng(1).normal(size=(16, 192)), "zscore")}, NestedHeads({"demo-vit": 192}, other.nested_dims, hidden=32))
    root = write_imagefolder(tmp_path / "small", {"he": crops, "recoloured": recoloured(crops)}, {"train": 6, "val": 3, "test": 3})
    settings = EvaluateConfig(
        datasets=[EvalDatasetConfig(name="small", kind="imagefolder", path=root, mpp=0.5)], student=student_dir, students=[other_dir],
        dims=[16, 192], teachers=[], seeds=1, probes=["knn"], pair_tiles=4, pair_k=[1, 3, 5, 10],
    )
    result = run_evaluate(Config(run=tmp_path / "run", evaluate=settings))
    labels = [student_dir.name, "augmented"]
    assert [s["label"] for s in result["students"]] == labels and result["student"]["label"] == student_dir.name
    assert [(m["name"], m["kind"]) for m in result["models"]] == [(label, "student") for label in labels]
    robust = {(r["model"], r["dim"]): r for r in result["robustness"]["results"]}
    assert set(robust) == {(label, dim) for label in labels for dim in (16, 192)}
    assert robust[labels[0], 192]["groups"] != robust[labels[1], 192]["groups"]  # two different students, measured apart
    table = (tmp_path / "run" / "evaluate" / "evaluate.md").read_text()
    robustness_section = table.split("## Robustness")[1].split("## Fidelity")[0]
    assert f"| {labels[0]}* | 16 |" in robustness_section and "| augmented* | 192 |" in robustness_section
    assert "- **augmented**: " in table and "augmentations: none" in table
    assert (tmp_path / "run" / "evaluate" / "plots" / "robustness.png").is_file()
    with pytest.raises(EvaluateError, match="share one"):
        run_evaluate(Config(run=tmp_path / "run", evaluate=settings.model_copy(update={"students": [student_dir]})))
