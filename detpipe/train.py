"""The train stage: check inputs, build data and model, open (or continue) the MLflow run, loop over epochs.

Outputs (one folder, written whole at the end): ``model.pt`` (the final epoch's weights, or the best by
``train.best_metric``), ``last.pt`` (model, optimizer, schedule, scaler, epoch, RNGs), ``train_log.csv``
(one row per epoch), ``iter_log.csv`` (one row per iteration), ``config.yaml`` (the resolved params) and
``run.json`` (the MLflow run and what it was trained on).

Resume (``train.resume: auto``): after each epoch the full training state is saved under
``.detpipe/checkpoints/train-<key>/``, outside the stage's outputs (DVC and Snakemake delete a failed
stage's outputs). The key hashes the train params, the converted data and the code this process runs, so
only a rerun with the same inputs continues from it; it is removed when training succeeds.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from detpipe import config, distributed, engine, tracking
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir, atomic_torch_save, read_json_keys, tree_hash, write_json, write_text
from detpipe.metrics import named_stats
from detpipe.models import SMALL, build_from_params, has_masks, load_checkpoint, load_weights
from detpipe.rpn import parallel_rpn
from detpipe.syncfree import sync_free_inputs, sync_free_loss
from detpipe.transforms import train_transforms

CHECKPOINTS = Path(".detpipe/checkpoints")
# The params this stage reads and resumes on; it also reads evaluate.backend, which cannot change a number.
PARAM_SECTIONS = ("experiment", "seed", "device", "threads", "model", "train")
# The params a training run shows in MLflow (docs/tracking.md): what shapes the model, not how fast it is made.
MLFLOW_PARAMS = ("dataset", "preset", "seed", "model.*", "train.epochs", "train.batch_size", "train.optimizer",
                 "train.lr", "train.momentum", "train.weight_decay", "train.decay_norm_and_bias", "train.warmup_iters",
                 "train.lr_schedule", "train.milestones", "train.clip_grad_norm", "train.hflip", "train.scale_range",
                 "train.group_aspect_ratio", "train.mask_targets", "train.amp", "train.amp_dtype", "train.processes",
                 "train.val_interval", "train.best_metric", "train.early_stop", "train.load_from")


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _datasets(cfg: config.Config, data_dir: Path, image_root: Path,
              rank: int = 0) -> tuple[CocoDetection, CocoDetection, dict]:
    """The train and val sets and ``stats.json``, or a one-line error about the first missing or unusable input."""
    for needed in (data_dir / "train.json", data_dir / "val.json", data_dir / "stats.json"):
        if not needed.is_file():
            raise DetpipeError(f"{needed}: missing; run the convert stage first")
    if not image_root.is_dir():
        raise DetpipeError(f"{image_root}: image folder does not exist; run the download stage first")
    stats = read_json_keys(data_dir / "stats.json", "conversion stats", ("content_hash",))
    masks = has_masks(cfg.model.name)
    train_set = CocoDetection(data_dir / "train.json", image_root, with_masks=masks,
                              transforms=train_transforms(cfg.train.hflip, cfg.seed + 1 + rank, cfg.train.scale_range),
                              encoded=cfg.train.gpu_decode, mask_targets=cfg.train.mask_targets)
    val_set = CocoDetection(data_dir / "val.json", image_root, with_masks=masks, mask_targets="none")  # predicts only
    if len(train_set) == 0:
        raise DetpipeError(f"{data_dir / 'train.json'}: the train split has no images")
    if masks and not any("segmentation" in a for a in train_set.coco["annotations"]):
        raise DetpipeError(f"{data_dir / 'train.json'}: model.name {cfg.model.name} needs outlines, but this "
                           "dataset has boxes only; pick a box model (fasterrcnn, retinanet, fcos, ssdlite)")
    if cfg.train.best_metric.startswith("segm") and not masks:
        raise DetpipeError(f"train.best_metric {cfg.train.best_metric} needs a mask model, not {cfg.model.name}")
    return train_set, val_set, stats


def resume_key(cfg: config.Config, data_hash: str) -> str:
    """A hash of everything a training run depends on: its params, the converted data (``data_hash``, its
    :func:`tree_hash`) and the code it runs."""
    h = hashlib.sha256()
    params = {k: config.dict_of(cfg[k]) for k in PARAM_SECTIONS}
    params["train"] = {k: v for k, v in params["train"].items() if k not in ("resume", "log_interval")}
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(data_hash.encode())
    ours = lambda name: name in ("detpipe", "__main__") or name.startswith("detpipe.")
    code = {Path(m.__file__) for name, m in list(sys.modules.items()) if ours(name) and getattr(m, "__file__", None)}
    code = {path for path in code if path.is_file()}  # not "<stdin>" (python - < script.py): no code to hash
    for path in sorted(code):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _rng_state(loader_gen: torch.Generator, train_set: CocoDetection) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loadable weights_only
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "loader": loader_gen.get_state(), "transforms": train_set.transforms.state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, loader_gen: torch.Generator, train_set: CocoDetection) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():  # torchvision's proposal sampling draws on the GPU
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    loader_gen.set_state(state["loader"])
    train_set.transforms.load_state(state["transforms"])


def _load_resume(path: Path) -> dict | None:
    """The saved training state, or None when there is none (or it is damaged: training then starts afresh)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint cut short by the crash itself
        print(f"ignoring unreadable resume checkpoint {path} ({type(exc).__name__})", file=sys.stderr)
        return None


