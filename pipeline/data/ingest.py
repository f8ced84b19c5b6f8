"""Ingestion with Ray Data: images under a folder or an ``s3://`` prefix, or existing WebDataset shards,
-> this project's train/eval shards + manifests (``prepare_data --source folder|webdataset``).

The driver lists the source, splits it (seeded, stratified: ``split_items``) and fixes every output
shard's items (shard i of a split = the i-th slice of ``shard_samples`` items), so the dataset is the
same whatever the parallelism. Ray Data then maps over those shard tasks (``ray.data.from_items`` +
``Dataset.map``, one CPU each, ``--ray-cpus`` at once): a task reads its images, converts them
(``pipeline.data.images``), writes its shard and a record of it (``<out>/_ingest/done/``), and returns
the shard's entry and what it skipped, by reason. The manifests are written last (eval, then train)
and ``<out>/_ingest/`` is removed, so a dataset becomes visible only when complete.

Rerunning the same command after a kill or a failure **continues**: ``<out>/_ingest/plan.json`` holds
the plan's fingerprint (the settings that shape the output and the listing); when it matches, shards
with a record are kept and only the others are written. A different plan, or a complete dataset, is
refused with ``--overwrite`` as the way out.

A WebDataset source is read twice: a first map over its shards collects each sample's key, label
(``cls``, or the ``--label-key`` field of its ``json``) and image member, for the split; the shard
tasks then stream the input shards they need (a split keeps the input order, so a task reads one or
two input shards). Ray is imported only inside ``ray_map``; the job (``jobs/prepare_data.py``)
connects to the cluster first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.config import ConfigError
from pipeline.data import images
from pipeline.data.errors import DataError, DatasetExistsError, NotFoundError
from pipeline.data.index import expand_shards, key_ext, label_of
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry
from pipeline.data.sources import IMAGE_EXTENSIONS, SourceItem, split_items
from pipeline.data.storage import (
    check_bucket,
    delete_urls,
    join_url,
    list_urls,
    open_read,
    read_bytes,
    write_bytes,
)
from pipeline.data.writer import archive_bytes, member_bytes

SPLITS = ("train", "eval")
PLAN_DIR = "_ingest"
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, first found in this order
EXAMPLES = 20  # skipped images named per task


@dataclass
class Listing:
    kind: str  # "folder" | "webdataset"
    root: str
    class_names: list[str]
    items: list[SourceItem]  # meta: {"where": url of the image or of its shard, "name": path or key}
    notes: list[str]
    dropped: Counter  # samples left out before the split (webdataset: no image, no label), by reason
    info: dict[str, Any]


Mapper = Callable[[Callable[..., dict], list[dict], dict[str, Any]], Iterator[dict]]


# ------------------------------------------------------------------------------------------------
# Running tasks: Ray Data or this process


def ray_map(fn: Callable[..., dict], rows: list[dict], kwargs: dict[str, Any], *, cpus: int | None, progress: bool):
    """``fn(row, **kwargs)`` for every row with Ray Data (one task per row, one CPU each, at most
    ``cpus`` at once), yielding results as they finish. Connects to a local Ray if none is."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    ds = ray.data.from_items([{"task": json.dumps(r)} for r in rows], override_num_blocks=len(rows))
    compute = ray.data.TaskPoolStrategy(size=cpus)
    ds = ds.map(_ray_row, fn_kwargs={"fn": fn, "kwargs": kwargs}, num_cpus=1, compute=compute)
    try:
        for row in ds.iter_rows():
            yield json.loads(row["result"])
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps the task's error: report its cause
        cause, seen = e, set()
        while id(cause) not in seen:  # the innermost error: RayTaskError.cause, __cause__, __context__
            seen.add(id(cause))
            inner = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
            if not isinstance(inner, BaseException):
                break
            cause = inner
        raise DataError(f"a Ray Data task failed: {type(cause).__name__}: {cause}") from None


def _ray_row(row: dict, fn: Callable[..., dict], kwargs: dict[str, Any]) -> dict:
    return {"result": json.dumps(fn(json.loads(row["task"]), **kwargs))}


def local_map(fn: Callable[..., dict], rows: list[dict], kwargs: dict[str, Any]) -> Iterator[dict]:
    for r in rows:
        yield fn(r, **kwargs)


# ------------------------------------------------------------------------------------------------
# Listing (driver)


