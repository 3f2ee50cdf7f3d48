"""ingest (cpu): read the source, decode and validate every image, split, write shards."""

from __future__ import annotations

from pipeline.data import (
    Dataset,
    Preprocess,
    calibration_indices,
    calibration_note,
    check_dataset,
    counts,
    load_digits,
    read_image_folder,
    stratified_split,
    subset,
    write_shards,
)
from pipeline.sources import materialize_source
from pipeline.stages import StageContext
from pipeline.stages.configs import IngestConfig


def ingest(ctx: StageContext, cfg: IngestConfig, inputs: dict) -> dict:
    pre = Preprocess(resize=cfg.image_size, crop=cfg.image_size)
    skipped: list[dict] = []
    decoded = 0

    def tick(n: int) -> None:
        nonlocal decoded
        decoded += n
        if decoded % 64 == 0:
            ctx.progress(0.0, f"{decoded} images decoded")
            ctx.check_cancelled()

    src = cfg.source
    if src["kind"] == "builtin":
        classes, images = load_digits(pre)
    else:
        root, pre_skipped = materialize_source(src, ctx.store, ctx.workdir / "source", cfg.max_archive_bytes)
        skipped += pre_skipped
        classes, images = read_image_folder(root, pre, cfg.max_image_pixels, skipped, progress=tick)
    if cfg.val_source:
        train = images
        root, pre_skipped = materialize_source(cfg.val_source, ctx.store, ctx.workdir / "val",
                                               cfg.max_archive_bytes)
        val_skipped: list[dict] = []
        _, val = read_image_folder(root, pre, cfg.max_image_pixels, val_skipped, classes=classes, progress=tick)
        skipped += [{**s, "split": "val"} for s in pre_skipped + val_skipped]
    else:
        tr_idx, val_idx = stratified_split(images.labels, cfg.val_fraction, cfg.seed)
        train, val = subset(images, tr_idx), subset(images, val_idx)
    ds = Dataset(classes, train, val, skipped)
    check_dataset(ds)
    calib = subset(train, calibration_indices(len(train.labels), cfg.calib_size, cfg.seed))
    notes = [n for n in (calibration_note(cfg.calib_size, len(train.labels)),) if n]
    ctx.progress(0.9, "writing shards")
    shards = {}
    for name, split in (("train", train), ("val", val), ("calib", calib)):
        paths = write_shards(split, ctx.workdir, name)
        shards[name] = [ctx.put(p.name, p) for p in paths]
    return {
        "classes": classes,
        "preprocess": pre.to_dict(),
        "counts": {"train": counts(train, classes), "val": counts(val, classes), "calib": counts(calib, classes)},
        "sizes": {"train": len(train.labels), "val": len(val.labels), "calib": len(calib.labels)},
        "skipped": skipped,
        "notes": notes,
        "outputs": shards,
    }
