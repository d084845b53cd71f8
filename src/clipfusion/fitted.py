"""The fitted-detector folder: its format, read and written, and the checks a folder must pass before its
state is used. :meth:`CLIPFusion.save` and :meth:`CLIPFusion.load` assemble a detector from it; this module
knows nothing of the detector.

Fitting is cheap next to scoring a plant's archive, but it has to be the *same* fit everywhere the detector
runs (every Ray worker, every server process, next year's audit): so the fit is saved once, with everything
that decides its answers except the large model weights, which stay in the weights folder or cache they came
from and are checked, not copied. Layout of a fitted folder (format 1)::

    DIR/detector.json          what this is: format, object name, references (names, sha256), per branch
                               its state's meta and the fingerprint of the weights it was fitted with,
                               software versions, and the sha256 of every other file below
    DIR/config.json            the configuration (as ``clipfusion config`` writes it)
    DIR/clip.safetensors       PatchCLIP: text features of the object; memory bank (few-shot)
    DIR/diffusion.safetensors  MapDiff: prompt token ids and embeddings per state word; memory bank
    DIR/thresholds.json        calibrated thresholds (only when calibrated)

Only JSON and safetensors are ever read (no pickle). Reading refuses, with one line, a folder that is not a
fitted detector, is of a later format, misses a file or holds a file changed since saving; loading refuses
weights that differ from the fit's (weights-folder manifest hashes where one was used, and always a
fingerprint of the loaded tensors).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clipfusion.branches import BranchState
from clipfusion.config import CLIPFusionConfig, load_config
from clipfusion.errors import ConfigError, InputError
from clipfusion.files import atomic_write_bytes, atomic_write_text, read_json, sha256_file
from clipfusion.provenance import __version__, software_versions
from clipfusion.thresholds import Thresholds

FORMAT = 1
KIND = "clipfusion-fitted-detector"
DETECTOR_FILE = "detector.json"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
#: the only kinds of file a fitted folder holds (and the only ones loading reads)
SUFFIXES = (".json", ".safetensors")
#: the branches a fitted folder may hold a state of
BRANCHES = ("clip", "diffusion")


#: names of fitted objects (served under them, routed to by them): characters that need no escaping in a URL
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def branch_file(name: str) -> str:
    return f"{name}.safetensors"


@dataclass(frozen=True)
class FittedBranch:
    """One branch of a fit as it is saved: its state, the fingerprint of the weights that state was computed
    with, and where those weights came from (:func:`weights_source`)."""

    state: BranchState
    fingerprint: str
    source: dict[str, Any]


@dataclass(frozen=True)
class FittedRecord:
    """A fitted folder, checked and parsed, before any model is loaded."""

    path: Path
    config: CLIPFusionConfig
    record: dict[str, Any]
    thresholds: Thresholds | None

    @property
    def object_name(self) -> str:
        return str(self.record["object_name"])

    @property
    def references(self) -> list[dict[str, Any]]:
        return list(self.record.get("references", []))

    @property
    def reference_names(self) -> list[str]:
        return [str(ref.get("name")) for ref in self.references]

    def branch_path(self, branch: str) -> Path:
        return self.path / str(self.record["branches"][branch]["file"])

    def check_weights_folder(self, branch: str, weights_dir: Path | None) -> None:
        """Before any model is loaded: the weights folder's manifest must list the files the fit used with
        the same sha256 (a folder without a manifest is checked by the fingerprint alone)."""
        if weights_dir is None:
            return
        from clipfusion.models.weights import manifest_files

        source = self.record["branches"][branch]["weights"].get("source")
        recorded = source.get("weights_dir_files") if isinstance(source, dict) else None
        if not isinstance(recorded, dict) or not recorded:
            return
        found = manifest_files(weights_dir)
        for rel, sha in sorted(recorded.items()):
            if rel in found and found[rel] != sha:
                raise ConfigError(
                    f"{self.path}: the {branch} weights differ from the fit's: {weights_dir / rel} has "
                    f"sha256 {found[rel][:12]}…, the detector was fitted with {sha[:12]}…; use the weights "
                    "folder the fit used, or fit again"
                )

    def check_fingerprint(
        self, branch: str, found: str, config: CLIPFusionConfig, weights_dir: Path | None
    ) -> None:
        """The loaded weights' fingerprint (``found``) must be the fit's; else one line saying which weights
        were found (those ``config`` and ``weights_dir`` point at) and which the fit used."""
        entry = self.record["branches"][branch]["weights"]
        if found != entry["fingerprint"]:
            saved = _describe(entry.get("source", {}))
            now = _describe(weights_source(config, weights_dir, branch))
            raise ConfigError(
                f"{self.path}: the {branch} weights found ({now}; fingerprint {found[:12]}) are not the "
                f"ones the detector was fitted with ({saved}; fingerprint {entry['fingerprint'][:12]}); load "
                "with the weights the fit used, or fit again"
            )

    def branch_state(self, branch: str) -> BranchState:
        """The saved state of one branch (its safetensors tensors, on the CPU, and its meta)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self.branch_path(branch)
        try:
            tensors = load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{file}: not a readable safetensors file ({exc})") from exc
        return BranchState(tensors, dict(self.record["branches"][branch]["meta"]))


