"""Command line: ``python -m vkd {run,reproduce,train,gan,eval,export,bench} ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .data import DATASETS
from .engine import TrainConfig
from .extras import MissingExtraError
from .gan import GANConfig
from .settings import parsed_yaml


def _refused(error: Exception, status: int = 2) -> int:
    """Report ``error`` as one ``error: ...`` line on stderr (no traceback); the exit status."""
    print(f"error: {error}", file=sys.stderr)
    return status


class _YamlPairs(argparse.Action):
    """``NAME VALUE`` options (repeatable) collected as a dict name -> VALUE read as YAML; a VALUE that is not
    valid YAML is a usage error naming the option (exit status 2)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=2, default={}, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        name, text = values
        try:
            value = parsed_yaml(text, f"{option_string} {name} {text!r}")
        except ValueError as error:
            parser.error(str(error))
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), name: value})


def _yaml(text: str):
    """An option's value read as YAML (argparse ``type``)."""
    try:
        return parsed_yaml(text, repr(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _integer_at_least(low: int):
    """argparse ``type``: an integer of at least ``low`` (a count of steps, images, channels ...)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {text!r}")
        return value
    return count


_positive, _non_negative = _integer_at_least(1), _integer_at_least(0)


def _file(text: str) -> str:
    """argparse ``type`` of a file or folder named on the command line: relative to the working directory, as the
    shell means it (paths inside settings -- out_dir, data_root, teacher_checkpoint -- are relative to the checkout)."""
    return os.path.abspath(os.path.expanduser(text))


def _fields_help(kind: type) -> str:
    """The fields of the run configuration ``kind`` with their defaults, for its command's --help."""
    return "fields (with their defaults): " + ", ".join(f"{name}={value!r}" for name, value in asdict(kind()).items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkd", description="vkd: run the notebooks, train and evaluate "
                                     "runs, export weights, benchmark (python -m vkd COMMAND --help for each)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute one notebook with papermill")
    run.add_argument("notebook", help="path, file name or stem (e.g. 00_orthogonal_projections, or 00)")
    reproduce = commands.add_parser("reproduce", help="execute every notebook in order")
    for sub in (run, reproduce):
        sub.add_argument("--profile", default="smoke", choices=("smoke", "quick", "full"))
        sub.add_argument("-p", "--parameter", action=_YamlPairs, metavar=("NAME", "VALUE"),
                         help="override a parameter (VALUE is read as YAML)")
        sub.add_argument("-f", "--params-file", action="append",
                         help="YAML file of parameters, applied after the profile (repeat: applied in order)")
        sub.add_argument("--output-dir", help="where executed notebooks go (default notebooks/executed)")
        sub.add_argument("--log-output", action="store_true", help="stream the notebook's output")
        sub.add_argument("--as-script", action="store_true",
                         help="run the source as a plain Python script (no Jupyter needed; no executed notebook)")

    training_run = commands.add_parser(
        "train", help="train one run (student, optional teacher, method); under torchrun, one process per GPU "
        "(or CPU process, gloo) with DistributedDataParallel")
    training_run.add_argument("--stop-after-epoch", type=_positive, metavar="N", dest="stop_after",
                              help="end after epoch N as if interrupted (the checkpoint resumes it)")
    gan_run = commands.add_parser("gan", help="train one data-limited GAN run (vkd.gan.GANConfig)")
    gan_run.add_argument("--stop-after-iteration", type=_positive, metavar="N", dest="stop_after",
                         help="end after the checkpoint at iteration N as if interrupted (the checkpoint resumes it)")
    for sub, kind, name in ((training_run, TrainConfig, "vkd.engine.TrainConfig"),
                            (gan_run, GANConfig, "vkd.gan.GANConfig")):
        sub.epilog = _fields_help(kind)
        sub.add_argument("--config", help=f"YAML file of {name} fields (listed below)")
        sub.add_argument("-s", "--set", action=_YamlPairs, metavar=("FIELD", "VALUE"),
                         help="override a field (VALUE is read as YAML)")
        sub.add_argument("--named", metavar="PREFIX", help="name the run PREFIX-<digest of its settings>")

    evaluation = commands.add_parser("eval", help="top-1 / top-5 of a checkpoint on a dataset's evaluation split")
    evaluation.add_argument("checkpoint", type=_file,
                            help="vkd model.pt / checkpoint.pt, a DeiT-style release, or a state dict")
    evaluation.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    evaluation.add_argument("--dataset", default="imagefolder", choices=("imagefolder", *DATASETS))
    evaluation.add_argument("--data-root", default="data", help="imagefolder: the folder holding val/ (or test/)")
    evaluation.add_argument("--image-size", type=_positive, default=224,
                            help="imagefolder: the evaluation size in pixels (default 224; CIFAR stays 32)")
    evaluation.add_argument("--batch", type=_positive, default=256, help="imagefolder: images per batch (default 256)")
    evaluation.add_argument("--workers", type=_non_negative, default=4,
                            help="imagefolder: data-loading processes (default 4)")
    evaluation.add_argument("--num-classes", type=_positive, help="default: the checkpoint's, else the dataset's")
    evaluation.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    evaluation.add_argument("-o", "--model-option", action=_YamlPairs, metavar=("NAME", "VALUE"),
                            help="a timm.create_model argument (VALUE read as YAML), e.g. -o img_size 32")

    export = commands.add_parser("export", help="a finished run's weights as a (half-precision) file")
    export.add_argument("run_dir", type=_file, help="the run folder (holding model.pt and summary.json)")
    export.add_argument("path", type=_file, help="the file to write")
    export.add_argument("--float32", action="store_true", help="keep float32 weights")

    bench = commands.add_parser("bench", help="performance benchmarks (ratios measured in one process)")
    bench_kind = bench.add_subparsers(dest="what", required=True)
    projectors = bench_kind.add_parser("projectors", help="orthogonal projectors vs nn.Linear")
    projectors.add_argument("--student-dims", type=_positive, nargs="+", default=[192, 384])
    projectors.add_argument("--teacher-dims", type=_positive, nargs="+", default=[3024])
    projectors.add_argument("--methods", nargs="+", default=None)
    projectors.add_argument("--batch", type=_positive, default=256)
    projectors.add_argument("--reps", type=_positive, default=20)
    projectors.add_argument("--device", default="cpu", help="cpu | cuda | auto")

    training = bench_kind.add_parser("train", help="student alone vs student + teacher + distillation")
    training.add_argument("--student", default="resnet8")
    training.add_argument("--teacher", default="resnet20")
    training.add_argument("--method", default="vkd")
    training.add_argument("--batch", type=_positive, default=64)
    training.add_argument("--steps", type=_positive, default=20)
    training.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    training.add_argument("--compile", type=_yaml, default=False,
                          help="torch.compile the steps' forward: false | true | a mode (reduce-overhead: CUDA graphs)")
    training.add_argument("--option", action=_YamlPairs, metavar=("NAME", "VALUE"),
                          help="a method option (vkd.distillers.MethodConfig field; VALUE read as YAML)")
    training.add_argument("--cuda-graph", action="store_true",
                          help="add the steps as TrainConfig's cuda_graph runs them (one CUDA graph per step)")

    gan = bench_kind.add_parser("gan", help="GAN iteration: DiffAugment alone vs with VkD (each normalisation)")
    gan.add_argument("--channels", type=_positive, default=32)
    gan.add_argument("--batch", type=_positive, default=32)
    gan.add_argument("--d-steps", type=_positive, default=2)
    gan.add_argument("--teacher", default="resnet20")
    gan.add_argument("--head-dim", type=_non_negative, default=0,
                     help="a linear head before the projector (needed when --channels exceeds the teacher's width)")
    gan.add_argument("--steps", type=_positive, default=10)
    gan.add_argument("--device", default="cpu", help="cpu | cuda | auto")

    deit = bench_kind.add_parser("deit", help="DeiT step: student alone, + teacher forward and KD, + VkD")
    deit.add_argument("--student", default="deit_tiny_distilled_patch16_224")
    deit.add_argument("--teacher", default="regnety_160")
    deit.add_argument("--batch", type=_positive, default=256)
    deit.add_argument("--image-size", type=_positive, default=224)
    deit.add_argument("--steps", type=_positive, default=10)
    deit.add_argument("--device", default="auto", help="cpu | cuda | auto")

    args = parser.parse_args(argv)
    try:
        return _command(args)
    except MissingExtraError as error:  # e.g. `run` where only the library is installed
        return _refused(error)


def _command(args) -> int:
    """Carry out the parsed command; its exit status."""
    if args.command in ("run", "reproduce"):
        from .notebooks import NotebookError, list_notebooks, prepared_run, run_as_script, run_notebook

        try:
            names = [args.notebook] if args.command == "run" else list_notebooks()
            for name in names:  # every notebook's parameters are checked before the first one runs
                prepared_run(name, args.profile, args.parameter, args.params_file)
            for name in names:
                if args.as_script:
                    run_as_script(name, args.profile, args.parameter, args.params_file)
                else:
                    run_notebook(name, args.profile, args.parameter, args.params_file, args.output_dir, args.log_output)
        except NotebookError as error:
            return _refused(error, 1)
        return 0
    if args.command in ("train", "gan"):
        kind = TrainConfig if args.command == "train" else GANConfig
        try:
            config = kind.from_file(args.config, **args.set) if args.config else kind.from_values(**args.set)
        except (FileNotFoundError, ValueError) as error:
            return _refused(error)
        if args.named:
            config = config.named(args.named)
        try:
            summary = config.run(stop_after=args.stop_after)
        except (FileNotFoundError, ValueError) as error:  # missing data or weights; models or a device that
            return _refused(error)  # cannot do what the config says (vkd's ValueErrors name what and why)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    if args.command == "eval":
        from .engine import evaluate_checkpoint

        try:
            result = evaluate_checkpoint(args.checkpoint, args.model, args.dataset, args.data_root, args.image_size,
                                         args.batch, args.device, args.workers, args.model_option,
                                         args.num_classes)
        except (FileNotFoundError, ValueError) as error:  # DataNotFoundError is one
            return _refused(error)
        print(json.dumps(result))
        return 0
    if args.command == "export":
        from .checkpoints import export_weights

        try:
            print(json.dumps(export_weights(args.run_dir, args.path, half=not args.float32)))
        except (FileNotFoundError, ValueError) as error:
            return _refused(error)
        return 0
    try:  # bench
        _bench(args)
    except ValueError as error:  # an unknown model, method, option or device
        return _refused(error)
    return 0


def _bench(args) -> None:
    """``python -m vkd bench WHAT``: print the benchmark's table."""
    if args.what == "projectors":

        from .bench import bench_projectors
        from .projectors import ORTHOGONAL_METHODS

        table = bench_projectors(args.student_dims, args.teacher_dims, args.methods or ORTHOGONAL_METHODS,
                                 args.batch, args.reps, device=args.device)
        print(f"forward+backward (ms), batch {args.batch}, float32, {_where(args.device)}; retract_ms: vkd.retract_, "
              "which the engine runs after every optimiser step, so a training step pays step_ratio_to_linear")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.what == "train":

        from .bench import bench_train

        table = bench_train(args.student, args.teacher, args.method, args.batch, args.steps, device=args.device,
                            method_options=args.option, compile=args.compile, cuda_graph=args.cuda_graph)
        print(f"training steps of {args.student} (teacher {args.teacher}), batch {args.batch}, 32 px, "
              f"compile {args.compile}, {_where(args.device)}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if args.cuda_graph:
            from .bench import captured_step_difference

            check = captured_step_difference(args.student, args.teacher, args.method, args.batch, device=args.device,
                                             method_options=args.option, compile=args.compile)
            print(f"captured vs eager step, {check['steps']} steps from the same weights: largest parameter "
                  f"difference {check['max_abs_difference']:.3g} ({check['relative']:.3g} of the largest parameter)")
    if args.what == "gan":
        from .bench import bench_gan

        table = bench_gan(args.channels, args.batch, args.d_steps, args.teacher, head_dim=args.head_dim,
                          steps=args.steps, device=args.device)
        print(f"GAN iterations ({args.d_steps} discriminator updates + 1 generator update), width {args.channels}, "
              f"batch {args.batch}, teacher {args.teacher}, head_dim {args.head_dim}, float32, {_where(args.device)}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.what == "deit":
        from .bench import bench_deit

        table = bench_deit(args.student, args.teacher, args.batch, args.steps, args.image_size, device=args.device)
        print(f"training steps of {args.student} (teacher {args.teacher}), batch {args.batch}, {args.image_size} px, "
              f"synthetic data, {_where(args.device)}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


def _where(device: str) -> str:
    """The device a benchmark ran on, in words."""
    from .runtime import device_description, resolve_device

    return device_description(resolve_device(device))