def list_folder(root: str, storage: Any) -> Listing:
    """Images under a local folder or an s3:// prefix: class = first path component under it (searched
    recursively), or flat (one class, named after the folder) when no sub-folder holds images."""
    root = root.rstrip("/") if "://" in root else os.path.abspath(os.path.expanduser(root))
    urls = list(list_urls(root, storage))
    if not urls:
        raise ConfigError(f"--folder {root}: nothing there (no object or file under this prefix)")
    found: dict[str, list[tuple[str, str]]] = {}  # class folder ("" = top) -> [(url, rel)]
    for url in sorted(urls):
        rel = url[len(root) :].lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        top, sep, _ = rel.partition("/")
        found.setdefault(top if sep else "", []).append((url, rel))
    notes = []
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ConfigError(
            f"--folder {root}: no images among its {len(urls)} object(s), e.g. {urls[0]} (looked for {exts})"
        )
    classes = sorted(c for c in found if c and not c.startswith("."))
    if classes:
        layout = "classes"
        if found.get(""):
            notes.append(f"{len(found[''])} image(s) directly under {root} ignored: class sub-folders are used")
    else:
        layout, classes = "flat", [""]
    names = [c or (root.rsplit("/", 1)[-1] or "images") for c in classes]
    items = []
    for label, c in enumerate(classes):
        for url, rel in found[c]:
            items.append(_item(len(items), label, {"source": "folder", "path": rel}, url, rel))
    return Listing(
        "folder",
        root,
        names,
        items,
        notes,
        Counter(),
        {"kind": "folder", "path": root, "layout": layout, "num_source_images": len(items)},
    )


def _item(i: int, label: int, meta: dict, where: str, name: str) -> SourceItem:
    return SourceItem(key=f"img-{i:07d}", label=label, meta={**meta, "where": where, "name": name}, load=None)


def scan_shard(task: dict, *, storage: Any, label_key: str | None) -> dict:
    """One input shard's samples in order: [key, label or None, image member ext or None]."""
    url, samples, order = task["url"], {}, []
    try:
        with open_read(url, storage) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                split = key_ext(m.name) if m.isreg() else None
                if split is None:
                    continue
                key, ext = split
                if key not in samples:
                    samples[key] = [None, None]
                    order.append(key)
                s = samples[key]
                if ext in WDS_IMAGE_EXTS and s[1] is None:
                    s[1] = ext
                elif ext == ("json" if label_key else "cls") and m.size <= 1 << 16:
                    s[0] = label_of(tf.extractfile(m).read(), label_key)
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{url}: not a readable tar archive: {e}", url=url) from None
    return {"url": url, "samples": [[k, *samples[k]] for k in order]}


def list_webdataset(spec: str, storage: Any, label_key: str | None, mapper: Mapper) -> Listing:
    """The samples of existing shards (a brace pattern or a prefix), scanned by ``mapper``."""
    try:
        urls = list(expand_shards(spec, storage))
    except NotFoundError as e:
        raise DataError(f"--shards {spec}: {e}", url=e.url) from None
    label_key = None if label_key == "cls" else label_key
    scans = {
        r["url"]: r["samples"]
        for r in mapper(scan_shard, [{"url": u} for u in urls], {"storage": storage, "label_key": label_key})
    }
    dropped: Counter = Counter()
    usable = []  # (shard index, url, key, label, ext)
    no_image_shards = []
    for j, url in enumerate(urls):
        if not any(ext for _, _, ext in scans[url]):
            no_image_shards.append(url)
        for key, label, ext in scans[url]:
            if ext is None:
                dropped["no_image"] += 1
            else:
                usable.append((j, url, key, label, ext))
    if no_image_shards:
        raise DataError(
            f"--shards {spec}: {len(no_image_shards)} of {len(urls)} shard(s) hold no sample with an image member "
            f"({', '.join(WDS_IMAGE_EXTS)}), e.g. {no_image_shards[0]}",
            url=no_image_shards[0],
        )
    labelled = [u for u in usable if u[3] is not None]
    if label_key or labelled:  # labels asked for, or cls members present: a sample without one is dropped
        if len(labelled) < len(usable):
            dropped["no_label"] += len(usable) - len(labelled)
        usable = labelled
        if not usable:
            raise DataError(f"--shards {spec}: no sample has a label ({label_key or 'cls'})", url=urls[0])
        num_classes = max(u[3] for u in usable) + 1
        names = [str(c) for c in range(num_classes)]
    else:
        names = [spec.rstrip("/").rsplit("/", 1)[-1].split("{")[0].strip("-_.") or "images"]
    items = [
        _item(i, label or 0, {"source": "webdataset", "shard": url, "key": key}, url, key)
        for i, (_, url, key, label, _) in enumerate(usable)
    ]
    info = {"kind": "webdataset", "shards": spec, "num_shards": len(urls), "label_key": label_key}
    info["num_source_images"] = len(items)
    return Listing("webdataset", spec, names, items, [], dropped, info)


