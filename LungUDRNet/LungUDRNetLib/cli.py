"""The ``lungudrnet`` command line: ``register``, ``demo`` and ``lung-mask``; the trainer and the bench add theirs.

Exit status: 0 on success; on a problem the user can fix, one line naming the
input and what is wrong, and the status of the error class (1 some pairs of a
cohort failed, 2 input/model/device, 3 output, 4 resources, 130 interrupted
by Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Callable, Iterable

from . import progress_events
from .errors import CancelledError, LungUDRNetError, ResourceError

log = logging.getLogger("LungUDRNetLib")
COMMANDS_GROUP = "lungudrnet.commands"
CORE_COMMANDS = ("register", "demo", "lung-mask")  # the subcommands this package defines itself
# Measured figures quoted by --help (the same sentences are in the README and the panel: one fact, one figure).
SPEED_NOTE = ("on a 192x192x208 breathing pair the whole register command took 5.8-8.5 s, 4.5-5.8 s with "
              "--fast; on the bench's 7 breathing pairs mean TRE 0.25 mm, 1.54 mm with --fast (bench of 2026-12-06 "
              "12:43 UTC, 2-core CPU in a slow period)")
NATIVE_NOTE = ("e.g. 137x98x148 nodes, 24 MB, for a 192x192x208 pair whose field on the fixed grid takes 92 MB; "
               "measured 2026-12-06")
AddParsers = Callable[[argparse._SubParsersAction], None]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show (None, or a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def verbosity_options(default=False) -> argparse.ArgumentParser:
    """-v/--verbose and -q/--quiet as a parent parser; default SUPPRESS in a subcommand, so that an option
    given before the subcommand is not overwritten."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="show debug messages")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="show warnings and errors only")
    return parent


class CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand, also those of plugins: defaults in its help, -v/-q after its name."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["parents"] = [*kwargs.get("parents", []), verbosity_options(argparse.SUPPRESS)]
        super().__init__(**kwargs)


def add_register_parser(subparsers) -> None:
    parser = subparsers.add_parser("register", help="register a moving CT onto a fixed CT, or every pair of a "
                                                    "pairs CSV")
    parser.add_argument("--fixed", help="fixed image (NIfTI, NRRD, MHA or DICOM folder); needed unless --pairs")
    parser.add_argument("--moving", help="moving image, resampled onto the fixed grid; needed unless --pairs")
    parser.add_argument("--pairs", metavar="CSV",
                        help="register a cohort instead of one pair: every row of this CSV (columns fixed, moving, "
                             "optional fixed_mask, moving_mask, fixed_points, moving_points, name; paths relative "
                             "to the CSV's folder), one subfolder of --out per pair and a summary.csv; pairs "
                             "already done are skipped; under torchrun each process does its share")
    parser.add_argument("--out", required=True, help="output folder for warped.nii.gz, displacement.nii.gz, "
                                                     "metrics.json (with --pairs: a subfolder per pair and "
                                                     "summary.csv)")
    parser.add_argument("--model", help="checkpoint (.pt) or training run folder; default: bundled weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--fixed-mask", help="lung mask of the fixed image (voxels above 0.5 are lung; focuses the "
                                             "network grid; default: an "
                                             "automatic one, as `lungudrnet lung-mask` writes)")
    parser.add_argument("--moving-mask", help="lung mask of the moving image (affine pre-alignment, lung Dice; "
                                              "default: an automatic one)")
    parser.add_argument("--fixed-series", metavar="UID", help="SeriesInstanceUID to read when --fixed is a DICOM "
                                                              "folder with several series")
    parser.add_argument("--moving-series", metavar="UID", help="the same for --moving")
    parser.add_argument("--max-memory", metavar="SIZE", help="refuse to start if the estimated peak memory exceeds "
                                                             "SIZE, e.g. 8G or 512M (default: the available memory)")
    parser.add_argument("--fast", action="store_true",
                        help=f"the network's field only, without instance optimisation on this pair ({SPEED_NOTE})")
    parser.add_argument("--iterations", type=int, metavar="N",
                        help="Gauss-Newton steps of instance optimisation in all, the model's last ones on its finer "
                             "grid (default: the model's setting; the bundled weights: 3, two on a 4 mm grid, then "
                             "one on a 2.5 mm grid; more: slower, rarely more exact)")
    parser.add_argument("--displacement-grid", choices=("native", "fixed"), default="native",
                        help="grid of displacement.nii.gz: 'native' = the resolution the field really has, "
                             "the displacement grid of instance optimisation's last step (the network grid with "
                             "--fast) extended to cover the fixed image, which "
                             f"tools interpolate to the same field at every fixed voxel ({NATIVE_NOTE}); 'fixed' = "
                             "the fixed image's own grid, for tools that need it there (12 bytes per fixed voxel)")
    parser.add_argument("--no-affine", dest="affine", action="store_false",
                        help="skip the affine pre-alignment (the network alone, as in the paper); by default the "
                             "result keeps each stage (affine, the network run from the better of identity and "
                             "affine, instance optimisation) only if it raises the similarity in the lungs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files (with --pairs: "
                                                                 "redo every pair)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="with --pairs: register N pairs at a time in worker processes, each with 1/N of the "
                             "CPU threads; 1 = in this process")
    parser.set_defaults(run=run_register, register_parser=parser)