class _Weighed(Protocol):
    """What :func:`weights_source` needs of the weights' configuration."""

    @property
    def clip(self) -> Any: ...

    @property
    def diffusion(self) -> Any: ...


def weights_source(config: _Weighed, weights_dir: Path | None, branch: str) -> dict[str, Any]:
    """Where a branch's weights come from, as the configuration and weights folder say: recorded at save
    time, and used to say what differs when loading meets other weights."""
    from clipfusion.models.weights import SD_SUBDIR, clip_subdir, manifest_files

    if branch == "clip":
        clip = config.clip
        if clip.weights == "random":
            return {"weights": "random", "model": clip.model, "init_seed": clip.init_seed}
        source: dict[str, Any] = {"weights": "pretrained", "model": clip.model, "checkpoint": clip.checkpoint}
        subdir = clip_subdir(clip.model, clip.checkpoint)
    else:
        diffusion = config.diffusion
        if diffusion.weights == "random":
            return {
                "weights": "random",
                "architecture": diffusion.architecture,
                "init_seed": diffusion.init_seed,
            }
        source = {"weights": "pretrained", "model": diffusion.model, "revision": diffusion.revision}
        subdir = SD_SUBDIR
    if weights_dir is not None:
        source["weights_dir"] = str(weights_dir)
        source["weights_dir_files"] = manifest_files(weights_dir, subdir)
    return source


def _describe(source: dict[str, Any]) -> str:
    if source.get("weights") == "random":
        arch = source.get("model") or source.get("architecture")
        return f"random {arch}, init_seed {source.get('init_seed')}"
    where = f" from {source['weights_dir']}" if source.get("weights_dir") else ""
    name = source.get("checkpoint") or source.get("model")
    return f"pretrained {name}{where}"


# -------------------------------------------------------------------------------------------------------
# writing


