"""Command line: ``python -m vkd {run,reproduce,bench} ...``."""

from __future__ import annotations

import argparse
import sys

import yaml


def _parse_overrides(pairs: list[list[str]] | None) -> dict:
    return {name: yaml.safe_load(value) for name, value in (pairs or [])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute one notebook with papermill")
    run.add_argument("notebook", help="path, file name or stem (e.g. 00_orthogonal_projections, or 00)")
    reproduce = commands.add_parser("reproduce", help="execute every notebook in order")
    for sub in (run, reproduce):
        sub.add_argument("--profile", default="smoke", choices=("smoke", "quick", "full"))
        sub.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                         help="override a parameter (VALUE is read as YAML)")
        sub.add_argument("-f", "--params-file", help="YAML file of parameters, applied after the profile")
        sub.add_argument("--output-dir", help="where executed notebooks go (default notebooks/executed)")
        sub.add_argument("--log-output", action="store_true", help="stream the notebook's output")

    bench = commands.add_parser("bench", help="performance benchmarks (ratios measured in one process)")
    bench_kind = bench.add_subparsers(dest="what", required=True)
    projectors = bench_kind.add_parser("projectors", help="orthogonal projectors vs nn.Linear")
    projectors.add_argument("--student-dims", type=int, nargs="+", default=[192, 384])
    projectors.add_argument("--teacher-dims", type=int, nargs="+", default=[3024])
    projectors.add_argument("--methods", nargs="+", default=None)
    projectors.add_argument("--batch", type=int, default=256)
    projectors.add_argument("--reps", type=int, default=20)

    training = bench_kind.add_parser("train", help="student alone vs student + teacher + distillation")
    training.add_argument("--student", default="resnet8")
    training.add_argument("--teacher", default="resnet20")
    training.add_argument("--method", default="vkd")
    training.add_argument("--batch", type=int, default=64)
    training.add_argument("--steps", type=int, default=20)

    args = parser.parse_args(argv)
    if args.command in ("run", "reproduce"):
        from .notebooks import NotebookError, list_notebooks, run_notebook

        names = [args.notebook] if args.command == "run" else list_notebooks()
        try:
            for name in names:
                run_notebook(name, args.profile, _parse_overrides(args.parameter), args.params_file,
                             args.output_dir, args.log_output)
        except NotebookError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.what == "projectors":
        import torch

        from .bench import bench_projectors
        from .projectors import ORTHOGONAL_METHODS

        table = bench_projectors(args.student_dims, args.teacher_dims, args.methods or ORTHOGONAL_METHODS,
                                 args.batch, args.reps)
        print(f"forward+backward, batch {args.batch}, float32, {torch.get_num_threads()} CPU threads")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.what == "train":
        import torch

        from .bench import bench_train

        table = bench_train(args.student, args.teacher, args.method, args.batch, args.steps)
        print(f"training steps of {args.student} (teacher {args.teacher}), batch {args.batch}, 32 px, "
              f"{torch.get_num_threads()} CPU threads")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0
