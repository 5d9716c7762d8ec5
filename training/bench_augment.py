"""Measure the augmentation arms on NEU-DET val: none, Ultralytics' defaults, the surface set.

Each (arm, seed) fine-tunes the same start checkpoint for the same epochs in its own process
(torch on one thread, at most --parallel at a time, each time-boxed), then the trainer's own val
(Ultralytics, on the dataset's val split, last weights) gives mAP@0.5 and mAP@0.5:0.95. Prints JSON.

    python -m training.bench_augment start --weights models/neu-det/best.pt --out /tmp/aug-start.pt
    python -m training.bench_augment run --data /tmp/aug-neu --weights /tmp/aug-start.pt \
        --epochs 2 --imgsz 256 --seeds 0 1 --json docs/bench-augment.json
    python -m training.bench_augment speed          # ms per image of the photometric step

`start` makes the common starting point: the committed model with its classification branch re-initialised
(backbone, neck and box branch trained, classes not): a partly trained model that moves within a few epochs,
where a converged one would not (TRAINING.md: no fine-tuned epoch beat it).
Imports nothing of the project but training.augment and training.offline (bare checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("none", "defaults", "surface")


def make_start(weights: Path, out: Path) -> None:
    """weights with the Detect head's classification branch (cv3) re-initialised, the rest kept."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    old = (ckpt.get("ema") or ckpt["model"]).float()
    torch.manual_seed(0)
    fresh = DetectionModel(old.yaml, nc=old.nc, verbose=False)
    head = f"model.{len(old.model) - 1}.cv3."
    kept = {k: v for k, v in old.state_dict().items() if not k.startswith(head)}
    missing, _ = fresh.load_state_dict(kept, strict=False)
    fresh.names = old.names
    fresh.args = getattr(old, "args", {})
    torch.save({"model": fresh.half(), "ema": None, "optimizer": None, "epoch": -1,
                "train_args": ckpt.get("train_args", {})}, out)
    print(json.dumps({"start": str(out), "from": str(weights), "reinitialised": sorted({k.rsplit(".", 1)[0]
                      for k in missing})[:3] + ["..."], "reinitialised_tensors": len(missing)}))


def speed(n: int, size: int) -> dict[str, Any]:
    """ms per image of the photometric step (every transform applied, p=1) on one thread: the
    torchvision set here against the Albumentations list it replaces, where albumentations is installed."""
    import numpy as np
    import torch

    from training.augment import Photometric, surface_augmentations

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]

    def ms(fn: Any) -> float:
        fn(imgs[0].copy())
        t = time.perf_counter()
        for im in imgs:
            fn(im.copy())
        return round((time.perf_counter() - t) / n * 1000, 3)

    tv = surface_augmentations()
    for t in tv:
        t.p = 1.0
    step = Photometric(tv)
    out: dict[str, Any] = {"bench": "augment-speed", "images": n, "size": size, "torchvision_ms": ms(lambda im: step(
        {"img": im}))}
    try:
        import albumentations as A
    except ImportError:
        return out
    alb = A.Compose([A.CLAHE(clip_limit=(1, 3), p=1), A.RandomBrightnessContrast(0.2, 0.2, p=1),
                     A.RandomGamma((80, 120), p=1), A.GaussNoise(std_range=(0.01, 0.04), p=1),
                     A.Blur(blur_limit=3, p=1), A.ImageCompression(quality_range=(60, 100), p=1)])
    out |= {"albumentations_ms": ms(lambda im: alb(image=im)), "albumentations_version": A.__version__}
    return out


def run_one(a: argparse.Namespace) -> dict[str, Any]:
    """One arm and seed (child process)."""
    import torch

    torch.set_num_threads(a.threads)
    from training.standalone_train import _offline_env, _polars_fallback, local_data_yaml

    work = Path(tempfile.mkdtemp(prefix=f"sqis-aug-{a.arm}-{a.seed}-"))
    _offline_env(work / "state")
    _polars_fallback()
    from ultralytics import YOLO, settings

    from training.augment import NO_AUGMENT_HYP, SURFACE_HYP, trainer_class
    from training.offline import INTEGRATIONS_OFF

    settings.update(INTEGRATIONS_OFF)
    hyp: dict[str, Any] = {"none": NO_AUGMENT_HYP, "defaults": {}, "surface": SURFACE_HYP}[a.arm]
    trainer = {"none": trainer_class("detect", False), "defaults": None, "surface": trainer_class("detect", True)}[a.arm]
    model = YOLO(str(a.weights))
    t0 = time.time()
    model.train(data=str(local_data_yaml(a.data, work)), imgsz=a.imgsz, epochs=a.epochs, time=a.time_h, batch=a.batch,
                device="cpu", workers=a.workers, seed=a.seed, deterministic=False, patience=0, project=str(work),
                name="run", exist_ok=True, plots=False, amp=False, val=False, pretrained=str(a.weights),
                freeze=a.freeze, fraction=a.fraction, close_mosaic=0, warmup_epochs=a.warmup, optimizer="AdamW",
                lr0=a.lr0, cos_lr=True, lrf=0.1, trainer=trainer, **hyp)
    m = model.trainer.metrics or {}
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"arm": a.arm, "seed": a.seed, "wall_s": round(time.time() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime),
            "epochs_run": model.trainer.epoch + 1,
            "map50": round(float(m.get("metrics/mAP50(B)", float("nan"))), 4),
            "map50_95": round(float(m.get("metrics/mAP50-95(B)", float("nan"))), 4)}


