"""``mmfusion index ...``: bulk import, stats and rebuild of the vector index (torch-free).

These commands open the index directory themselves, so the server must not be running on it at
the same time (the index's directory lock refuses a second user with a clear message); while
the server runs, use ``POST /v1/index/items/batch`` and ``GET /v1/index`` instead.

Embedding uses the bundle's ONNX encoders through :class:`app.inference.pipeline.ModelPipeline`
and the serving code's rule (:func:`app.api.routes.search.embed_mixed`), so an imported item is
stored exactly as the API would store it, including the ``_source`` record (how it was embedded,
and the absolute image path) that lets ``rebuild`` re-embed it under a new bundle.

Exit codes: 0 success; 1 some rows/items failed (the good ones are imported; a rebuild with
unrebuildable items changes nothing unless ``--drop-unrebuildable``); 2 nothing could be done
(bad arguments, unreadable manifest, invalid bundle, index locked, corrupt or of another bundle).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import errno
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import MMFusionError

if TYPE_CHECKING:
    import numpy as np

    from app.core.config import Settings
    from app.index import VectorIndex
    from app.inference.pipeline import ModelPipeline

DEFAULT_BATCH = 32
MANIFEST_COLUMNS = ("id", "image", "text", "metadata")


class CLIError(Exception):
    """A problem that stops the command (exit 2), with a message for the operator."""


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    from app.core.config import Settings

    settings = Settings()
    update: dict[str, Any] = {}
    if args.bundle is not None:
        update["bundle"] = Path(args.bundle)
    if args.index_path is not None:
        update["index_path"] = Path(args.index_path)
    return settings.model_copy(update=update)


def _pipeline(settings: Settings) -> ModelPipeline:
    from app.inference.pipeline import ModelPipeline

    try:
        return ModelPipeline(settings.bundle, settings)
    except MMFusionError as exc:
        raise CLIError(f"cannot load the bundle: {exc}") from None


def _open_index(path: Path, name: str, version: str, dim: int, *, fingerprint: str | None = None,
                durable: bool = True) -> VectorIndex:
    from app.index import IndexLockedError, IndexStoreError, VectorIndex

    try:
        return VectorIndex.open(path, bundle_name=name, bundle_version=version, dim=dim,
                                embedding_fingerprint=fingerprint, durable=durable)
    except IndexLockedError as exc:
        raise CLIError(f"{exc} If the server is running on this index, stop it first, or use the HTTP API "
                       "(POST /v1/index/items/batch, GET /v1/index).") from None
    except IndexStoreError as exc:
        raise CLIError(str(exc)) from None


def _load_pixels(path: Path, settings: Settings, pipeline: ModelPipeline) -> np.ndarray:
    """Read + decode one image file with the serving decoder; errors say which file and why."""
    from app.preprocessing.image import decode_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    try:
        return decode_image(data, pipeline.manifest.image, max_pixels=settings.max_image_pixels, field="image")
    except MMFusionError as exc:
        raise ValueError(f"image file {path}: {exc.message}") from None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not enabled or None, leave=False)


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _decode_all(pool: ThreadPoolExecutor, paths: Sequence[Path | None],
                load: Callable[[Path], np.ndarray]) -> list[np.ndarray | Exception | None]:
    """Decode the given files concurrently; each slot is pixels, the error, or None (no image)."""
    futures: list[Future[np.ndarray] | None] = [pool.submit(load, p) if p is not None else None for p in paths]
    out: list[np.ndarray | Exception | None] = []
    for fut in futures:
        if fut is None:
            out.append(None)
            continue
        try:
            out.append(fut.result())
        except (ValueError, MMFusionError) as exc:
            out.append(exc)
    return out


def _emit(report: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(report, indent=2) if as_json else human(report))


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One manifest row; ``error`` is set when the row could not even be parsed."""

    line: int
    id: str | None = None
    image: str | None = None
    text: str | None = None
    metadata: object = None
    error: str | None = None


def _blank_to_none(value: object) -> object:
    return None if value is None or (isinstance(value, str) and value.strip() == "") else value


