"""Where weights come from, for teachers and the student alike: one parser, one reader, one error.

A weight source is one of

* ``random:SEED`` - timm's own init under a private RNG stream seeded with SEED: bitwise reproducible;
* ``bundled:NAME`` - a demo stand-in's weights shipped as NAME.safetensors in pipeline/stand_ins/ with the script
  that made them (no pathology model: random and bundled sources are the stand-ins, labelled as such);
* ``hf-hub:ORG/NAME[/FILE][@REVISION]`` - a checkpoint (FILE, else the loader's usual names:
  ``model.safetensors``, else ``pytorch_model.bin`` for timm) from the Hugging Face cache; works offline once cached (``HF_HUB_OFFLINE=1``), otherwise the error names the repo
  and how to pre-download it;
* a local ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file - pickles only through
  ``torch.load(weights_only=True)``, never a full unpickle.

A checkpoint reaches a module in one of two ways, kept apart on purpose: ``build_strict`` loads every key as
stored (a teacher must be exactly the published model), while ``state_dict_for`` hands the tensors over, so
the student can pass them to timm's pretrained loading and get its per-architecture conversions (e.g.
DINOv2's position embedding resampled to another image size).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError
from torch import Tensor, nn

from pipeline.errors import PathdistillError
from pipeline.files import sha256_file

# The order timm tries for hub checkpoints: safetensors first, the pickle only as a fallback.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")
SOURCE_FORMS = f"random:SEED, bundled:NAME, hf-hub:ORG/NAME[/FILE][@REVISION] or a {' / '.join(LOCAL_WEIGHT_SUFFIXES)} file"
STAND_IN_WEIGHTS = Path(__file__).resolve().parent / "stand_ins"

Module = TypeVar("Module", bound=nn.Module)


class WeightsError(PathdistillError, RuntimeError):
    """Weights are missing, unreadable, unsafe, or do not fit the architecture."""


@dataclass(frozen=True)
class RandomInit:
    """Seeded random weights: a stand-in, never a trained model."""

    seed: int

    def __str__(self) -> str:
        return f"random:{self.seed}"

    def build(self, create: Callable[[], Module]) -> Module:
        """``create()`` under a private RNG stream: same seed, bitwise same weights; the caller's RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return create()


@dataclass(frozen=True)
class BundledStandIn:
    """A demo stand-in's weights shipped with the project (pipeline/stand_ins/), never a published model."""

    name: str

    def __str__(self) -> str:
        return f"bundled:{self.name}"

    def file(self, names: tuple[str, ...] = HUB_WEIGHT_FILES) -> Path:
        """The shipped file; ``names`` (a hub repo's file names) do not apply."""
        path = STAND_IN_WEIGHTS / f"{self.name}.safetensors"
        if not path.is_file():
            shipped = sorted(p.stem for p in STAND_IN_WEIGHTS.glob("*.safetensors"))
            raise WeightsError(f"weight source {self}: no {path}; the project ships {shipped} (python -m pipeline.demo.texture_teacher remakes demo-texture)")
        return path


@dataclass(frozen=True)
class HubCheckpoint:
    """A Hugging Face repo's weights, read from the local cache (downloaded into it unless offline)."""

    repo: str
    revision: str | None = None
    filename: str | None = None  # a repo whose checkpoint has none of the usual names (GPFM.pth)

    def __str__(self) -> str:
        return f"hf-hub:{self.repo}" + (f"/{self.filename}" if self.filename else "") + (f"@{self.revision}" if self.revision else "")

    def file(self, names: tuple[str, ...] = HUB_WEIGHT_FILES) -> Path:
        """The source's own file, else the first of ``names`` that is cached (each library names its checkpoint
        files); the error says how to fill the cache where the hub is reachable."""
        names = (self.filename,) if self.filename else names
        for filename in names:
            if path := self._cached(filename):
                return path
        offline = " (HF_HUB_OFFLINE is set)" if hf_constants.HF_HUB_OFFLINE else ""
        download = f"hf download {self.repo}" + (f" --revision {self.revision}" if self.revision else "")
        raise WeightsError(
            f"no weights ({' or '.join(names)}) for {self} in the Hugging Face cache "
            f"{hf_constants.HF_HUB_CACHE}{offline}. Pre-download them where the hub is reachable with "
            f"`{download}` (gated repos: accept the terms on https://huggingface.co/{self.repo} and "
            "`hf auth login` first), then point HF_HOME or HF_HUB_CACHE at that cache; or pass a local weights file."
        )

    def _cached(self, filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(self.repo, filename, revision=self.revision))
        except EntryNotFoundError:  # not in the repo, or (offline, hub unreachable) not in the cache
            return None
        except RepositoryNotFoundError as err:  # includes GatedRepoError
            raise WeightsError(
                f"{self} is gated or not visible to this account: accept its terms on "
                f"https://huggingface.co/{self.repo} and run `hf auth login`, or pass a local weights file"
            ) from err
        except RevisionNotFoundError as err:
            raise WeightsError(f"{self}: the repo has no revision {self.revision!r}") from err


