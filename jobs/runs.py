"""The run commands, ``ebseg label`` / ``train`` / ``eval``: the spec a command line spells, the Ray it runs
on (``--address``, ``$RAY_ADDRESS`` or an embedded local one), the pipeline job, and what is printed."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from jobs.console import CommandError, say
from jobs.flags import spec_from_args
from jobs.specs import SpecError, dump_spec


def _spec(args: argparse.Namespace, kind: str):
    if kind == "label":
        if (args.input is None) != (args.output is None):
            raise SpecError(["label: give both INPUT and OUTPUT (or neither, with --spec)"])
    elif kind == "relabel":
        if (args.source is None) != (args.output is None):
            raise SpecError(["relabel: give both OUTPUT and NEW_OUTPUT (or neither, with --spec)"])
    else:
        if args.spec_file and args.spec:
            raise SpecError([f"{kind}: give the spec once: SPEC or --spec, not both"])
        args.spec = args.spec or args.spec_file
    return spec_from_args(args, kind)


@contextlib.contextmanager
def ray_session(args: argparse.Namespace) -> Iterator[None]:
    """Ray for one run command: the one this process is connected to, ``--address`` / ``$RAY_ADDRESS``, or an
    embedded local one (shut down at the end). Unless ``--verbose``, Ray's own lines (its loggers, the C++
    core's, the workers') go to Ray's log files, and only ours reach the console."""
    from pipeline.cluster import driver_log_path, ensure_ray, ray_console_to_file, resolve_address

    verbose = getattr(args, "verbose", False)
    target = resolve_address(args.address)
    if target is not None:
        say(f"connecting to Ray at {target}")
    level = logging.INFO if verbose else logging.WARNING
    how = ensure_ray(args.address, log_to_driver=verbose, include_dashboard=False, logging_level=level)
    if how == "local":
        say("started an embedded local Ray (pass --address or set RAY_ADDRESS to use a cluster)")
    import ray

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = verbose  # our progress line replaces its plan and timing messages
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if how != "connected" and not verbose:
            path = stack.enter_context(ray_console_to_file(driver_log_path()))
            say(f"Ray's own log lines: {os.path.dirname(path)} (--verbose prints them)")
        if how == "local":
            stack.callback(ray.shutdown)  # inside the redirect: its farewell lines go to the file too
        yield


def default_vocabulary(spec) -> None:
    """Without ``--vocabulary`` a model labels with the vocabulary it carries; say which, or refuse (exit 2)
    naming the accepted forms, before anything starts."""
    from ebseg.zoo import VocabularyRequiredError, describe_model

    if spec.vocabulary is not None:
        return
    try:
        vocabulary = describe_model(spec.model).resolve_vocabulary(None)
    except VocabularyRequiredError as e:
        raise SpecError([f"label.vocabulary (--vocabulary): {e}"], source="flags") from None
    names = ", ".join(vocabulary.names[:12]) + (", ..." if len(vocabulary) > 12 else "")
    say(f"vocabulary: the model's own{f' ({vocabulary.name})' if vocabulary.name else ''}: {names}")