def read_manifest(path: Path, fmt: str = "auto") -> list[Row]:
    """CSV (header with ``id`` and any of ``image``, ``text``, ``metadata``) or JSONL (one object per
    line with those keys; ``metadata`` an object or its JSON text). Blank cells are absent values."""
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read manifest {path}: {exc}") from None
    rows: list[Row] = []
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted cells may hold newlines
        columns = reader.fieldnames or []
        unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
        if "id" not in columns or unknown:
            raise CLIError(f"manifest {path}: the CSV header must have 'id' and only columns {list(MANIFEST_COLUMNS)}"
                           f" (found {columns})")
        for record in reader:
            line = reader.line_num
            if None in record:
                rows.append(Row(line=line, error=f"{len(record[None])} more cells than header columns"))
                continue
            rows.append(Row(line=line, id=_blank_to_none(record.get("id")),  # type: ignore[arg-type]
                            image=_blank_to_none(record.get("image")),  # type: ignore[arg-type]
                            text=_blank_to_none(record.get("text")),  # type: ignore[arg-type]
                            metadata=_blank_to_none(record.get("metadata"))))
        return rows
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 etc. are valid inside JSON
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            rows.append(Row(line=line, error=f"not valid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row(line=line, error="each line must be a JSON object"))
            continue
        unknown = sorted(set(obj) - set(MANIFEST_COLUMNS))
        if unknown:
            rows.append(Row(line=line, id=obj.get("id") if isinstance(obj.get("id"), str) else None,
                            error=f"unknown key(s) {unknown}; expected {list(MANIFEST_COLUMNS)}"))
            continue
        for key in ("id", "image", "text"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                rows.append(Row(line=line, error=f"{key} must be a string"))
                break
        else:
            rows.append(Row(line=line, id=_blank_to_none(obj.get("id")), image=_blank_to_none(obj.get("image")),  # type: ignore[arg-type]
                            text=obj.get("text"), metadata=_blank_to_none(obj.get("metadata"))))
    return rows


@dataclass
class Prepared:
    row: Row
    id: str
    image_path: Path | None
    text: str | None
    metadata: dict[str, Any]


@dataclass
class Report:
    failures: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, row: Row, reason: str, item_id: str | None = None) -> None:
        self.failures.append({"line": row.line, "id": item_id or row.id, "reason": reason})


def _prepare(row: Row, base_dir: Path, seen: dict[str, int], max_text_chars: int) -> Prepared:
    """Validate one row like the API validates one item; raises ValueError(reason)."""
    from app.api.payload import check_text
    from app.api.routes.index import client_metadata
    from app.index import validate_item_id

    if row.error is not None:
        raise ValueError(row.error)
    try:
        item_id = validate_item_id(row.id if row.id is not None else "", for_write=True)
        if item_id in seen:
            raise ValueError(f"id {item_id!r} is repeated in the manifest (first on line {seen[item_id]})")
        text = check_text(row.text, max_text_chars, required=False)
        metadata = client_metadata(row.metadata)
    except MMFusionError as exc:
        raise ValueError(exc.message) from None
    image = None
    if row.image is not None:
        image = Path(row.image).expanduser()
        image = (image if image.is_absolute() else base_dir / image).resolve()
    if image is None and text is None:
        raise ValueError("the row has neither an image nor a text")
    seen[item_id] = row.line
    return Prepared(row=row, id=item_id, image_path=image, text=text, metadata=metadata)


def cmd_import(args: argparse.Namespace) -> int:
    from app.api.routes.index import stored_metadata
    from app.api.routes.search import embed_mixed

    settings = _settings(args)
    manifest_path = Path(args.manifest)
    rows = read_manifest(manifest_path, args.format)
    base_dir = Path(args.base_dir).resolve() if args.base_dir else manifest_path.resolve().parent
    pipeline = _pipeline(settings)
    m = pipeline.manifest
    index = _open_index(settings.index_path, m.name, m.version, m.embedding_dim,
                        fingerprint=m.embedding_fingerprint())
    report = Report()
    added = replaced = 0
    t0 = time.perf_counter()
    seen: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode") as pool, \
                _progress(len(rows), "import", not args.no_progress) as bar:
            for chunk in _chunks(len(rows), args.batch_size):
                batch: list[Prepared] = []
                for row in (rows[i] for i in chunk):
                    try:
                        batch.append(_prepare(row, base_dir, seen, settings.max_text_chars))
                    except ValueError as exc:
                        report.fail(row, str(exc))
                decoded = _decode_all(pool, [p.image_path for p in batch],
                                      lambda path: _load_pixels(path, settings, pipeline))
                good = []
                for prep, pixels in zip(batch, decoded, strict=True):
                    if isinstance(pixels, Exception):
                        report.fail(prep.row, str(pixels), prep.id)
                    else:
                        good.append((prep, pixels))
                if good:
                    vectors, kinds, _ = embed_mixed(pipeline, [g[1] for g in good], [g[0].text for g in good])
                    ids, texts, metas, keep = [], [], [], []
                    for j, ((prep, _), kind) in enumerate(zip(good, kinds, strict=True)):
                        try:
                            metas.append(stored_metadata(prep.id, prep.metadata, kind,
                                                         str(prep.image_path) if prep.image_path else None))
                        except MMFusionError as exc:
                            report.fail(prep.row, exc.message, prep.id)
                            continue
                        ids.append(prep.id)
                        texts.append(prep.text)
                        keep.append(j)
                    if ids:
                        try:
                            new = index.add_batch(ids, vectors[keep], texts=texts, metadata=metas)
                        except MMFusionError as exc:
                            for j in keep:
                                prep = good[j][0]
                                report.fail(prep.row, f"the index refused the batch: {exc.message}", prep.id)
                        else:
                            added += new
                            replaced += len(ids) - new
                bar.update(len(chunk))
    finally:
        count = index.count
        index.close()
    out = {
        "manifest": str(manifest_path), "index_path": str(settings.index_path),
        "bundle": {"name": m.name, "version": m.version},
        "rows": len(rows), "added": added, "replaced": replaced, "failed": len(report.failures),
        "failures": sorted(report.failures, key=lambda f: f["line"]), "count": count,
        "seconds": round(time.perf_counter() - t0, 3),
    }

    def human(r: dict[str, Any]) -> str:
        lines = [f"imported {r['added'] + r['replaced']} of {r['rows']} rows into {r['index_path']} "
                 f"(new {r['added']}, replaced {r['replaced']}; {r['count']} items now) with bundle "
                 f"{m.name} {m.version} in {r['seconds']:.1f}s"]
        if r["failures"]:
            lines.append(f"{r['failed']} rows failed:")
            lines += [f"  line {f['line']} (id {f['id']!r}): {f['reason']}" for f in r["failures"]]
        return "\n".join(lines)

    _emit(out, args.json, human)
    return 1 if report.failures else 0


# --------------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How to re-embed one item, or why it cannot be."""

    id: str
    text: str | None
    metadata: dict[str, Any]
    image_path: Path | None = None
    embedded_from: str | None = None
    problem: str | None = None

    def uses(self, modality: str) -> bool:
        return modality in (self.embedded_from or "").split("+")


def plan_item(item_id: str, text: str | None, metadata: dict[str, Any]) -> Plan:
    """Read the ``_source`` record the API / import stored with the item."""
    from app.api.routes.search import SOURCE_KEY

    plan = Plan(id=item_id, text=text, metadata=metadata)
    if item_id in (".", ".."):  # stored before such ids were refused; a new index cannot take them
        plan.problem = (f"id {item_id!r} can no longer be written (clients drop it from URLs); "
                        "re-add it under another id")
        return plan
    source = metadata.get(SOURCE_KEY)
    if not isinstance(source, dict) or not isinstance(source.get("embedded_from"), str):
        plan.problem = ("no recorded source (the item was not added through the API or `mmfusion index import`, "
                        "e.g. it came from a bundle's seed index)")
        return plan
    kind = source["embedded_from"]
    plan.embedded_from = kind
    if kind not in ("image", "text", "image+text"):
        plan.problem = f"unknown embedded_from {kind!r}"
    elif plan.uses("text") and text is None:
        plan.problem = "embedded from a text, but no text is stored"
    elif plan.uses("image"):
        path = source.get("image_path")
        if not isinstance(path, str):
            plan.problem = ("embedded from an uploaded image, which is not kept; re-add it "
                            "(POST /v1/index/items) or import it from a file")
        elif not Path(path).is_file():
            plan.problem = f"image file {path} no longer exists"
        else:
            plan.image_path = Path(path)
    return plan


def _index_identity(path: Path) -> Any:
    from app.index import MANIFEST_FILE, IndexManifest, IndexStoreError

    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CLIError(f"there is no index at {path} ({MANIFEST_FILE} is missing)")
    try:
        return IndexManifest.load(manifest_path)
    except IndexStoreError as exc:
        raise CLIError(str(exc)) from None


def cmd_stats(args: argparse.Namespace) -> int:
    from app.bundle.verify import load_bundle_manifest
    from app.index import IndexStoreError

    settings = _settings(args)
    path = settings.index_path
    out: dict[str, Any] = {"path": str(path), "exists": (path / "index.json").is_file()}
    loaded = None
    loaded_fingerprint: str | None = None
    try:
        bm = load_bundle_manifest(settings.bundle, check_hashes=False)
        loaded = (bm.name, bm.version, bm.embedding_dim)
        loaded_fingerprint = bm.embedding_fingerprint()
        out["loaded_bundle"] = {"name": bm.name, "version": bm.version, "dim": bm.embedding_dim,
                                "embedding_fingerprint": loaded_fingerprint}
    except MMFusionError as exc:
        out["loaded_bundle"] = None
        out["bundle_problem"] = str(exc)
    if not out["exists"]:
        out["problem"] = f"there is no index at {path}"
        print(json.dumps(out, indent=2))
        return 1
    try:
        ident = _index_identity(path)
    except CLIError as exc:
        out["problem"] = str(exc)
        print(json.dumps(out, indent=2))
        return 1
    out["index_bundle"] = {"name": ident.bundle_name, "version": ident.bundle_version, "dim": ident.dim,
                           "embedding_fingerprint": ident.embedding_fingerprint}
    out["compatible"] = None if loaded is None else ident.accepts(loaded, loaded_fingerprint)  # as the server decides
    if out["compatible"] is False:
        out["problem"] = ("the index was built by another bundle than --bundle / MMFUSION_BUNDLE; "
                          "run `mmfusion index rebuild` to re-embed it")
    try:
        # Opened with the index's own identity: stats never need (or depend on) the bundle.
        index = _open_index(path, ident.bundle_name, ident.bundle_version, ident.dim)
    except CLIError as exc:
        out["problem"] = str(exc)
        print(json.dumps(out, indent=2))
        return 1
    try:
        out.update({k: v for k, v in index.stats().to_dict().items() if k not in ("path", "closed")})
        sources: dict[str, int] = {}
        rebuildable = 0
        for item_id in index.ids():
            try:
                item = index.get(item_id)
            except IndexStoreError:
                continue
            plan = plan_item(item_id, item.text, item.metadata)
            key = plan.embedded_from or "unknown"
            sources[key] = sources.get(key, 0) + 1
            rebuildable += plan.problem is None
        out["sources"] = sources
        out["rebuildable"] = rebuildable
    finally:
        index.close()
    print(json.dumps(out, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# rebuild
# --------------------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories. Atomic (``renameat2(RENAME_EXCHANGE)``) on Linux, so ``a`` always
    names a complete index; elsewhere two renames, with a moment where ``a`` is missing. Returns
    whether the swap was atomic."""
    from app.index.wal import fsync_dir

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        if rc == 0:
            fsync_dir(a.parent)
            return True
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
    parked = a.with_name(a.name + ".swap")
    os.rename(a, parked)
    os.rename(b, a)
    os.rename(parked, b)
    fsync_dir(a.parent)
    return False


def cmd_rebuild(args: argparse.Namespace) -> int:
    from app.api.routes.search import embed_mixed

    settings = _settings(args)
    path = settings.index_path
    old_ident = _index_identity(path)
    pipeline = _pipeline(settings)
    m = pipeline.manifest
    t0 = time.perf_counter()
    old = _open_index(path, old_ident.bundle_name, old_ident.bundle_version, old_ident.dim, durable=False)
    problems: list[dict[str, str]] = []
    rebuilt = 0
    tmp = path.parent / f".{path.name}.rebuild"
    try:
        plans: list[Plan] = []
        for item_id in sorted(old.ids()):
            item = old.get(item_id)
            plan = plan_item(item_id, item.text, item.metadata)
            if plan.problem is not None:
                problems.append({"id": item_id, "reason": plan.problem})
            else:
                plans.append(plan)
        total = old.count
        if not args.dry_run and (not problems or args.drop_unrebuildable):
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of an interrupted rebuild: never part of the live index
            new = _open_index(tmp, m.name, m.version, m.embedding_dim, fingerprint=m.embedding_fingerprint(),
                              durable=False)
            try:
                with ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode") as pool, \
                        _progress(len(plans), "rebuild", not args.no_progress) as bar:
                    for chunk in _chunks(len(plans), args.batch_size):
                        batch = [plans[i] for i in chunk]
                        decoded = _decode_all(pool, [p.image_path for p in batch],
                                              lambda p: _load_pixels(p, settings, pipeline))
                        good = []
                        for plan, pixels in zip(batch, decoded, strict=True):
                            if isinstance(pixels, Exception):
                                problems.append({"id": plan.id, "reason": str(pixels)})
                            else:
                                good.append((plan, pixels))
                        if good:
                            vectors, _, _ = embed_mixed(
                                pipeline, [pixels if plan.uses("image") else None for plan, pixels in good],
                                [plan.text if plan.uses("text") else None for plan, _ in good])
                            new.add_batch([g[0].id for g in good], vectors, texts=[g[0].text for g in good],
                                          metadata=[g[0].metadata for g in good])
                            rebuilt += len(good)
                        bar.update(len(batch))
            finally:
                new.close()  # compacts: one fsynced snapshot
    finally:
        old.close()

    swapped = False
    atomic = None
    kept = None
    if not args.dry_run and (not problems or args.drop_unrebuildable):
        atomic = exchange_dirs(path, tmp)
        swapped = True
        if args.keep_old:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            kept = path.with_name(f"{path.name}.before-rebuild-{stamp}")
            os.rename(tmp, kept)
        else:
            shutil.rmtree(tmp)
    elif tmp.exists():
        shutil.rmtree(tmp)

    out = {
        "index_path": str(path), "dry_run": args.dry_run, "swapped": swapped, "atomic_swap": atomic,
        "from_bundle": {"name": old_ident.bundle_name, "version": old_ident.bundle_version, "dim": old_ident.dim,
                        "embedding_fingerprint": old_ident.embedding_fingerprint},
        "to_bundle": {"name": m.name, "version": m.version, "dim": m.embedding_dim},
        "items": total, "rebuilt": rebuilt, "unrebuildable": len(problems), "problems": problems,
        "old_index_kept_at": str(kept) if kept else None, "seconds": round(time.perf_counter() - t0, 3),
    }

    def human(r: dict[str, Any]) -> str:
        if r["dry_run"]:
            head = (f"dry run: {r['items'] - r['unrebuildable']} of {r['items']} items can be re-embedded with "
                    f"{m.name} {m.version}")
        elif r["swapped"]:
            head = (f"rebuilt {r['rebuilt']} of {r['items']} items with {m.name} {m.version} in {r['seconds']:.1f}s "
                    f"and swapped them into {path}" + ("" if atomic else " (non-atomic swap)"))
        else:
            head = (f"nothing changed: {r['unrebuildable']} of {r['items']} items cannot be re-embedded; fix them, or "
                    "rerun with --drop-unrebuildable to rebuild without them")
        lines = [head]
        if r["problems"]:
            lines.append(f"{r['unrebuildable']} items {'dropped' if swapped else 'cannot be re-embedded'}:")
            lines += [f"  {p['id']}: {p['reason']}" for p in r["problems"]]
            if any("seed index" in p["reason"] for p in r["problems"]):
                lines.append("(an index seeded from a bundle is re-seeded from the new bundle if you delete the "
                             "index directory and restart the server)")
        if kept:
            lines.append(f"the previous index is kept at {kept}")
        return "\n".join(lines)

    _emit(out, args.json, human)
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bundle", help="model bundle directory (default: MMFUSION_BUNDLE, else models/default)")
    common.add_argument("--index-path", help="index directory (default: MMFUSION_INDEX_PATH, else data/index)")

    parser = argparse.ArgumentParser(
        prog="mmfusion index",
        description="Manage the vector index offline: bulk import, stats, rebuild under a new bundle. "
        "The server must not be running on the same index (use the HTTP API then).",
        epilog="exit codes: 0 ok; 1 some rows/items failed; 2 nothing done (bad input, bundle or index)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser(
        "import", parents=[common], help="bulk add items from a CSV or JSONL manifest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Add (or replace) items listed in MANIFEST, embedding them with the bundle's ONNX encoders.

CSV: a header with `id` and any of `image`, `text`, `metadata`; JSONL: one object per line with
those keys. `image` is a file path (relative paths are relative to the manifest's folder, or
--base-dir), `text` the text to embed, `metadata` a JSON object (a JSON string in CSV). Each row
needs an image, a text or both; the stored vector is the image embedding, the text embedding, or
their mean re-normalised (the search rule). The source (text, and the image's absolute path) is
recorded so `mmfusion index rebuild` can re-embed the item later.

Rows are validated like API items; bad rows (invalid id, missing file, not an image, bad
metadata, duplicate id) are reported with their line number and skipped, the others are added
in batches (one fsync per batch). Exit code 1 if any row failed.""",
    )
    imp.add_argument("manifest", help="CSV or JSONL file (.jsonl/.ndjson is JSONL, anything else CSV)")
    imp.add_argument("--format", choices=["auto", "csv", "jsonl"], default="auto", help="manifest format (auto)")
    imp.add_argument("--base-dir", help="folder that relative image paths start from (default: the manifest's)")
    imp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"items per encoder call ({DEFAULT_BATCH})")
    imp.add_argument("--json", action="store_true", help="print the report as JSON")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.set_defaults(run=cmd_import)

    stats = sub.add_parser(
        "stats", parents=[common], help="print the index's size, identity and rebuildability as JSON",
        description="Print JSON about the index: count, dimension, backend, last persisted/compacted, WAL size, "
        "the bundle it was built by and whether that is the --bundle (compatible), and how many items "
        "can be re-embedded by `rebuild` (by source). Works even when the index belongs to another bundle. "
        "Exit code 1 if there is no readable index (or the server holds it: use GET /v1/index then).",
    )
    stats.set_defaults(run=cmd_stats)

    reb = sub.add_parser(
        "rebuild", parents=[common], help="re-embed every item with --bundle into a fresh index and swap it in",
        description="Re-embed every item from its recorded source (its text, and the image file it was imported "
        "from) with --bundle, write the result to a fresh directory next to the index, then swap it in "
        "atomically (the old index is deleted, or kept with --keep-old). Needed after changing bundles: an index "
        "refuses to open under another bundle. Items without a re-embeddable source (uploaded images, items "
        "from a bundle's seed index, image files that moved) are listed; then nothing changes unless "
        "--drop-unrebuildable. Stop the server first.",
    )
    reb.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"items per encoder call ({DEFAULT_BATCH})")
    reb.add_argument("--drop-unrebuildable", action="store_true",
                     help="rebuild without the items that cannot be re-embedded (they are listed)")
    reb.add_argument("--keep-old", action="store_true", help="keep the previous index as <index>.before-rebuild-<time>")
    reb.add_argument("--dry-run", action="store_true", help="only check which items can be re-embedded")
    reb.add_argument("--json", action="store_true", help="print the report as JSON")
    reb.add_argument("--no-progress", action="store_true", help="no progress bar")
    reb.set_defaults(run=cmd_rebuild)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    try:
        return int(args.run(args))
    except CLIError as exc:
        print(f"mmfusion index {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
