"""A Run on disk: one layout for a CLI output directory, an app download (zip) and a campaign.

    manifest.json      Run.manifest(): model id + hash, requests (targets, prompt, sampling,
                       seed), settings, counts, versions
    results.csv        Run.to_frame(): one row per candidate, checks, scores and flags
    cifs/NAME.cif      the valid candidates
    invalid/NAME.cif   the others: their repaired CIF, or what the model wrote
    repaired/NAME_KIND.cif  the optional repairs' results (rescale, relax), when asked for

`read_run` reads that layout back from a directory or a zip, or takes any folder or zip of
CIF files (a user's own) as an unchecked run; `evaluate` then checks and scores it.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
from crystallm_core.product.run import RUN_FORMAT, Candidate, Run

MANIFEST, TABLE = "manifest.json", "results.csv"
MAX_CIF_BYTES = 1_000_000  # a CIF file larger than this is not read (the model writes ~2 kB)


def candidate_files(candidate: Candidate, include_invalid: bool = True) -> dict[str, str]:
    """Path in the layout -> text, for one candidate's files."""
    files = {}
    if candidate.valid and candidate.cif:
        files[f"cifs/{candidate.file_name}"] = candidate.cif
    elif include_invalid and (candidate.cif or candidate.raw_text):
        files[f"invalid/{candidate.file_name}"] = candidate.cif or candidate.raw_text
    for repair in candidate.repairs:
        if repair.get("cif") and (repair["valid"] or include_invalid):
            files[f"repaired/{candidate.name}_{repair['kind']}.cif"] = repair["cif"]
    return files


def run_files(run: Run, include_invalid: bool = True) -> dict[str, str]:
    """Path in the layout -> text, for every file of the run."""
    files = {MANIFEST: json.dumps(run.manifest(), indent=2, default=str), TABLE: run.to_frame().to_csv(index=False)}
    for candidate in run.candidates:
        files.update(candidate_files(candidate, include_invalid))
    return files


def check_run_dir(out_dir: str | Path) -> Path:
    """A run directory must not hold another run (its files would be mixed with this one's)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (any(out_dir.glob("*.cif")) or (out_dir / MANIFEST).exists()):
        raise ValueError(f"{out_dir} already holds another run; choose a new directory")
    return out_dir


def write_run(run: Run, out_dir: str | Path) -> Path:
    out_dir = check_run_dir(out_dir)
    for name, text in run_files(run).items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return out_dir


def run_zip(run: Run, include_invalid: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in run_files(run, include_invalid).items():
            archive.writestr(name, text)
    return buffer.getvalue()


class RunWriter:
    """Writes a run into its directory as it streams: each candidate's CIF as it arrives and the
    manifest (status "running") after it, results.csv at the end. A run cut short (Ctrl-C,
    kill -9) leaves its finished CIFs and an incomplete manifest, which `resumable` recognises."""

    def __init__(self, run: Run, out_dir: str | Path, resume: bool = False):
        self.run, self.out_dir = run, Path(out_dir)
        if not resume:
            check_run_dir(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.write_manifest()

    def write_manifest(self) -> None:
        path = self.out_dir / MANIFEST
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.run.manifest(), indent=2, default=str))
        temporary.replace(path)  # atomic: a kill never leaves half a manifest

    def add(self, candidate: Candidate) -> None:
        for name, text in candidate_files(candidate).items():
            path = self.out_dir / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        self.write_manifest()

    def finish(self) -> None:
        (self.out_dir / TABLE).write_text(self.run.to_frame().to_csv(index=False))
        self.write_manifest()


def resumable(out_dir: str | Path, requests: list[dict]) -> tuple[dict, list[Candidate]] | None:
    """(manifest, unchecked candidates) of the unfinished run in `out_dir` made by these same
    requests, to continue it; None when the directory holds no run. ValueError when it holds a
    finished run, another run's CIFs, or a run of other settings."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        check_run_dir(out_dir)
        return None
    manifest = read_json((out_dir / MANIFEST).read_text())
    if manifest.get("status") != "running":
        raise ValueError(f"{out_dir} already holds a finished run; choose a new directory")
    if manifest.get("requests") != json.loads(json.dumps(requests, default=str)):
        raise ValueError(f"{out_dir} holds an unfinished run of other settings; choose a new directory")
    candidates = read_run(out_dir).candidates if any(out_dir.glob("*/*.cif")) else []
    return manifest, candidates


def unchecked() -> ValidityReport:
    return ValidityReport([CheckResult("checked", False, "not checked yet")])