def _check_register_mode(args: argparse.Namespace) -> None:
    """One pair (--fixed and --moving) or a cohort (--pairs), with the options of that mode; else a usage error."""
    parser = args.register_parser
    if args.pairs is not None:
        given = [option for option, value in (("--fixed", args.fixed), ("--moving", args.moving)) if value]
        if given:
            parser.error(f"--pairs registers the pairs of a CSV; leave out {' and '.join(given)}")
        one_pair = [option for option, value in (("--fixed-mask", args.fixed_mask),
                                                   ("--moving-mask", args.moving_mask),
                                                   ("--fixed-series", args.fixed_series),
                                                   ("--moving-series", args.moving_series)) if value]
        if one_pair:
            parser.error(f"{one_pair[0]} is for one pair; with --pairs give masks in the CSV's fixed_mask and "
                         "moving_mask columns")
        if args.jobs < 1:
            parser.error(f"--jobs must be at least 1, not {args.jobs}")
        return
    missing = [option for option, value in (("--fixed", args.fixed), ("--moving", args.moving)) if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --pairs CSV for a cohort)")
    if args.jobs != 1:
        parser.error("--jobs is for a cohort (--pairs)")


def run_register(args: argparse.Namespace) -> None:
    _check_register_mode(args)
    from .register_files import Options

    options = Options(model=args.model, device=args.device, max_memory=args.max_memory, fast=args.fast,
                      iterations=args.iterations, affine=args.affine, displacement_grid=args.displacement_grid)
    if args.pairs is not None:
        return _run_cohort(args, options)
    from .outputs import check_output_dir
    from .register_files import read_inputs

    paths = {"fixed image": args.fixed, "moving image": args.moving, "fixed mask": args.fixed_mask,
             "moving mask": args.moving_mask}
    series = {"fixed image": args.fixed_series, "moving image": args.moving_series}
    out_dir = check_output_dir(args.out, [path for path in paths.values() if path is not None], args.overwrite)
    inputs = read_inputs(paths, options, series=series)
    result = inputs.register(options, progress=_print_progress)
    report, written = inputs.save(result, out_dir, options, args.overwrite)
    progress_events.emit("result", paths={name: str(path) for name, path in written.items()})
    _print_summary(report, out_dir)


def _run_cohort(args: argparse.Namespace, options) -> None:
    from .cohort import CohortError, run_cohort

    outcome = run_cohort(args.pairs, args.out, options, jobs=args.jobs, overwrite=args.overwrite,
                         progress=not args.quiet)
    if outcome.summary is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if outcome.failed:
        raise CohortError(outcome.message())
    print(outcome.message())


def _print_progress(fraction: float, message: str) -> None:
    log.info("[%3d%%] %s", round(100 * fraction), message)
    progress_events.emit_progress(fraction, message, stage="registration")


def _print_summary(report: dict, out_dir: Path) -> None:
    from .report import summary_line

    print(summary_line(report))
    print(f"results in {out_dir}")