def run_all(a: argparse.Namespace) -> dict[str, Any]:
    jobs = [(arm, seed) for seed in a.seeds for arm in a.arms]
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    running: list[tuple[str, int, subprocess.Popen[str], float]] = []
    results: list[dict[str, Any]] = []
    t0 = time.time()

    def reap(block: bool) -> None:
        while running:
            for job in list(running):
                arm, seed, p, started = job
                if p.poll() is None and time.time() - started > a.timeout_s:
                    p.terminate()
                    p.wait()
                if p.poll() is not None:
                    running.remove(job)
                    out = (logs / f"{arm}-{seed}.out").read_text().strip().splitlines()
                    row = json.loads(out[-1]) if out and out[-1].startswith("{") else {
                        "arm": arm, "seed": seed, "error": f"exit {p.returncode}, see {logs}/{arm}-{seed}.err"}
                    results.append(row)
                    print(f"[{time.time() - t0:6.0f}s] {json.dumps(row)}", file=sys.stderr, flush=True)
            if not block or len(running) < a.parallel:
                return
            time.sleep(2)

    for arm, seed in jobs:
        reap(block=True)
        cmd = [sys.executable, "-m", "training.bench_augment", "one", "--arm", arm, "--seed", str(seed)] + [
            x for k in ("data", "weights", "epochs", "imgsz", "batch", "workers", "threads", "freeze", "fraction",
                        "lr0", "warmup") for x in (f"--{k}", str(getattr(a, k)))] + (
            ["--time-h", str(a.time_h)] if a.time_h else [])
        with open(logs / f"{arm}-{seed}.out", "w") as o, open(logs / f"{arm}-{seed}.err", "w") as e:
            running.append((arm, seed, subprocess.Popen(cmd, stdout=o, stderr=e, env=env, text=True), time.time()))
        print(f"[{time.time() - t0:6.0f}s] started {arm} seed {seed}", file=sys.stderr, flush=True)
        time.sleep(1)
    while running:
        reap(block=False)
        time.sleep(2)

    summary: dict[str, Any] = {}
    for arm in a.arms:
        rows = [r for r in results if r["arm"] == arm and "map50" in r]
        if rows:
            summary[arm] = {k: {"median": round(statistics.median(r[k] for r in rows), 4),
                                "worst": min(r[k] for r in rows), "best": max(r[k] for r in rows)}
                            for k in ("map50", "map50_95")} | {"runs": len(rows)}
    core_s = sum(r.get("wall_s", 0) for r in results) * a.threads
    return {"bench": "augment", "metric": "Ultralytics val (trainer's own), NEU-DET val split, last weights",
            "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                         if k not in ("cmd", "json", "logs", "timeout_s")},
            "summary": summary, "runs": sorted(results, key=lambda r: (ARMS.index(r["arm"]), r["seed"])),
            "wall_s": round(time.time() - t0, 1), "core_min": round(core_s / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="make the common start checkpoint (head re-initialised)")
    s.add_argument("--weights", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    sp = sub.add_parser("speed", help="ms per image of the photometric step, torchvision vs albumentations")
    sp.add_argument("--images", type=int, default=200)
    sp.add_argument("--size", type=int, default=256)
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, required=True, help="dataset dir from `sqis data import`")
        p.add_argument("--weights", type=Path, required=True, help="the common start checkpoint")
        p.add_argument("--epochs", type=int, default=2)
        p.add_argument("--time-h", type=float, default=None, help="time box per run (Ultralytics' own)")
        p.add_argument("--imgsz", type=int, default=256)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--freeze", type=int, default=10, help="freeze the first N layers (10: the backbone)")
        p.add_argument("--fraction", type=float, default=1.0, help="fraction of the train split")
        p.add_argument("--lr0", type=float, default=0.002)
        p.add_argument("--warmup", type=float, default=0.0)
        if name == "one":
            p.add_argument("--arm", choices=ARMS, required=True)
            p.add_argument("--seed", type=int, required=True)
        else:
            p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
            p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
            p.add_argument("--parallel", type=int, default=2)
            p.add_argument("--timeout-s", type=float, default=1200, help="kill a run after this long")
            p.add_argument("--logs", default="/tmp/sqis-bench-augment")
            p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.cmd == "start":
        make_start(a.weights, a.out)
    elif a.cmd == "speed":
        print(json.dumps(speed(a.images, a.size)))
    elif a.cmd == "one":
        print(json.dumps(run_one(a)), flush=True)
    else:
        out = run_all(a)
        text = json.dumps(out, indent=2)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