def mlflow_params(cfg: config.Config) -> dict:
    """The params a training run shows in MLflow: those of :data:`MLFLOW_PARAMS` (the resolved config, every key,
    is its ``config.yaml`` artifact)."""
    flat = config.flatten({k: v for k, v in config.dict_of(cfg).items() if k != "data"})
    return {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in MLFLOW_PARAMS)}


def run_name(cfg: config.Config, params: dict, hashes: dict) -> str:
    """``fcos-resnet18-synthetic-lr0.02-1a2b3c4``: the model, data and learning rate, and a hash of every logged
    param and the data, so runs with equal names were trained alike."""
    m = cfg.model
    model = f"{m.name}-{m.backbone}" if m.name in SMALL else m.name
    return f"{model}-{cfg.dataset}-lr{cfg.train.lr:g}-{tracking.short_hash([params, hashes])}"


def epoch_row(row: dict) -> dict:
    """The engine's epoch log with the names MLflow and ``train_log.csv`` show: ``train/lr``, ``train/img_per_s``,
    ``train/seconds``, ``train/loss`` (the sum) and each of the model's losses as ``train/loss_<name>``."""
    def name(key: str) -> str:
        if key in ("epoch", "lr", "train_img_per_s", "train_seconds", "train_loss"):
            return {"epoch": "epoch", "lr": "train/lr"}.get(key, key.replace("train_", "train/", 1))
        loss = key.removeprefix("train_")
        return f"train/{loss if loss.startswith('loss') else 'loss_' + loss}"

    return {name(k): v for k, v in row.items()}


def _improved(row: dict, best: dict | None, metric: str) -> bool:
    key = f"val/{metric}"
    return key in row and (best is None or row[key] > best["value"])


def run(cfg: config.Config, data_dir: Path, image_root: Path, out: Path) -> list[dict]:
    """Train the model of ``cfg`` on ``data_dir``'s train split; returns the per-epoch log.

    Under ``torchrun`` every process runs this; rank 0 alone writes files and talks to MLflow.
    """
    data_dir, image_root, out = Path(data_dir), Path(image_root), Path(out)
    device = engine.resolve_device(cfg.device)
    world = distributed.init(device.type)
    try:
        if world.active:
            _check_distributed(cfg, world)
            if device.type == "cuda":
                device = torch.device("cuda", world.local_rank)
                torch.cuda.set_device(device)
        return _train(cfg, data_dir, image_root, out, device, world)
    finally:
        distributed.shutdown(world)