def build_parser(extra_commands: Iterable[AddParsers] = (), plugins: bool = True) -> argparse.ArgumentParser:
    """The ``lungudrnet`` parser: the core's commands, and with ``plugins`` those of :func:`command_plugins`."""
    parser = argparse.ArgumentParser(prog="lungudrnet", formatter_class=HelpFormatter,
                                     parents=[verbosity_options()])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--progress-json", action="store_true",
                        help="write progress, warnings, results and errors as JSON lines on standard output (for "
                             "programs that run lungudrnet as a child process); everything else goes to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    add_register_parser(subparsers)
    from .demo import add_demo_parser
    add_demo_parser(subparsers)
    from .lung_mask_command import add_lung_mask_parser
    add_lung_mask_parser(subparsers)
    for add_parsers in command_plugins(extra_commands) if plugins else ():
        add_parsers(subparsers)
    parser.description = (f"Deformable registration of lung CT with UDRNet. Commands: {', '.join(subparsers.choices)}"
                          "; 'lungudrnet COMMAND --help' lists the options of one.")
    return parser


def package_version() -> str:
    """The installed version of lungudrnet, or "unknown (not installed)" where it runs from source (Slicer)."""
    try:
        return version("lungudrnet")
    except PackageNotFoundError:
        return "unknown (not installed)"


def command_plugins(extra_commands: Iterable[AddParsers] = ()) -> list[AddParsers]:
    """The subcommands that other packages add (``train``, ``evaluate``, ``bench``), each once.

    Installed packages declare them as entry points of the group
    ``lungudrnet.commands``; a caller that is not installed (Slicer's child
    processes) passes its own in ``extra_commands``. The core imports none of them.
    """
    plugins = {f"{add.__module__}:{add.__qualname__}": add for add in extra_commands}
    for entry_point in entry_points(group=COMMANDS_GROUP):
        if entry_point.value not in plugins:
            with contextlib.suppress(ImportError):  # a plugin whose dependencies are not installed
                plugins[entry_point.value] = entry_point.load()
    return list(plugins.values())


def show_library_warnings(show: bool) -> None:
    """Whether ITK (and through it GDCM) print their multi-line warnings to stderr; off unless -v, so that a
    problem shows as the command's one line."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(bool(show))


def _raise_cancelled(signum, frame) -> None:
    raise CancelledError(f"interrupted by signal {signal.Signals(signum).name}; no partial output was kept")


def main(argv: list[str] | None = None, extra_commands: Iterable[AddParsers] = ()) -> int:
    """Run the ``lungudrnet`` command line; ``extra_commands`` as in :func:`command_plugins`.

    The plugins are imported only where ``argv`` names none of the core's commands (importing the bench's
    took about 0.4 s of every ``register``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(extra_commands, plugins=_command_in(argv) not in CORE_COMMANDS)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_cancelled)
    show_library_warnings(args.verbose)
    if not args.progress_json:
        return _run(args)
    with progress_events.channel_on(sys.stdout), contextlib.redirect_stdout(sys.stderr):
        return _run(args)


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (no top-level option takes a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _run(args: argparse.Namespace) -> int:
    """The chosen command; a problem ends it with one line on standard error and its exit status."""
    try:
        args.run(args)
    except KeyboardInterrupt:
        return _fail("interrupted; no partial output was kept", CancelledError.exit_code)
    except MemoryError:
        return _fail("error: ran out of memory; close other programs, or crop or downsample the images "
                     "(see --max-memory)", ResourceError.exit_code)
    except LungUDRNetError as error:
        return _fail(f"error: {error}", error.exit_code)
    return 0


def _fail(message: str, exit_code: int) -> int:
    print(f"lungudrnet: {message}", file=sys.stderr)
    progress_events.emit("error", message=message.removeprefix("error: "), exit_code=exit_code)
    return exit_code


def program() -> int:
    """The ``lungudrnet`` program: :func:`main`, then every object left is frozen out of the garbage
    collector (:func:`gc.freeze`), whose passes over torch's objects while the interpreter shut down took
    0.2-0.3 s of every command on 2 CPU cores. Only for a process about to end."""
    exit_code = main()
    gc.freeze()
    return exit_code


if __name__ == "__main__":
    sys.exit(program())