def read_run(path: str | Path) -> Run:
    """A run from a directory or zip in the run layout, or from any folder/zip of .cif files.
    ValueError when there is nothing to read."""
    path = Path(path)
    if path.is_dir():
        entries = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        read = lambda name: read_bytes(entries[name].read_bytes, entries[name].stat().st_size)  # noqa: E731
    elif path.is_file() and zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        infos = {info.filename: info for info in archive.infolist() if not info.is_dir()}
        entries = infos
        read = lambda name: read_bytes(lambda: archive.read(name), infos[name].file_size)  # noqa: E731
    else:
        raise ValueError(f"{path} is neither a directory nor a zip file")
    cif_names = sorted(n for n in entries if n.lower().endswith(".cif") and PurePosixPath(n).parent.name in
                       ("", "cifs", "invalid"))
    if not cif_names:
        raise ValueError(f"no .cif files in {path}")
    manifest = read_json(read(MANIFEST)) if MANIFEST in entries else {}
    table = read_table(read(TABLE)) if TABLE in entries else {}
    run = Run(kind=manifest.get("kind", "evaluate") if manifest.get("format") == RUN_FORMAT else "evaluate", model=manifest.get("model"), requests=list(manifest.get("requests") or []),
              settings=dict(manifest.get("settings") or {}), generation=list(manifest.get("generation") or []))
    if manifest.get("format") == RUN_FORMAT:
        run.run_id = manifest.get("run_id", run.run_id)
    default = default_targets(manifest)
    for position, name in enumerate(cif_names):
        stem = PurePosixPath(name).stem
        number = stem.split("_", 1)[0]
        targets = table.get(stem + ".cif", default)
        run.candidates.append(Candidate(int(number) if number.isdigit() else position, stem, read(name), unchecked(),
                                        band_gap_target=targets.get("band_gap"), e_hull_target=targets.get("e_hull")))
    run.candidates.sort(key=lambda c: c.index)
    return run


def read_bytes(reader, size: int) -> str | None:
    """Text of a file, or None when it is too large to be a CIF."""
    if size > MAX_CIF_BYTES:
        return None
    return reader().decode("utf-8", errors="replace")


BINARY_SIGNATURES = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file", b"%PDF": "a PDF",
                     b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image"}


def uploaded_cif_text(data: bytes) -> str:
    """The text of an uploaded CIF; ValueError saying what it is when it is not one (too big,
    an archive or other binary file, no data_ block). Non-UTF-8 text is read as Latin-1."""
    if len(data) > MAX_CIF_BYTES:
        raise ValueError(f"the file is {len(data) / 1e6:.1f} MB; CIFs over {MAX_CIF_BYTES / 1e6:g} MB are not read "
                         "(the model writes ~2 kB)")
    for signature, kind in BINARY_SIGNATURES.items():
        if data.startswith(signature):
            hint = " Unpack it and upload one .cif from it." if kind.endswith(("zip archive", "gzip file")) else ""
            raise ValueError(f"this is {kind}, not a CIF.{hint}")
    if b"\x00" in data:
        raise ValueError("this is a binary file, not a CIF (a CIF is plain text)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if not text.strip():
        raise ValueError("the file is empty")
    if "data_" not in text:
        raise ValueError("this is not a CIF: it has no data_ block")
    return text


def read_json(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_table(text: str | None) -> dict[str, dict]:
    """file -> {band_gap, e_hull} targets from a run's results.csv."""
    try:
        frame = pd.read_csv(io.StringIO(text or ""))
    except (ValueError, pd.errors.ParserError):
        return {}
    if "file" not in frame:
        return {}
    targets = {}
    for row in frame.to_dict("records"):
        targets[str(row["file"])] = {key: float(row[f"{key}_target"]) for key in ("band_gap", "e_hull")
                                     if f"{key}_target" in row and pd.notna(row[f"{key}_target"])}
    return targets


def default_targets(manifest: dict) -> dict:
    """The targets every file shares: those of a single-request run (or an older manifest's)."""
    requests = manifest.get("requests") or []
    if len(requests) == 1 and isinstance(requests[0], dict):
        return {k: requests[0].get(k) for k in ("band_gap", "e_hull") if isinstance(requests[0].get(k), (int, float))}
    targets = manifest.get("targets")
    if isinstance(targets, dict):
        return {k: float(v) for k, v in targets.items() if k in ("band_gap", "e_hull") and isinstance(v, (int, float))}
    return {}
