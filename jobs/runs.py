"""The run commands, ``ebseg label`` / ``train`` / ``eval``: the spec a command line spells, the Ray it runs
on (``--address``, ``$RAY_ADDRESS`` or an embedded local one), the pipeline job, and what is printed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from jobs.console import CommandError, say
from jobs.flags import spec_from_args
from jobs.specs import SpecError, dump_spec


def _spec(args: argparse.Namespace, kind: str):
    if kind == "label":
        if (args.input is None) != (args.output is None):
            raise SpecError(["label: give both INPUT and OUTPUT (or neither, with --spec)"])
    else:
        if args.spec_file and args.spec:
            raise SpecError([f"{kind}: give the spec once: SPEC or --spec, not both"])
        args.spec = args.spec or args.spec_file
    return spec_from_args(args, kind)


def _connect(address: str | None) -> None:
    from pipeline.cluster import ensure_ray, resolve_address

    target = resolve_address(address)
    if target is not None:
        say(f"connecting to Ray at {target}")
    how = ensure_ray(address, include_dashboard=False, logging_level=logging.WARNING)
    if how == "local":
        say("started an embedded local Ray (pass --address or set RAY_ADDRESS to use a cluster)")
    # Our progress line replaces Ray Data's per-dataset plan and timing messages.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_label(spec, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.label.plan import OutputMismatchError
    from pipeline.label.run import IncompleteRunError, run

    job = spec.to_job()
    _connect(args.address)
    try:
        summary = run(job)
    except (IncompleteRunError, OutputMismatchError) as e:
        raise CommandError(str(e)) from e
    if not args.json:
        errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_reason"].items())
        rate = summary["images_per_s"]
        print(
            f"labelled {summary['images']} images in {summary['wall_s']['total']:.1f} s"
            + (f" ({rate:.2f} images/s)" if rate else "")
            + f": {summary['ok']} ok, {summary['errors']} failed"
            + (f" ({errors})" if errors else "")
        )
        if summary.get("effective_batch_size"):
            print(
                f"model: {summary['forward_passes']:g} forward passes, "
                f"effective batch size {summary['effective_batch_size']:.2f} images per pass"
            )
        print(
            f"output: {spec.output} ({summary['shards_written']} shards written, "
            f"{summary['shards_skipped']} already done; summary.json)"
        )
        print(
            f'next: ebseg query {spec.output} "SELECT label, count(*) AS images FROM segments GROUP BY label"'
        )
    return summary


def run_train(spec, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from pipeline.train.run import run

    job = spec.to_job()
    _connect(args.address)
    result = dataclasses.asdict(run(job))
    if not args.json:
        print(f"trained {spec.name} to step {result['step']}: {result['run_uri']}")
        print(f"model: {result['final_model_uri']} (use it as --model)")
    return result


def run_eval(spec, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.evaluate.run import METRICS_FILE, run

    job = spec.to_job()
    _connect(args.address)
    record = run(job)
    if not args.json:

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}"

        print(
            f"{record['images']} images, {record['num_classes']} classes: mIoU {pct(record['mIoU'])}, "
            f"pixel accuracy {pct(record['pixel_accuracy'])}, fwIoU {pct(record['fwIoU'])}"
        )
        print(f"metrics: {spec.output.rstrip('/')}/{METRICS_FILE}")
    return record


RUNNERS = {"label": run_label, "train": run_train, "eval": run_eval}


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args, args.command)
    if args.dry_run:
        sys.stdout.write(dump_spec(spec))
        return 0
    result = RUNNERS[args.command](spec, args)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0