def write(
    directory: str | Path,
    *,
    config: CLIPFusionConfig,
    object_name: str,
    references: Sequence[tuple[str, str | None]],
    branches: Mapping[str, FittedBranch],
    thresholds: Thresholds | None = None,
) -> Path:
    """Write a fitted folder (see the module docstring): the configuration, one safetensors file per branch
    state, the thresholds, and ``detector.json``; ``references`` are ``(name, sha256 or None)`` pairs.

    Every file is written atomically and ``detector.json``, which holds the others' sha256, last: a save
    that is interrupted leaves a folder that reading refuses, never one that loads wrongly. An existing
    fitted folder is replaced, its thresholds too when none are given (``clipfusion fit`` asks for
    ``--overwrite`` first); any other non-empty folder is refused. Thresholds made for another
    configuration or object are refused before anything is written.
    """
    from safetensors.torch import save as safetensors_bytes

    directory = Path(directory)
    config_dict = config.to_dict()
    if thresholds is not None:
        thresholds.check_config(config_dict)
        if thresholds.object_name is not None and thresholds.object_name != object_name:
            raise ConfigError(
                f"save: the thresholds were calibrated for {thresholds.object_name!r}, the detector is "
                f"fitted for {object_name!r}"
            )
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / DETECTOR_FILE).is_file():
        raise InputError(f"{directory}: not empty and not a fitted detector; choose a new or empty folder")
    directory.mkdir(parents=True, exist_ok=True)

    files: dict[str, str] = {}

    def put(name: str, payload: bytes) -> None:
        atomic_write_bytes(directory / name, payload)
        files[name] = hashlib.sha256(payload).hexdigest()

    put(CONFIG_FILE, (json.dumps(config_dict, indent=2) + "\n").encode())
    saved: dict[str, Any] = {}
    for name, branch in branches.items():
        # clones: safetensors refuses tensors that share storage, and views of a larger tensor
        tensors = {
            key: value.detach().cpu().contiguous().clone() for key, value in branch.state.tensors.items()
        }
        put(branch_file(name), safetensors_bytes(tensors, metadata={"format": str(FORMAT)}))
        saved[name] = {
            "file": branch_file(name),
            "meta": branch.state.meta,
            "weights": {"fingerprint": branch.fingerprint, "source": branch.source},
        }
    if thresholds is not None:
        put(THRESHOLDS_FILE, thresholds.to_json().encode())
    record = {
        "format": FORMAT,
        "kind": KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "object_name": object_name,
        "shots": len(references),
        "references": [{"name": name, "sha256": sha} for name, sha in references],
        "branches": saved,
        "thresholds": THRESHOLDS_FILE if thresholds is not None else None,
        "random_weights": config.random_weights,
        "versions": software_versions(),
        "files": files,
    }
    # files of an earlier save that this one does not rewrite (thresholds, a branch switched off) would
    # otherwise look like part of the new detector to a reader
    for stale in (THRESHOLDS_FILE, *(branch_file(b) for b in BRANCHES)):
        if stale not in files:
            (directory / stale).unlink(missing_ok=True)
    atomic_write_text(directory / DETECTOR_FILE, json.dumps(record, indent=2) + "\n")
    return directory


# -------------------------------------------------------------------------------------------------------
# reading


def read(directory: str | Path) -> FittedRecord:
    """Check and parse a fitted folder without loading any model: quick, so commands can refuse a bad
    ``--fitted`` before any other work."""
    path = Path(directory)
    if not path.is_dir():
        raise InputError(f"{path}: no such folder (a fitted detector is a folder made by `clipfusion fit`)")
    meta_path = path / DETECTOR_FILE
    if not meta_path.is_file():
        raise InputError(
            f"{path}: not a fitted clipfusion detector (no {DETECTOR_FILE}); make one with `clipfusion fit`"
        )
    record = read_json(meta_path, "fitted detector record")
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise InputError(f"{meta_path}: not a fitted clipfusion detector")
    version = record.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{meta_path}: no valid format version")
    if version > FORMAT:
        raise InputError(
            f"{path}: fitted detector format {version}; this clipfusion ({__version__}) reads format "
            f"{FORMAT} and older: upgrade clipfusion"
        )
    files = record.get("files")
    branches = record.get("branches")
    if (
        not isinstance(files, dict)
        or not isinstance(branches, dict)
        or not isinstance(record.get("object_name"), str)
        or not isinstance(record.get("references", []), list)
    ):
        raise InputError(f"{meta_path}: malformed (files, branches, object_name or references missing)")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(SUFFIXES):
            raise InputError(f"{meta_path}: lists {name!r}, which is not a file a fitted detector holds")
    for name, sha in files.items():
        file = path / name
        if not file.is_file():
            raise InputError(f"{path}: incomplete fitted detector: {name} is missing")
        if sha256_file(file) != sha:
            raise InputError(
                f"{file}: changed since the detector was saved (sha256 differs from {DETECTOR_FILE})"
            )
    if CONFIG_FILE not in files:
        raise InputError(f"{meta_path}: malformed ({CONFIG_FILE} not listed)")
    config = load_config(path / CONFIG_FILE)
    needed = [n for n, used in (("clip", config.use_clip), ("diffusion", config.use_diffusion)) if used]
    for name in needed:
        entry = branches.get(name)
        if (
            not isinstance(entry, dict)
            or entry.get("file") not in files
            or not isinstance(entry.get("meta"), dict)
            or not isinstance(entry.get("weights"), dict)
            or not isinstance(entry["weights"].get("fingerprint"), str)
        ):
            raise InputError(f"{meta_path}: malformed (no saved state of the {name} branch)")
    thresholds = None
    if record.get("thresholds"):
        if record["thresholds"] not in files:
            raise InputError(f"{meta_path}: malformed ({record['thresholds']} not listed)")
        thresholds = Thresholds.load(path / str(record["thresholds"]))
        thresholds.check_config(config.to_dict(), where=str(path / str(record["thresholds"])))
    return FittedRecord(path, config, record, thresholds)