def launch_command(cfg: config.Config, argv: list[str]) -> list[str] | None:
    """The torchrun command that reruns this stage script in ``train.processes`` processes; None when it is
    one process or this already is one of them. Both tools run the same ``python stages/train.py ...``."""
    if cfg.train.processes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.train.processes}", *argv]


def _check_distributed(cfg: config.Config, world: distributed.World) -> None:
    if cfg.train.batch_size % world.size:
        raise DetpipeError(f"train.batch_size {cfg.train.batch_size} does not split over {world.size} processes; "
                           "make it a multiple of the process count")
    if cfg.train.group_aspect_ratio:
        raise DetpipeError("train.group_aspect_ratio is not supported with several processes yet; set it to false")


def _train(cfg, data_dir: Path, image_root: Path, out: Path, device: torch.device, world) -> list[dict]:
    m, t = cfg.model, cfg.train
    say = (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k)) if world.main else (lambda *a, **k: None)
    if world.main:  # a tracking server that is down fails the stage now, not after the data and model are built
        tracking.check_server(tracking.tracking_uri())
    train_set, val_set, stats = _datasets(cfg, data_dir, image_root, rank=world.rank)
    if t.gpu_decode and device.type != "cuda":
        raise DetpipeError(f"train.gpu_decode: decodes JPEGs on a CUDA GPU, but the device is {device.type}; "
                           "set it to false")
    engine.set_threads(cfg.threads)
    engine.seed_everything(cfg.seed)
    model = build_from_params(m, len(train_set.cat_ids))
    # Weights only, from model.weights (at build time) or train.load_from: layers that do not fit start fresh.
    reinitialised = list(model.weights_not_loaded)
    if t.load_from:
        reinitialised = load_weights(model, t.load_from, m.name)
    source = t.load_from or m.weights
    if source:
        names = ", ".join(reinitialised) or "none"
        say(f"weights from {source}: {len(reinitialised)} tensors re-initialised ({names})")
    data_hash = tree_hash(data_dir)  # once: the resume key and the run's data_hash tag
    ckpt_dir = CHECKPOINTS / f"train-{resume_key(cfg, data_hash)[:16]}"
    state = _load_resume(ckpt_dir / "last.pt") if t.resume == "auto" else None
    say(f"resolved config:\n{config.dump(cfg)}", end="")

    # Everything a user can get wrong was checked above: only now is an MLflow run opened (or continued).
    commit = tracking.git_commit()
    hashes = {"data_hash": data_hash, "raw_data_hash": stats["content_hash"]} if world.main else {}
    run = tracking.NoRun()
    if state is not None and world.main:
        try:
            run = tracking.Run.existing(state["run_id"], ckpt_dir / "last.pt")
        except DetpipeError as exc:  # the store was replaced: the run cannot continue, so neither can training
            say(f"not resuming: {exc}")
            state = None
    if distributed.any_true(state is None, world):  # every process starts afresh when rank 0 does
        state = None
    iter_log = None
    try:  # from here on, any failure ends the MLflow run (FAILED, or KILLED on Ctrl-C)
        if state is not None:
            run.reopen()
            say(f"resuming from {ckpt_dir / 'last.pt'}: epoch {state['epoch']}/{t.epochs} done, "
                f"MLflow run {run.run_id}")
        elif world.main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            ckpt_dir.mkdir(parents=True)
            params = mlflow_params(cfg)
            run = tracking.Run.start(cfg.experiment, run_name=run_name(cfg, params, hashes),
                                     tags={"stage": "train", "git_commit": commit, "model": m.name,
                                           "dataset": cfg.dataset, **hashes, "device": str(device),
                                           "processes": str(world.size), **tracking.launch_tags(cfg)})
            run.log_params(params)
            if source:
                run.set_tag("reinitialised_layers", ", ".join(reinitialised)[:5000] or "none")
            write_text(ckpt_dir / "config.yaml", config.dump(cfg))
            run.log_artifact(ckpt_dir / "config.yaml")
            (ckpt_dir / "iter_log.csv").write_text("epoch,iter,lr,loss\n")

        # Seeded again after the model is built, so the data order does not depend on how many weights it drew.
        loader_gen = engine.seed_everything(cfg.seed)
        loader = engine.train_loader(train_set, t.batch_size, t.num_workers, loader_gen, device, t.group_aspect_ratio,
                                     world=world, seed=cfg.seed, pin_memory=t.pin_memory,
                                     prefetch_factor=t.prefetch_factor, persistent_workers=t.persistent_workers)
        model.to(device)
        engine.speed_up(model, channels_last=t.channels_last, compile=t.compile, cudnn_benchmark=t.cudnn_benchmark,
                        static_shapes=m.fixed_canvas)
        if t.parallel_rpn:
            parallel_rpn(model)  # R-CNN models: each image's RPN proposals filtered in parallel on CUDA
        if t.sync_free_inputs:
            sync_free_inputs(model)  # no host-device sync before the backbone (the loop checks the boxes)
        if t.sync_free_loss:
            sync_free_loss(model)  # FCOS: its loss without host-device syncs
        optimizer = engine.build_optimizer(model, t.optimizer, lr=t.lr, momentum=t.momentum,
                                           weight_decay=t.weight_decay, decay_norm_and_bias=t.decay_norm_and_bias,
                                           fused=t.fused_optimizer)
        total = t.epochs * len(loader)
        scheduler = engine.build_scheduler(optimizer, total, t.warmup_iters, t.lr_schedule,
                                           [e * len(loader) for e in t.milestones])
        amp_dtype = torch.float16 if t.amp_dtype == "float16" else torch.bfloat16
        scaler = torch.amp.GradScaler(device.type, enabled=t.amp and device.type == "cuda" and t.amp_dtype == "float16")
        history, best, stale, first_epoch = [], None, 0, 1
        if state is not None:  # model, optimizer, schedule, scaler, every RNG and the data order, as they were
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if not world.active:  # rank 0's RNG states only: a distributed resume continues, but not bit for bit
                _set_rng_state(state["rng"], loader_gen, train_set)
            history, best, stale, first_epoch = state["history"], state["best"], state["stale"], state["epoch"] + 1
            if state.get("stopped"):  # it had stopped early: only its outputs were left to write
                first_epoch = t.epochs + 1
        trained = torch.nn.parallel.DistributedDataParallel(model) if world.active else model
        iter_log = open(ckpt_dir / "iter_log.csv", "r+") if world.main else None  # noqa: SIM115 (closed below)
        if iter_log is not None:
            if state is not None:  # rows of the epoch the crash cut short are dropped: it is trained again
                iter_log.truncate(state["iter_log_bytes"])
            iter_log.seek(0, 2)
        for epoch in range(first_epoch, t.epochs + 1):
            if world.active:
                loader.sampler.set_epoch(epoch)
            row = engine.train_one_epoch(
                trained, optimizer, scheduler, loader, device, epoch, amp=t.amp, amp_dtype=amp_dtype,
                scaler=scaler, clip_norm=t.clip_grad_norm, first_iter=(epoch - 1) * len(loader),
                total_iters=total, log_interval=t.log_interval, iter_log=iter_log, deferred_sync=t.deferred_sync,
                progress=world.main and sys.stderr.isatty(), world=world,
                log=say if world.main else (lambda msg: None))
            row = epoch_row(row)
            if world.main and (epoch % t.val_interval == 0 or epoch == t.epochs):
                val_start = time.perf_counter()
                _, evals = engine.evaluate(model, val_set, device, batch_size=t.batch_size,
                                           backend=cfg.evaluate.backend)
                row.update({f"val/{k}": v for k, v in named_stats(evals).items()})  # val/bbox_mAP, ...
                row["val/seconds"] = time.perf_counter() - val_start  # its share of training: docs/performance.md
                if t.best_metric != "last":
                    if _improved(row, best, t.best_metric):
                        best, stale = {"epoch": epoch, "value": row[f"val/{t.best_metric}"]}, 0
                        atomic_torch_save(model.state_dict(), ckpt_dir / "best.pt")
                    else:
                        stale += 1
            history.append(row)
            val = " ".join(f"{k[4:]} {v:.3f}" for k, v in row.items() if k.endswith(("_mAP", "_mAP_50")))
            say(f"epoch {epoch}/{t.epochs} done: loss {row['train/loss']:.3f} {val or '(not validated)'}")
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            stop = distributed.any_true(bool(t.early_stop) and stale >= t.early_stop, world)
            if world.main:
                iter_log.flush()
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                   "epoch": epoch, "rng": _rng_state(loader_gen, train_set), "history": history,
                                   "best": best, "stale": stale, "stopped": stop, "run_id": run.run_id,
                                   "iter_log_bytes": iter_log.tell()}, ckpt_dir / "last.pt")
            if stop:
                say(f"early stop after epoch {epoch}: no better val {t.best_metric} in {stale} validations "
                    f"(best {best['value']:.4f} at epoch {best['epoch']})")
                break
        if iter_log is not None:
            iter_log.close()
        if world.main:
            _write_outputs(cfg, out, ckpt_dir, train_set, model, history, best, run, commit, hashes, device,
                           example=_model_example(val_set))
        distributed.barrier(world)
    except engine.NonFiniteLoss as exc:
        run.end("FAILED")
        if world.main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # nothing worth resuming: the same inputs diverge again
        raise DetpipeError(f"train: {exc}; try a lower train.lr (now {t.lr:g}) or more train.warmup_iters, "
                           "and check the data's boxes") from None
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    finally:
        if iter_log is not None and not iter_log.closed:
            iter_log.close()
    run.end("FINISHED")  # evaluate and report log into child runs of their own, never into this one
    if world.main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return history


