"""Inference throughput and peak memory of EBSeg (random weights; speed does not depend on them).

Usage::

    python benchmarks/model_throughput.py --preset base --size 640 --batch-size 1 \\
        --device cpu --dtype fp32 --iters 3 --warmup 1 [--mode predict] [--json]
    python benchmarks/model_throughput.py --preset base --size 640 --batch-size 8 --device cuda --dtype bf16

Modes: ``model`` (default) times the model forward alone on a pre-built [B, 3, H, W] uint8 batch with
cached text embeddings (``model.eval()``, ``torch.inference_mode()``); ``predict`` times end-to-end
``Segmenter.predict`` on B uint8 images, post-processing included (no resize: the images are already at
--size). Images are ``skimage.data.astronaut()`` resized to --size, so the masks see real pixels.
The vocabulary is encoded once before timing (reported as encode_vocabulary_s, with build_s).

Figures: images/s from the median wall time per batch over --iters timed iterations after --warmup
(mean and min also reported). Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed loop;
on CPU the process's peak RSS (``ru_maxrss``, model weights and libraries included) and the peak RSS
minus the RSS at the start of the timed loop (what one iteration's activations add; it is 0 when the
peak was already reached during warmup, since ``ru_maxrss`` is a process-lifetime peak).

--dtype is the autocast dtype: fp16 is refused on CPU; bf16 on CPU runs (CPU autocast supports it) with
a warning, as it is rarely faster there without AMX. --compile wraps the model in ``torch.compile`` through
``Segmenter(compile=True)``; the first warm-up iteration then includes compilation (reported as
first_iter_s).

Two code states side by side (absolute times move 2x between machines and with load, so only a ratio
taken in one run means anything)::

    python benchmarks/model_throughput.py --baseline 2af1707 --preset base --size 640 --threads 2 --iters 3

checks out REF in a temporary ``git worktree``, starts one worker process per code state (each imports
its own ``ebseg``), warms both up, then alternates their timed iterations (baseline, current, baseline,
...) so both see the same machine load; prints both reports and the speedup (baseline median / current
median), and removes the worktree.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--mode", default="model", choices=["model", "predict"])
    p.add_argument("--size", default="640", help="square side (640) or HxW (480x640)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--vocabulary", default="ade150", help="benchmark (ade150), file, or 'cat,dog,' list")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a text summary")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (Segmenter(compile=True))")
    p.add_argument("--baseline", metavar="REF", help="also time git REF, interleaved (see the module doc)")
    p.add_argument("--root", default=str(REPO), help=argparse.SUPPRESS)  # the ebseg a worker imports
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # timed steps driven on stdin
    args = p.parse_args(argv)
    h, sep, w = args.size.lower().partition("x")
    if not (h.isdigit() and (w.isdigit() if sep else True)):
        p.error(f"--size must be N or HxW, got {args.size!r}")
    args.height, args.width = int(h), int(w or h)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.dtype == "fp16":
        p.error("--dtype fp16 is not supported on CPU; use fp32 (or bf16)")
    if args.device == "cpu" and args.dtype == "bf16":
        warnings.warn(
            "bf16 autocast on CPU: supported, but usually slower than fp32 without AMX", stacklevel=1
        )
    if min(args.iters, args.batch_size, args.height, args.width) < 1 or args.warmup < 0:
        p.error("--iters, --batch-size and --size must be >= 1, --warmup >= 0")
    return args


def astronaut_batch(height: int, width: int, count: int) -> list[np.ndarray]:
    """``count`` copies of scikit-image's astronaut (512x512 RGB) resized to height x width."""
    from skimage.data import astronaut

    image = np.asarray(Image.fromarray(astronaut()).resize((width, height), Image.BILINEAR))
    return [image.copy() for _ in range(count)]