@dataclass(frozen=True)
class LocalFile:
    """A checkpoint file on this machine."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def file(self, names: tuple[str, ...] = HUB_WEIGHT_FILES) -> Path:
        """The file itself: ``names`` (a hub repo's file names) do not apply to a local file."""
        if not self.path.is_file():
            raise WeightsError(f"weights file {self.path} does not exist")
        return self.path


WeightSource = RandomInit | BundledStandIn | HubCheckpoint | LocalFile
STAND_IN_SOURCES = (RandomInit, BundledStandIn)  # weights that are no pathology model: a spec with one is a stand-in


def parse_source(text: str) -> WeightSource:
    """The source ``text`` names. Only its form is checked, so a spec may name a file not yet downloaded."""
    if text.startswith("random:"):
        seed = text.removeprefix("random:")
        if not re.fullmatch(r"[0-9]+", seed):
            raise WeightsError(f"weight source {text!r}: the seed must be a non-negative integer, as in random:0")
        return RandomInit(int(seed))
    if text.startswith("bundled:"):
        name = text.removeprefix("bundled:")
        if not re.fullmatch(r"[\w-]+", name):
            raise WeightsError(f"weight source {text!r} must read bundled:NAME, NAME a file stem in {STAND_IN_WEIGHTS}")
        return BundledStandIn(name)
    if text.startswith("hf-hub:"):
        path, at, revision = text.removeprefix("hf-hub:").partition("@")
        org, _, rest = path.partition("/")
        name, _, filename = rest.partition("/")
        repo = f"{org}/{name}"
        if not HUB_REPO.fullmatch(repo) or (at and not revision) or (filename and Path(filename).suffix not in LOCAL_WEIGHT_SUFFIXES):
            raise WeightsError(f"weight source {text!r} must read hf-hub:ORG/NAME, with /FILE (a {' / '.join(LOCAL_WEIGHT_SUFFIXES)} file) or @REVISION after it if need be")
        return HubCheckpoint(repo, revision or None, filename or None)
    if Path(text).suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise WeightsError(f"weight source {text!r} is none of {SOURCE_FORMS}")
    return LocalFile(Path(text))


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A checkpoint file's tensors. timm reads it (safetensors, or torch.load with weights_only) and unwraps
    a training checkpoint as it always does: EMA weights first, DDP / torch.compile key prefixes dropped."""
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except RuntimeError as err:  # timm rewords torch's UnpicklingError (an object that is not a tensor) as one
        raise WeightsError(
            f"{path}: unreadable with torch.load(weights_only=True), which unpickles tensors and nothing else: {err}"
        ) from err
    except SafetensorError as err:
        raise WeightsError(f"{path}: not a readable safetensors file: {err}") from err
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise WeightsError(f"{path} is not a state dict: {len(not_tensors)} entries are not tensors {not_tensors[:5]}")
    return state


def state_dict_for(source: BundledStandIn | HubCheckpoint | LocalFile) -> dict[str, Tensor]:
    """The checkpoint's tensors as stored, for a caller that loads them its own way (the student, through timm)."""
    return read_state_dict(source.file())


def build_strict(
    create: Callable[[], Module], source: WeightSource, what: str,
    hub_files: tuple[str, ...] = HUB_WEIGHT_FILES, load: Callable[[dict[str, Tensor]], Module] | None = None,
) -> tuple[Module, str]:
    """``create()`` holding ``source``'s weights, every key as stored, and the sha256 that names those weights:
    of the file for a checkpoint; of the safetensors serialisation for random weights, so that a stand-in
    saved with ``safetensors.torch.save_file`` keeps its identity. ``hub_files`` are the checkpoint names a
    hub repo is searched for; ``load`` replaces ``create()`` + ``load_strict`` for a library that must map
    the stored keys itself, and must be as strict."""
    if isinstance(source, RandomInit):
        module = source.build(create)
        return module, hashlib.sha256(safetensors.torch.save(module.state_dict())).hexdigest()
    path = source.file(hub_files)
    state = read_state_dict(path)  # before create(): a bad file fails without initialising a billion parameters
    if load is not None:
        return load(state), sha256_file(path)
    module = create()
    load_strict(module, state, f"{source} for {what}")
    return module, sha256_file(path)


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load every key; the error names the first few missing and unexpected keys, not thousands."""
    expected, given = set(module.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{what}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{what}: {err}") from err
