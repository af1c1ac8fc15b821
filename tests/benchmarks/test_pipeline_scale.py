"""The scale benchmark runs the real labelling graph with its simulated accelerator (a smoke run on the
tests' Ray; no timing is asserted), and the prepared GPU check parses its arguments without a GPU."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO


def test_pipeline_scale_reports_driver_and_stage_figures(ray_local):
    from benchmarks import pipeline_scale

    args = ["--counts", "8", "--size", "48x64", "--rows-per-block", "4", "--batch-size", "2"]
    more = ["--files-per-shard", "3", "--actors", "1", "--actor-ips", "1000", "--warmup", "3"]
    report = pipeline_scale.main([*args, *more, "--slow-actor-ips", "4", "--repeats", "2"])
    json.dumps(report)  # what --json prints
    assert [(r["images"], r["repeat"]) for r in report["runs"]] == [(8, 0), (8, 1)] and report[
        "size"
    ] == "48x64"
    assert report["warmup"]["images"] == 3  # labelled first, not among the runs
    for run in report["runs"]:
        assert run["rows_per_block"] == 4 and run["shards"] == -(-run["images"] // 3)
        assert run["driver_cpu_s"] > 0 and run["driver_peak_rss_bytes"] > 0 and run["images_per_s"] > 0
        assert set(run["stage_busy_ms_per_image"]) == {"decode", "model", "encode", "write"}
        assert 1 <= run["effective_batch_size"] <= 2  # the simulated stage batches as the real one does
        by_thread = run["driver_cpu_ms_per_s_by_thread"]
        assert "StreamingExecutor" in by_thread and all(v > 0 for v in by_thread.values())
    for rep, slow in enumerate(report["slow_runs"]):  # the same 8 images at 4 a second: >= 2 s of model
        assert (
            slow["images"] == 8 and slow["actor_ips"] == 4 and slow["wall_s"] >= 2 and slow["repeat"] == rep
        )
    assert len(report["slow_runs"]) == 2 and "driver_split" in report
    assert report["runs"][0]["actor_ips"] == 1000


def test_driver_split_solves_per_second_and_per_image_terms():
    from benchmarks.pipeline_scale import driver_split

    # 40 ms per wall second + 30 us per image, at 10,000 images over 20, 50 and 80 s.
    runs = [
        {"images": 10_000, "wall_s": w, "driver_cpu_s": 0.04 * w + 30e-6 * 10_000} for w in (20.0, 50.0, 80.0)
    ]
    split = driver_split(runs[:2])
    assert split["driver_cpu_ms_per_wall_s"] == 40.0 and split["driver_us_per_image"] == 30.0
    assert split["projected_driver_us_per_image"] == 31.6  # 30 + 40 ms / 25,000
    noisy = [{**runs[0], "driver_cpu_s": runs[0]["driver_cpu_s"] + 0.1}, *runs[1:]]  # a least-squares line
    split = driver_split(noisy)
    assert 38.0 < split["driver_cpu_ms_per_wall_s"] < 40.0 and 0.02 < split["largest_residual_s"] < 0.1
    assert driver_split([runs[0], {**runs[1], "wall_s": 21.0}]) is None  # walls too close to tell apart
    assert driver_split([runs[0], {**runs[1], "images": 9_999}]) is None and driver_split(runs[:1]) is None


def test_simulated_stage_input_side_shrinks_the_actors_decode_and_batching_rule():
    import io

    from PIL import Image

    from benchmarks.pipeline_scale import parse_args, simulated_stage
    from ebseg.vocab import Vocabulary
    from ebseg.zoo import SegmenterSettings
    from pipeline.label.decode import DecodeImages

    settings = SegmenterSettings("tiny", Vocabulary(("sky", "tree", "road")), batch_size=2)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(jpeg, "JPEG")
    small = simulated_stage(1000.0, input_side=32)(settings, decode=DecodeImages(640, 2560, 10**8))
    image, height, width = small.decode.decode_one(jpeg.getvalue())
    assert image.shape == (32, 43, 3) and (height, width) == (48, 64) and small.decode.max_pixels == 10**8
    assert small.segmenter.padded_shape(48, 64) == (32, 64)
    model = simulated_stage(1000.0)(settings, decode=DecodeImages(640, 2560))  # default: the model's input
    assert model.decode.decode_one(jpeg.getvalue())[0].shape == (640, 853, 3)
    assert model.segmenter.padded_shape(48, 64) == (640, 864)
    assert parse_args(["--input-side", "64"]).input_side == 64 and parse_args([]).input_side is None


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)


def test_gpu_check_script_parses_and_plans_without_a_gpu(tmp_path):
    syntax = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    plan = gpu_check("--dry-run", "--out", str(tmp_path), "--skip-train")
    assert plan.returncode == 0 and "steps: env parity speed memory label" in plan.stdout
    assert "train" not in plan.stdout.split("steps:")[1].splitlines()[0] and str(tmp_path) in plan.stdout
    assert gpu_check("--help").stdout.startswith("The prepared GPU check")
    wrong = gpu_check("--gpus", "2")
    assert wrong.returncode == 2 and "unknown argument '--gpus'" in wrong.stderr
    assert gpu_check("--out").returncode == 2