# ------------------------------------------------------------------------------------------------
# The plan (driver)


@dataclass
class Plan:
    listing: Listing
    splits: dict[str, list[SourceItem]]
    tasks: list[dict]  # {"split", "index", "items": [[key, label, where, name], ...]}
    fingerprint: str


def make_plan(s: Any, listing: Listing) -> Plan:
    train, evals = split_items(listing.items, s.eval_fraction, s.seed)
    splits = {"train": train, "eval": evals}
    if listing.kind == "webdataset":  # input order: a task then reads one or two input shards
        order = {it.key: i for i, it in enumerate(listing.items)}
        splits = {k: sorted(v, key=lambda it: order[it.key]) for k, v in splits.items()}
    tasks = []
    for split, items in splits.items():
        for i in range(0, len(items), s.shard_samples):
            part = items[i : i + s.shard_samples]
            rows = [[it.key, it.label, it.meta["where"], it.meta["name"]] for it in part]
            tasks.append({"split": split, "index": i // s.shard_samples, "items": rows})
    shape = {
        k: getattr(s, k)
        for k in ("source", "folder", "shards", "label_key", "image_size", "channels", "image_format", "quality")
    }
    shape |= {k: getattr(s, k) for k in ("shard_samples", "shard_bytes", "eval_fraction", "seed")}
    shape |= {"min_side": images.MIN_SIDE, "format_version": FORMAT_VERSION, "classes": listing.class_names}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    for t in tasks:
        h.update(json.dumps([t["split"], t["index"], t["items"]]).encode())
    return Plan(listing, splits, tasks, h.hexdigest()[:20])


# ------------------------------------------------------------------------------------------------
# One shard task (a Ray Data task, or this process)


def convert_task(task: dict, *, storage: Any, cfg: dict) -> dict:
    """Read, convert and write one output shard (or a few, cut by bytes); record it under _ingest/done."""
    split, index, rows = task["split"], task["index"], task["items"]
    t0 = time.perf_counter()
    fetched = _fetch_members(rows, storage) if cfg["kind"] == "webdataset" else None
    ext = images.FORMATS[cfg["image_format"]][1]
    samples, skipped, examples = [], Counter(), []
    for key, label, where, name in rows:
        try:
            if fetched is None:
                try:
                    raw = read_bytes(where, storage)
                except NotFoundError:
                    raise images.SkipImage("missing", "listed, but gone when read") from None
            else:
                raw = fetched.get((where, name))
            c = images.convert(raw, cfg["image_size"], cfg["channels"], cfg["image_format"], cfg["quality"])
        except images.SkipImage as e:
            skipped[e.reason] += 1
            if len(examples) < EXAMPLES:
                examples.append(f"{where if fetched is None else f'{where} {name}'}: {e}")
            continue
        meta = {"source": cfg["kind"], **({"path": name} if fetched is None else {"shard": where, "key": name})}
        meta |= {"original_size": list(c.original_size), "label": label, "label_name": cfg["class_names"][label]}
        samples.append(
            {"__key__": key, "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode(), ext: c.data}
        )
    parts = _cut(samples, cfg["shard_bytes"])
    split_url = join_url(cfg["out"], split)
    entries = []
    for p, part in enumerate(parts):
        name = f"shard-{index:06d}.tar" if len(parts) == 1 else f"shard-{index:06d}-{p:03d}.tar"
        data = _tar(part, cfg["mtime"])
        url = join_url(split_url, name)
        write_bytes(url, data, storage, content_type="application/x-tar")
        entries.append(
            {
                "name": name,
                "url": url,
                "samples": len(part),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    counts = Counter(int(smp["cls"]) for smp in samples)
    result = {
        "split": split,
        "index": index,
        "shards": entries,
        "class_counts": {str(k): v for k, v in counts.items()},
        "skipped": dict(skipped),
        "examples": examples,
        "seconds": time.perf_counter() - t0,
    }
    write_bytes(_done_url(cfg["out"], split, index), json.dumps(result).encode(), storage)
    return result


def _fetch_members(rows: list, storage: Any) -> dict[tuple[str, str], bytes]:
    """(shard url, key) -> the first image member (jpg, jpeg, png, webp) of the wanted samples."""
    wanted: dict[str, set[str]] = {}
    for _, _, where, name in rows:
        wanted.setdefault(where, set()).add(name)
    out: dict[tuple[str, str], tuple[int, bytes]] = {}
    for url, keys in wanted.items():
        with open_read(url, storage) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                split = key_ext(m.name) if m.isreg() else None
                if split is None or split[0] not in keys or split[1] not in WDS_IMAGE_EXTS:
                    continue
                rank = WDS_IMAGE_EXTS.index(split[1])
                if (url, split[0]) not in out or rank < out[(url, split[0])][0]:
                    out[(url, split[0])] = (rank, tf.extractfile(m).read())
    return {k: v for k, (_, v) in out.items()}


def _cut(samples: list[dict], shard_bytes: int) -> list[list[dict]]:
    parts: list[list[dict]] = [[]]
    content = 0
    for smp in samples:
        size = sum(member_bytes(len(v)) for k, v in smp.items() if k != "__key__")
        if parts[-1] and archive_bytes(content + size) > shard_bytes:
            parts.append([])
            content = 0
        parts[-1].append(smp)
        content += size
    return [p for p in parts if p]


def _tar(samples: list[dict], mtime: int) -> bytes:
    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=mtime, user="ddpm", group="ddpm") as tw:
        for smp in samples:
            tw.write(smp)
    return buf.getvalue()


def _done_url(out: str, split: str, index: int) -> str:
    return join_url(out, PLAN_DIR, "done", f"{split}-{index:06d}.json")


# ------------------------------------------------------------------------------------------------
# The job (driver)


def mapper_for(s: Any) -> Mapper:
    if s.use_ray:
        return lambda fn, rows, kw: ray_map(fn, rows, kw, cpus=s.ray_cpus, progress=s.progress)
    return local_map


def resolve(s: Any) -> Plan:
    """List and split the source, fix the shard tasks; print what will be written."""
    if s.source == "folder":
        listing = list_folder(s.folder, s.storage)
    else:
        listing = list_webdataset(s.shards, s.storage, s.label_key, mapper_for(s))
    for note in listing.notes:
        print(f"note: {note}", file=sys.stderr)
    plan = make_plan(s, listing)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(listing.dropped.items()))
    print(
        f"source: {listing.kind} {listing.root} ({len(listing.items)} image(s)"
        + (f"; left out before the split: {dropped}" if dropped else "")
        + ")\n"
        f"classes: {len(listing.class_names)}; train {len(plan.splits['train'])}, eval {len(plan.splits['eval'])} "
        f"images in {len(plan.tasks)} shard task(s); {s.image_size}x{s.image_size}x{s.channels} "
        f"{s.image_format} -> {s.out} ({'Ray Data' if s.use_ray else 'this process'})",
        file=sys.stderr,
    )
    return plan


def _objects(out: str, storage: Any) -> list[str]:
    return [u for d in (*SPLITS, PLAN_DIR) for u in list_urls(join_url(out, d), storage)]


def _start(s: Any, plan: Plan) -> tuple[int, dict[tuple[str, int], dict]]:
    """(mtime, results of tasks already done): continue a run of the same plan, or start afresh."""
    plan_url = join_url(s.out, PLAN_DIR, "plan.json")
    old = _objects(s.out, s.storage)
    previous = None
    if old and plan_url in old:
        try:
            previous = json.loads(read_bytes(plan_url, s.storage))
        except (DataError, ValueError):
            previous = None
    if old and not s.overwrite:
        if previous is None or previous.get("fingerprint") != plan.fingerprint:
            why = (
                "a dataset"
                if previous is None
                else "an unfinished ingestion of another plan (other settings or other source files)"
            )
            raise DatasetExistsError(
                f"{s.out} already holds {why} ({len(old)} object(s) under train/, eval/ and {PLAN_DIR}/, e.g. "
                f"{old[0]}); refusing to mix old and new shards: pass --overwrite to replace it, or choose another --out"
            )
        done = {}
        for url in list_urls(join_url(s.out, PLAN_DIR, "done"), s.storage):
            r = json.loads(read_bytes(url, s.storage))
            done[(r["split"], r["index"])] = r
        print(
            f"continuing the unfinished ingestion at {s.out}: {len(done)} of {len(plan.tasks)} shard task(s) "
            "already written",
            file=sys.stderr,
        )
        return int(previous["mtime"]), done
    if old:
        print(f"--overwrite: deleting {len(old)} old object(s) under {s.out}", file=sys.stderr)
        manifests = [u for u in old if u.endswith("/" + MANIFEST_NAME)]
        delete_urls(manifests, s.storage)
        delete_urls([u for u in old if u not in manifests], s.storage)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    record = {"fingerprint": plan.fingerprint, "mtime": mtime, "tasks": len(plan.tasks), "created": _now()}
    write_bytes(plan_url, json.dumps(record, indent=1).encode(), s.storage, content_type="application/json")
    return mtime, {}


def _remove_plan(out: str, storage: Any) -> None:
    delete_urls(list(list_urls(join_url(out, PLAN_DIR), storage)), storage)
    if "://" not in out:  # a local directory: its empty folders too
        shutil.rmtree(os.path.join(out, PLAN_DIR), ignore_errors=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run(s: Any, plan: Plan | None = None) -> int:
    """Write the dataset (continuing an unfinished run of the same plan); manifests last."""
    t0 = time.perf_counter()
    plan = plan or resolve(s)
    check_bucket(s.out, s.storage)
    mtime, done = _start(s, plan)
    listing = plan.listing
    cfg = {k: getattr(s, k) for k in ("image_size", "channels", "image_format", "quality", "shard_bytes", "out")}
    cfg |= {"kind": listing.kind, "mtime": mtime, "class_names": listing.class_names}
    todo = [t for t in plan.tasks if (t["split"], t["index"]) not in done]
    total = sum(len(t["items"]) for t in todo)
    sizes = {(t["split"], t["index"]): len(t["items"]) for t in todo}
    t1 = last = time.perf_counter()
    seen = 0
    for r in mapper_for(s)(convert_task, todo, {"storage": s.storage, "cfg": cfg}):
        done[(r["split"], r["index"])] = r
        seen += sizes[(r["split"], r["index"])]
        now = time.perf_counter()
        if now - last >= 5 or seen == total:
            last = now
            print(
                f"[ingest] {seen}/{total} images read in {now - t1:.0f} s ({seen / max(now - t1, 1e-9):.0f} images/s)",
                file=sys.stderr,
                flush=True,
            )
        for ex in r["examples"]:
            print(f"skipped: {ex}", file=sys.stderr)
    elapsed = time.perf_counter() - t1
    manifests = {}
    for split in ("eval", "train"):  # train last: a trainer sees the dataset when both are there
        results = sorted((r for (sp, _), r in done.items() if sp == split), key=lambda r: r["index"])
        m = _manifest(s, listing, split, results, plan.fingerprint)
        if m is None:
            if split == "train":
                raise DataError(f"no readable image for the train split of {listing.root}")
            if plan.splits["eval"]:
                print("eval: no readable image; no eval split written", file=sys.stderr)
            continue
        write_bytes(m.url, m.to_json(), s.storage, content_type="application/json")
        manifests[split] = m
    _remove_plan(s.out, s.storage)
    written = sum(m.num_samples for m in manifests.values())
    for split in SPLITS:
        if split in manifests:
            m = manifests[split]
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(m.skipped.items())) or "none"
            print(
                f"{split}: {m.num_samples} images in {len(m.shards)} shard(s), "
                f"{sum(x.bytes for x in m.shards) / 1e6:.2f} MB -> {m.url}; skipped: {skipped}"
            )
    kept = len(plan.tasks) - len(todo)
    print(
        f"ingested {written} images ({total} read in {elapsed:.1f} s: {total / max(elapsed, 1e-9):.0f} images/s; "
        f"{len(todo)} shard task(s) run" + (f", {kept} kept from the unfinished run" if kept else "") + "); "
        f"done in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _manifest(s: Any, listing: Listing, split: str, results: list[dict], fingerprint: str) -> Manifest | None:
    shards = [ShardEntry(**e) for r in results for e in r["shards"]]
    if not shards:
        return None
    counts = [0] * len(listing.class_names)
    skipped: Counter = Counter()
    for r in results:
        for k, v in r["class_counts"].items():
            counts[int(k)] += v
        skipped.update(r["skipped"])
    if split == "train":
        skipped.update(listing.dropped)
    fmt, ext = images.FORMATS[s.image_format]
    mode = {1: "L", 3: "RGB"}[s.channels]
    members = {
        ext: f"the image: {fmt}, mode {mode}, image_size x image_size",
        "cls": "class index as decimal text, an index into class_names",
        "json": "metadata: path (folder) or shard + key (webdataset), label, label_name, original_size",
    }
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        split=split,
        num_samples=sum(x.samples for x in shards),
        image_size=s.image_size,
        channels=s.channels,
        class_names=listing.class_names,
        class_counts=counts,
        shards=shards,
        source={
            **listing.info,
            "split_seed": s.seed,
            "eval_fraction": s.eval_fraction,
            "image_format": s.image_format,
            "plan": fingerprint,
            "min_side": images.MIN_SIDE,
        },
        created=_now(),
        members=members,
        labels="cls",
        skipped={k: v for k, v in sorted(skipped.items()) if v},
        url=join_url(s.out, split, MANIFEST_NAME),
    )