def run_label(spec, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.label.plan import OutputMismatchError
    from pipeline.label.preflight import PreflightError
    from pipeline.label.run import IncompleteRunError, run
    from pipeline.lease import LeaseHeldError, LeaseLostError

    default_vocabulary(spec)
    job = spec.to_job()
    try:
        # Ray starts only after the preflight and the output's lease, once there is work for it.
        summary = run(job, connect=lambda: ray_session(args))
    except (
        IncompleteRunError, OutputMismatchError, PreflightError, LeaseHeldError, LeaseLostError
    ) as e:  # fmt: skip
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
    return _after_run(spec, args, summary)


def _after_run(spec, args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """What a labelling or relabelling run ends with: the next command to try and the run's page."""
    if not args.json:
        print(
            f'next: ebseg query {spec.output} "SELECT label, count(*) AS images FROM segments GROUP BY label"'
        )
    summary["report"] = _report(spec)
    if not args.json and summary["report"]:
        print(f"report: {summary['report']} (open it in a browser)")
    return summary


def _report(spec) -> str | None:
    """Write ``OUTPUT/report.html``; a report that fails is a warning, never a failed run (the labels are
    committed by then). Returns where it was written (as the user spelled the output), or None."""
    from pipeline.results.report import REPORT_FILE, write_report

    try:
        write_report(spec.output, storage_options=spec.storage_options)
    except Exception as e:  # the run's result stands; say why there is no page
        say(f"warning: no report.html: {type(e).__name__}: {e}")
        return None
    return spec.output.rstrip("/") + "/" + REPORT_FILE


def run_train(spec, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from pipeline.train.run import run

    job = spec.to_job()
    with ray_session(args):
        result = dataclasses.asdict(run(job))
    if not args.json:
        print(f"trained {spec.name} to step {result['step']}: {result['run_uri']}")
        print(f"model: {result['final_model_uri']} (use it as --model)")
    return result


def run_eval(spec, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.evaluate.run import METRICS_FILE, run

    job = spec.to_job()
    with ray_session(args):
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


def run_relabel(spec, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.label.plan import OutputMismatchError
    from pipeline.label.proposal_records import NoProposalsError
    from pipeline.label.run import IncompleteRunError
    from pipeline.lease import LeaseHeldError, LeaseLostError
    from pipeline.relabel.plan import ModelMismatchError
    from pipeline.relabel.run import run

    job = spec.to_job()
    try:
        summary = run(job, connect=lambda: ray_session(args))
    except (
        IncompleteRunError, OutputMismatchError, NoProposalsError, ModelMismatchError, LeaseHeldError,
        LeaseLostError,
    ) as e:  # fmt: skip
        raise CommandError(str(e)) from e
    if not args.json:
        print(
            f"relabelled {summary['images']} images from {summary['source']} in "
            f"{summary['wall_s']['total']:.1f} s: {summary['ok']} ok, {summary['errors']} failed"
        )
        print(
            f"output: {spec.output} ({summary['shards_written']} shards written, "
            f"{summary['shards_skipped']} already done; summary.json)"
        )
    return _after_run(spec, args, summary)


RUNNERS = {"label": run_label, "train": run_train, "eval": run_eval, "relabel": run_relabel}


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args, args.command)
    if args.dry_run:
        if args.command == "label":
            default_vocabulary(spec)
        sys.stdout.write(dump_spec(spec))
        if args.command == "label":
            sys.stdout.write(_plan_text(spec))
        elif args.command == "relabel":
            sys.stdout.write(_relabel_plan_text(spec))
        return 0
    result = RUNNERS[args.command](spec, args)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _plan_text(spec) -> str:
    """The dry-run's plan, as YAML comments after the spec (the printed text stays a valid spec file)."""
    from pipeline.label.preview import preview

    try:
        found = preview(spec.to_job())
    except (FileNotFoundError, ValueError) as e:
        return f"# plan: cannot list the input: {e}\n"
    uncounted = (
        f" (+ the images of {found['uncounted_shards']} tar/Parquet shards)"
        if found["uncounted_shards"]
        else ""
    )
    lines = [
        f"plan: run {found['run_id']}, model {found['model_id']}, device {found['device']}",
        _vocabulary_line(found["vocabulary"]),
        f"found: {found['shards']} shards{' (listing stopped here)' if found['truncated'] else ''}, "
        f"{found['images']} images{uncounted}",
        f"already committed in {found['output']}: {found['committed']} shards",
        f"would run: {found['to_run']} shards",
    ]
    for shard in found["listed"]:
        images = "?" if shard["images"] is None else shard["images"]
        state = "committed" if shard["committed"] else "to run"
        lines.append(f"  {shard['shard_id']}: {images} images from {shard['first']} ({state})")
    if found["shards"] > len(found["listed"]):
        lines.append(f"  ... and {found['shards'] - len(found['listed'])} more shards")
    return "".join(f"# {line}\n" for line in lines)


def _vocabulary_line(vocabulary: dict[str, Any]) -> str:
    names = vocabulary["names"]
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"vocabulary: {vocabulary['name'] or vocabulary['id']} ({len(names)} classes: {shown})"


def _relabel_plan_text(spec) -> str:
    """``ebseg relabel --dry-run``'s plan, as YAML comments after the spec; a refusal is said, not raised."""
    from pipeline.relabel.plan import preview

    try:
        found = preview(spec.to_job())
    except (FileNotFoundError, ValueError) as e:  # NoProposalsError, ModelMismatchError, OutputMismatchError
        return f"# plan: cannot relabel: {e}\n"
    lines = [
        f"plan: run {found['run_id']}, model {found['model_id']}, CPU",
        _vocabulary_line(found["vocabulary"]),
        f"source: {found['source']}: {found['shards']} committed shards, {found['images']} images",
        f"proposals: {found['proposals_encoding']} encoding, read from {found['proposals_in']}",
        f"already committed in {found['output']}: {found['committed']} shards",
        f"would run: {found['to_run']} shards",
    ]
    return "".join(f"# {line}\n" for line in lines)
