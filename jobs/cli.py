"""``ebseg``: label, train and evaluate on Ray; submit to a cluster; query, draw and export the results.

    ebseg label INPUT OUTPUT [--vocabulary V] [--model demo] [--proposals] [--spec label.yaml]
    ebseg relabel OUTPUT NEW_OUTPUT --vocabulary V [--resolution original|grid]   (needs label --proposals)
    ebseg train SPEC.yaml        ebseg eval SPEC.yaml
    ebseg submit SPEC.yaml --address http://HOST:8265 [--wait]    ebseg status JOB_ID    ebseg logs JOB_ID
    ebseg query OUTPUT "SQL" [--format table|csv|json]
    ebseg search OUTPUT "TEXT" [--min-area F] [--limit N] [--format table|csv|json]   (needs --proposals)
    ebseg show OUTPUT IMAGE_ID --out overlay.png [--text "TEXT"]
    ebseg export OUTPUT DEST --format coco|png|hf
    ebseg report OUTPUT [--out report.html]

label / relabel / train / eval run on the Ray that ``--address`` or ``$RAY_ADDRESS`` names, else on an
embedded local Ray (all take ``--address ADDR``). Their flags are the spec's fields (``ebseg label --help``);
a spec file and flags combine, flags winning.
Exit status: 0 done, 1 the job failed, 2 the command or spec is invalid (nothing was started).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from jobs.console import EXIT_FAILED, EXIT_USAGE, JOB_ERRORS, CommandError, say, show_warning
from jobs.flags import add_spec_flags
from jobs.results import cmd_export, cmd_query, cmd_report, cmd_search, cmd_show
from jobs.runs import RUNNERS, cmd_run
from jobs.specs import SpecError
from jobs.submit import SubmitError
from jobs.tables import FORMATS

# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``build_parser().parse_args(argv)`` checks one without running anything."""
    parser = argparse.ArgumentParser(
        prog="ebseg",
        allow_abbrev=False,  # a flag in a manifest must be spelled out: a new flag could make it ambiguous
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--version", action="version", version=f"ebseg {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    label = sub.add_parser(
        "label", help="label images into Parquet records (masks, classes, areas)", allow_abbrev=False
    )
    label.add_argument("input", nargs="?", help="images, .tar shards or Parquet files: path, glob or URI")
    label.add_argument("output", nargs="?", help="output directory or URI")
    _run_options(label, "label")
    relabel = sub.add_parser(
        "relabel",
        help="label an output stored with --proposals again with another vocabulary, on CPU",
        allow_abbrev=False,
    )
    relabel.add_argument("source", nargs="?", metavar="OUTPUT", help="a labelling output with proposals")
    relabel.add_argument("output", nargs="?", metavar="NEW_OUTPUT", help="the new output directory or URI")
    _run_options(relabel, "relabel")
    for kind, text in (
        ("train", "train or resume a model on Ray Train"),
        ("eval", "mIoU of a model on a dataset"),
    ):
        p = sub.add_parser(kind, help=text, allow_abbrev=False)
        p.add_argument("spec_file", nargs="?", metavar="SPEC", help="YAML or JSON spec (same as --spec)")
        _run_options(p, kind)

    submit = sub.add_parser(
        "submit", help="run a spec on a Ray cluster through the Ray Jobs API", allow_abbrev=False
    )
    submit.add_argument("spec", metavar="SPEC", help="YAML or JSON spec with kind: label | train | eval")
    submit.add_argument("--address", help="the cluster's Jobs API (http://HEAD:8265); default $RAY_ADDRESS")
    submit.add_argument("--wait", action="store_true", help="stream the job's log; exit non-zero if it fails")
    submit.add_argument(
        "--no-package", dest="carry_package", action="store_false",
        help="use the ebseg installed on the cluster instead of sending this one",
    )  # fmt: skip
    submit.add_argument("--job-id", help="submission id (default: Ray picks one)")
    for name, text in (("status", "a submitted job's status"), ("logs", "a submitted job's log")):
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument("--address", help="the cluster's Jobs API (http://HEAD:8265); default $RAY_ADDRESS")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    query = sub.add_parser(
        "query", help="SQL over a labelling output's `images` and `segments` views", allow_abbrev=False
    )
    query.add_argument("output", metavar="OUTPUT")
    query.add_argument(
        "sql", metavar="SQL", help='e.g. "SELECT label, count(*) FROM segments GROUP BY label"'
    )
    query.add_argument("--format", choices=FORMATS, default="table")
    query.add_argument("--max-rows", type=int, default=100, help="table rows shown (csv and json print all)")
    _storage_flag(query)

    search = sub.add_parser(
        "search", help="images ranked by their best region for a free text (needs label --proposals)",
        allow_abbrev=False,
    )  # fmt: skip
    search.add_argument("output", metavar="OUTPUT")
    search.add_argument("text", metavar="TEXT", help='e.g. "a red umbrella"')
    search.add_argument(
        "--min-area", type=_fraction, default=0.0, help="ignore regions under this fraction of the image"
    )
    search.add_argument("--limit", type=_positive, default=10, help="images listed (default 10)")
    search.add_argument("--format", choices=FORMATS, default="table")
    search.add_argument(
        "--actors", type=_positive, default=None,
        help="score the proposals on N CPU actors on Ray (large outputs); default: in this process",
    )  # fmt: skip
    search.add_argument(
        "--address", help="Ray for --actors (ray://HOST:10001, auto); default $RAY_ADDRESS, else local"
    )
    _storage_flag(search)

    show = sub.add_parser(
        "show", help="draw one labelled image with its masks, outlines and legend", allow_abbrev=False
    )
    show.add_argument("output", metavar="OUTPUT")
    show.add_argument("image_id", metavar="IMAGE_ID", help="an image_id, a unique prefix, or the file name")
    show.add_argument("--out", required=True, help="PNG to write (path or URI)")
    show.add_argument("--alpha", type=float, default=0.5, help="mask opacity, 0..1")
    show.add_argument(
        "--side-by-side", action=argparse.BooleanOptionalAction, default=True,
        help="the original to the left of the overlay (default); --no-side-by-side draws the overlay alone",
    )  # fmt: skip
    show.add_argument("--text", help="draw the image's best region for this text instead (needs --proposals)")
    _storage_flag(show)

    export = sub.add_parser(
        "export", help="COCO JSON, PNG label maps with id2label.json, or a Hugging Face dataset",
        allow_abbrev=False,
    )  # fmt: skip
    export.add_argument("output", metavar="OUTPUT")
    export.add_argument("dest", metavar="DEST", help="a directory or URI (coco: also a .json file)")
    export.add_argument(
        "--format", choices=("coco", "png", "hf"), required=True,
        help="hf: a Hugging Face dataset (image and label Image features, id2label.json; load_dataset(DEST))",
    )  # fmt: skip
    _storage_flag(export)

    report = sub.add_parser(
        "report", help="one self-contained HTML page about an output: run, errors, classes, examples",
        allow_abbrev=False,
    )  # fmt: skip
    report.add_argument("output", metavar="OUTPUT")
    report.add_argument("--out", help="HTML file to write (path or URI); default OUTPUT/report.html")
    _storage_flag(report)
    return parser


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ebseg")
    except PackageNotFoundError:
        return "unknown"


def _storage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
        help="fsspec option for the output (repeatable); credentials come from AWS_* variables",
    )  # fmt: skip


def _run_options(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--spec", help="YAML or JSON spec file; flags override its fields")
    parser.add_argument(
        "--address",
        help="Ray to run on (ray://HOST:10001, HOST:6379, auto); default $RAY_ADDRESS, else local",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the spec; run nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--verbose", action="store_true", help="print Ray's own log lines too (normally in Ray's log files)"
    )
    add_spec_flags(parser, kind)


# ------------------------------------------------------------------------------------------ run commands


# ------------------------------------------------------------------------------------------ cluster commands


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs import submit
    from jobs.specs import load_spec

    spec = load_spec(args.spec)  # invalid specs never reach the cluster
    client, job_id = submit.submit(
        spec, address=args.address, carry_package=args.carry_package, job_id=args.job_id
    )
    say(f"submitted {spec.kind} job {job_id}")
    print(job_id, flush=True)
    if not args.wait:
        say(f"follow it with: ebseg logs {job_id} --follow   (status: ebseg status {job_id})")
        return 0
    try:
        submit.stream_logs(client, job_id)
        status = submit.wait(client, job_id)
    except KeyboardInterrupt:
        say(f"stopped following; job {job_id} keeps running (ebseg status {job_id})")
        return 130
    info = submit.describe(client, job_id)
    say(f"job {job_id} {status.lower()}" + (f": {info['message']}" if status != "SUCCEEDED" else ""))
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from jobs import submit

    info = submit.describe(submit.client(args.address), args.job_id)
    for key, value in info.items():
        if value is not None:
            print(f"{key}: {value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from jobs import submit

    client = submit.client(args.address)
    submit.describe(client, args.job_id)  # an unknown id is an error, not an empty log
    if args.follow:
        submit.stream_logs(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


# ------------------------------------------------------------------------------------------ output commands


_COMMANDS = {
    "label": cmd_run,
    "relabel": cmd_run,
    "train": cmd_run,
    "eval": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
    "query": cmd_query,
    "search": cmd_search,
    "show": cmd_show,
    "export": cmd_export,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in RUNNERS and "ray" not in sys.modules:
        from pipeline.cluster import resolve_address

        if resolve_address(args.address) is None:
            # A new local Ray gets token authentication either way (Ray 2.60 turns it on and warns that it
            # did); saying so before Ray is imported keeps it on without the warning.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    warnings.showwarning = show_warning
    try:
        return _COMMANDS[args.command](args)
    except SpecError as e:
        print(f"ebseg {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `ebseg query OUT "..." | head`: the reader has gone. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit as Python does on EPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except CommandError as e:
        say(f"error: {e}")
        return EXIT_FAILED
    except SubmitError as e:
        say(f"error: {e}")
        return EXIT_FAILED
    except JOB_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        say(f"error: {type(e).__name__}: {message}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