def _model_example(val_set: CocoDetection) -> np.ndarray:
    """The MLflow model's input example: a crop of the first val image (zeros when the split has none), float
    ``(1, 3, H, W)`` in [0, 1], at most 64 pixels a side to keep the logged JSON small."""
    image = val_set[0][0][:, :64, :64] if len(val_set) else torch.zeros(3, 64, 64, dtype=torch.uint8)
    return image.float().div(255).unsqueeze(0).numpy()


def _write_outputs(cfg, out, ckpt_dir, train_set, model, history, best, run, commit, hashes, device,
                   example) -> None:
    """The stage's folder, whole: written into a temporary sibling and renamed into place.

    The model goes to MLflow too, rebuilt from ``model.pt`` so that both are the same model; ``example`` (an image
    crop, float ``(1, 3, H, W)``) is its input example.
    """
    weights = torch.load(ckpt_dir / "best.pt", weights_only=True) if best else model.state_dict()
    with atomic_dir(out) as tmp:
        shutil.copy(ckpt_dir / "config.yaml", tmp / "config.yaml")
        shutil.copy(ckpt_dir / "iter_log.csv", tmp / "iter_log.csv")
        shutil.copy(ckpt_dir / "last.pt", tmp / "last.pt")
        write_csv(tmp / "train_log.csv", history)
        meta = {"model": config.dict_of(cfg.model), "classes": train_set.class_names, "cat_ids": train_set.cat_ids,
                "epoch": best["epoch"] if best else history[-1]["epoch"]}
        atomic_torch_save({"model": weights, "meta": meta}, tmp / "model.pt")
        model_uri = run.log_model(load_checkpoint(tmp / "model.pt")[0], example)
        write_json(tmp / "run.json", {"run_id": run.run_id, "experiment": cfg.experiment,
                                      "tracking_uri": tracking.without_credentials(tracking.tracking_uri()),
                                      "model_uri": model_uri, "device": str(device), "git_commit": commit,
                                      **hashes})
        run.log_artifact(tmp / "train_log.csv")