def make_step(args: argparse.Namespace, seg, images: list[np.ndarray]):
    """A no-argument callable running one batch in the chosen mode (``seg``: an ebseg Segmenter)."""
    if args.mode == "predict":
        return lambda: seg.predict(images)
    div = seg.model.config.size_divisibility
    ph, pw = math.ceil(args.height / div) * div, math.ceil(args.width / div) * div
    batch = torch.zeros(len(images), 3, ph, pw, dtype=torch.uint8)
    batch[:, :, : args.height, : args.width] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    batch = batch.to(seg.device)
    sizes = None if (ph, pw) == (args.height, args.width) else [(args.height, args.width)] * len(images)
    text = seg.class_embeddings()
    amp = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(seg.device.type, dtype=amp)) if amp else nullcontext
    # The forward as the Segmenter calls it: final prediction only, where the code state has the option.
    forward = getattr(seg.model, "_orig_mod", seg.model).forward
    options = {"final_only": True} if "final_only" in inspect.signature(forward).parameters else {}

    def step():
        with torch.inference_mode(), autocast():
            return seg.model(batch, text, image_sizes=sizes, **options)

    return step


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(step, device: torch.device, iters: int, warmup: int) -> dict:
    """Wall time of each timed iteration (synchronised on CUDA) and the peak memory figures."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        sync()
        first = round(time.perf_counter() - start, 2) if i == 0 else first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_bytes()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    memory = {"peak_rss_bytes": peak_rss_bytes(), "rss_delta_bytes": max(0, peak_rss_bytes() - rss_before)}
    if device.type == "cuda":
        memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return {"times_s": times, "first_iter_s": first, **memory}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args: argparse.Namespace, model: torch.nn.Module, result: dict) -> dict:
    times = result.pop("times_s")
    median = statistics.median(times)
    return {
        **{k: getattr(args, k) for k in ("preset", "mode", "height", "width", "batch_size", "device")},
        **{k: getattr(args, k) for k in ("dtype", "compile", "vocabulary", "iters", "warmup")},
        "threads": torch.get_num_threads(),
        "images_per_s": args.batch_size / median,
        "images_per_s_mean": args.batch_size / statistics.mean(times),
        "images_per_s_best": args.batch_size / min(times),
        "s_per_image": median / args.batch_size,
        "batch_times_s": [round(t, 4) for t in times],
        **result,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # others' jobs on a shared machine show here
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }


def print_summary(r: dict) -> None:
    mib = 2**20
    print(
        f"{r['preset']} {r['mode']} {r['height']}x{r['width']} batch {r['batch_size']} "
        f"{r['device']} {r['dtype']} threads {r['threads']}"
    )
    print(
        f"  {r['images_per_s']:.3f} images/s median ({r['s_per_image']:.3f} s/image); "
        f"mean {r['images_per_s_mean']:.3f}, best {r['images_per_s_best']:.3f}; batches {r['batch_times_s']}"
    )
    if "cuda_max_allocated_bytes" in r:
        print(f"  CUDA max allocated {r['cuda_max_allocated_bytes'] / mib:.0f} MiB")
    print(
        f"  peak RSS {r['peak_rss_bytes'] / mib:.0f} MiB (incl. {r['param_bytes'] / mib:.0f} MiB of "
        f"weights), +{r['rss_delta_bytes'] / mib:.0f} MiB over the timed loop"
    )
    print(
        f"  build {r['build_s']} s, encode vocabulary {r['encode_vocabulary_s']} s (untimed); "
        f"1-min load average {r['load_avg_1min']}"
    )
    print(f"  torch {r['torch']}; CPU {r['cpu']}; GPU {r['gpu']}")


def load_api(root: str):
    """(build_ebseg, Segmenter, Vocabulary) from the ebseg under ``root``: a checkout runs without installing,
    and a --baseline worker imports the other code state."""
    sys.path.insert(0, root)
    from ebseg.build import build_ebseg
    from ebseg.predictor import Segmenter
    from ebseg.vocab import Vocabulary

    return build_ebseg, Segmenter, Vocabulary


def setup(args: argparse.Namespace):
    """(model, step, setup figures) for ``args``; the vocabulary is encoded here, untimed."""
    build_ebseg, Segmenter, Vocabulary = load_api(args.root)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_ebseg(args.preset)
    options = {"compile": True} if args.compile else {}  # older code states have no such option
    seg = Segmenter(
        model,
        Vocabulary.parse(args.vocabulary),
        short_side=None,
        batch_size=args.batch_size,
        device=args.device,
        amp_dtype=DTYPES[args.dtype],
        **options,
    )
    built = time.perf_counter()
    seg.class_embeddings()  # cached by the Segmenter: neither mode re-encodes the vocabulary per batch
    figures = {
        "build_s": round(built - start, 2),
        "encode_vocabulary_s": round(time.perf_counter() - built, 2),
    }
    step = make_step(args, seg, astronaut_batch(args.height, args.width, args.batch_size))
    return model, seg, step, figures


def serve(args: argparse.Namespace) -> None:
    """Worker of --baseline: warm up, then one timed step per "step" line on stdin (its time on stdout);
    "report" prints the JSON report and exits."""
    model, seg, step, figures = setup(args)
    sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        start = time.perf_counter()
        step()
        sync()
        if i == 0:
            figures["first_iter_s"] = round(time.perf_counter() - start, 2)
    print("ready", flush=True)
    rss_before, times = current_rss_bytes(), []
    for line in sys.stdin:
        if line.strip() == "step":
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
            print(times[-1], flush=True)
        else:
            break
    memory = {"peak_rss_bytes": peak_rss_bytes(), "rss_delta_bytes": max(0, peak_rss_bytes() - rss_before)}
    args.iters = len(times)
    print(json.dumps(report(args, model, {**figures, "times_s": times, **memory})), flush=True)


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    """--baseline: both code states in worker processes, timed iterations interleaved."""
    flags = [a for a in argv if a != "--json"]
    i = flags.index("--baseline") if "--baseline" in flags else None
    flags = (
        flags[:i] + flags[i + 2 :] if i is not None else [a for a in flags if not a.startswith("--baseline=")]
    )
    with tempfile.TemporaryDirectory(prefix="ebseg-baseline-") as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--quiet", "--detach", tree, args.baseline],
            check=True,
        )
        try:
            workers = {}
            for name, root in (("baseline", tree), ("current", str(REPO))):
                cmd = [sys.executable, str(Path(__file__).resolve()), *flags, "--worker", "--root", root]
                workers[name] = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                # One at a time, so the set-ups (model build, vocabulary, warm-up) do not overlap.
                for line in workers[name].stdout:
                    if line.strip() == "ready":
                        break
                else:
                    raise RuntimeError(f"the {name} worker exited before it was ready (see its stderr)")
            for _ in range(args.iters):
                for worker in workers.values():
                    worker.stdin.write("step\n")
                    worker.stdin.flush()
                    worker.stdout.readline()
            reports = {}
            for name, worker in workers.items():
                worker.stdin.write("report\n")
                worker.stdin.flush()
                reports[name] = json.loads(worker.stdout.readline())
                worker.wait()
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree], check=False)
    speedup = reports["baseline"]["s_per_image"] / reports["current"]["s_per_image"]
    if args.json:
        print(json.dumps({"baseline_ref": args.baseline, "speedup": speedup, **reports}))
        return
    for name, r in reports.items():
        print(f"[{name}{' ' + args.baseline if name == 'baseline' else ''}]")
        print_summary(r)
    print(f"speedup (baseline median / current median): {speedup:.2f}x")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        serve(args)
        return
    if args.baseline:
        compare(args, argv)
        return
    model, seg, step, figures = setup(args)
    result = report(args, model, {**figures, **measure(step, seg.device, args.iters, args.warmup)})
    if args.json:
        print(json.dumps(result))
    else:
        print_summary(result)


if __name__ == "__main__":
    main()