def parse_fitted(specs: Iterable[str | Path]) -> dict[str, Path]:
    """``DIR`` or ``NAME=DIR`` → {name: folder}: the fitted objects of a server or a prediction run, by the
    name requests and input lists use; a plain ``DIR`` is named after its last component."""
    named: dict[str, Path] = {}
    for spec in specs:
        text = str(spec)
        name, sep, rest = text.partition("=")
        if sep and rest and "/" not in name and "\\" not in name:
            path = Path(rest)  # NAME=DIR (a folder whose path has "=" in it has a "/" before it)
        else:
            path = Path(text)
            name = path.resolve().name
        if not NAME_PATTERN.match(name):
            raise ConfigError(
                f"--fitted {text}: {name!r} is not a usable detector name (letters, digits, '.', '_', '-'); "
                "name it with NAME=DIR"
            )
        if name in named:
            raise ConfigError(f"--fitted: two detectors named {name!r}; name them with NAME=DIR")
        named[name] = path
    if not named:
        raise ConfigError("--fitted: give at least one fitted detector folder")
    return named


def describe_existing(directory: str | Path) -> str:
    """What a fitted folder already holds, in a few words (``"'bottle cap', 2-shot, calibrated thresholds
    from 20 images, 2025-06-01T10:00:00Z"``), or ``""`` when it holds none: what replacing it would lose."""
    path = Path(directory) / DETECTOR_FILE
    if not path.is_file():
        return ""
    try:
        record = read_json(path, "fitted detector record")
        shots = int(record.get("shots", 0))
        parts = [repr(str(record.get("object_name"))), f"{shots}-shot" if shots else "zero-shot"]
        if record.get("thresholds"):
            thresholds = Thresholds.load(Path(directory) / str(record["thresholds"]))
            made = f"calibrated on {thresholds.n_images} images" if not thresholds.by_hand else "set by hand"
            parts.append(f"thresholds {made}")
        if record.get("created"):
            parts.append(f"saved {record['created']}")
    except (InputError, AttributeError, TypeError, ValueError):
        return "unreadable record"
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------------
# the detector's own methods, under the names this module had before the detector assembled itself


class _Saves(Protocol):
    def save(self, directory: str | Path, thresholds: Thresholds | None = None) -> Path: ...


def save(detector: _Saves, directory: str | Path, thresholds: Thresholds | None = None) -> Path:
    """``detector.save(directory, thresholds)``: a new or empty folder, or an existing fitted detector,
    which is replaced (its thresholds too when none are given). ``clipfusion fit`` asks for ``--overwrite``
    before it replaces one."""
    return detector.save(directory, thresholds)


def load(cls: Any, directory: str | Path, **options: Any) -> Any:
    """``cls.load(directory, **options)``: a detector class (:class:`~clipfusion.CLIPFusion`) loads a
    folder this module reads."""
    return cls.load(directory, **options)


__all__ = [
    "DETECTOR_FILE",
    "FORMAT",
    "NAME_PATTERN",
    "FittedBranch",
    "FittedRecord",
    "branch_file",
    "describe_existing",
    "load",
    "parse_fitted",
    "read",
    "save",
    "weights_source",
    "write",
]
