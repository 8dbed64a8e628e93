"""The command line: chains the pipeline's steps and prints their reports.

Exit status: 0 success, 1 verification failed, 2 bad spec or usage, 130 interrupted (Ctrl-C).
Every error is one line on stderr, `error: <field>: <rule>`, and no error leaves output
half-written: the output folder is replaced whole or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import GncodegenError, SpecError
from .output import check_output, write_output
from .pipeline import Result, load_spec, merge_earlier, run, run_spec
from .describe import choice_lines, layer_rows, option_rows
from .report import with_report
from .text import counted
from .targets import RunOptions, cli_options, resolve_targets, target_help
from .text import unsafe_char

INTERRUPTED = 130   # 128 + SIGINT, as shells report a command that Ctrl-C stopped


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _report(result: Result, verified: bool) -> str:
    rows = [["layer", "target", "ran on", "compiled", "max error", "tolerance", "status"]]
    for t in result.targets:
        outcome = result.outcomes.get(t.name)
        if not verified or outcome is None:
            for p in result.plans:
                rows.append([p.prefix, t.name, "-", "no", "-", "-", "not verified"])
            continue
        for r in outcome.reports:
            # CUDA without nvcc was compiled for the host emulation only (g++)
            compiled = ("g++ only" if t.name == "cuda" and not any(
                c.case.startswith("nvcc") for c in r.cases) else "yes")
            rows.append([r.layer, t.name, r.runner, compiled, f"{r.max_rel:.2g}",
                         f"{r.tolerance:g}", "pass" if r.passed else "FAIL"])
    lines = [_table(rows)]
    for outcome in result.outcomes.values():
        lines.extend(outcome.notes)
    failed = [f"{r.layer}/{r.target}: {c.case} (error {c.max_rel:.2g}, "
              f"{c.nan_mismatch} NaN mismatches)"
              for o in result.outcomes.values() for r in o.reports for c in r.cases
              if not c.passed]
    if failed:
        lines.append("failed cases:")
        lines.extend(f"  {f}" for f in failed)
    lines.extend(f"FAIL: {f}" for o in result.outcomes.values() for f in o.failures)
    return "\n".join(lines)


def _clean(text: str, keep_newlines: bool = False) -> str:
    """Return text with every character that could hide text (or is not UTF-8) escaped."""
    return "".join(ch if (keep_newlines and ch == "\n") or unsafe_char(ch) is None else
                   ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


def _say_error(message: str) -> None:
    """Print `error: message` on stderr (a compiler's output may follow on later lines)."""
    click.echo(f"error: {_clean(message, keep_newlines=True)}", err=True)


def _fail(exc: GncodegenError) -> None:
    _say_error(str(exc))
    sys.exit(exc.exit_code)


class _Main(click.Group):
    """The command group, reporting usage errors and Ctrl-C on one line like every error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _say_error("interrupted")
            sys.exit(INTERRUPTED)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:     # usage errors
            _say_error(f"usage: {exc.format_message()} (see --help)")
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _say_error("interrupted")
            sys.exit(INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


def _keep_cache_small() -> None:
    """Prune the build cache to its cap after a command's run, at most once in a while (the
    walk over every entry takes a moment); never fails the command."""
    from .build import prune_cache_now_and_then

    try:
        prune_cache_now_and_then()
    except (GncodegenError, OSError):
        pass


target_option = click.option("--target", "-t", default="c", show_default=True,
                             help=target_help())
allow_code_option = click.option(
    "--allow-code", is_flag=True, help="Allow module:function initializers to run Python code.")
keep_option = click.option("--keep", is_flag=True, help="Print where the build folder is.")


def target_options(func):
    """Add every target's own options (e.g. --cuda-runner) to a command."""
    for opt in reversed(cli_options()):
        kind = click.Choice(opt.choices, case_sensitive=False) if opt.choices else str
        func = click.option(opt.flag, opt.name, default=opt.default,
                            show_default=bool(opt.default), type=kind, help=opt.help)(func)
    return func


def run_options(keep: bool, values: dict[str, str]) -> RunOptions:
    """Return the RunOptions of a command's shared and target options (a choice as typed in
    any case; free text, such as compiler flags, exactly as given)."""
    choices = {opt.name for opt in cli_options() if opt.choices}
    return RunOptions(keep, tuple(sorted((k, v.lower() if k in choices else v)
                                         for k, v in values.items())))


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gncodegen")
def main() -> None:
    """Generate, build and verify C and CUDA for MATLAB-style group normalization layers."""


@main.command()
@click.argument("spec")
@click.option("-o", "--output", "out_dir",
              help="Output folder [default: generated/<spec stem>/].")
@target_option
@click.option("--no-verify", is_flag=True, help="Write the sources without compiling them.")
@allow_code_option
@keep_option
@target_options
def build(spec: str, out_dir: str | None, target: str, no_verify: bool, allow_code: bool,
          keep: bool, **values: str) -> None:
    """Render, compile and verify SPEC, then write the sources and manifest.json."""
    # Plain strings, checked by gncodegen (a SPEC that is a folder, -o naming a file): one line.
    out = out_dir if out_dir is not None else str(Path("generated") / Path(spec).stem)
    try:
        if not spec:
            raise SpecError("spec", "the file name is empty")
        check_output(out)                # before any work: refuse a folder that is not ours
        result = run(spec, target=target.lower(), verify=not no_verify, allow_code=allow_code,
                     options=run_options(keep, values))
        click.echo(_report(result, verified=not no_verify))
        if not result.passed:
            click.echo("error: verification failed; nothing was written", err=True)
            sys.exit(1)
        files, manifest, notes = merge_earlier(result, out)
        files, manifest = with_report(result.spec, files, manifest)
        write_output(out, files, manifest)
    except GncodegenError as exc:
        _fail(exc)
    _keep_cache_small()
    for note in notes:
        click.echo(_clean(note))
    names = ", ".join(s.name for s in result.sources)
    click.echo(f"wrote {_clean(out)}/: {names}, report.html, manifest.json")


@main.command("import")
@click.argument("model")
@click.option("-o", "--output", "out_dir", help="Folder for <model stem>.yaml and .npz "
              "[default: the working directory].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0xD1x...",
              help="An ONNX input's shape where the model leaves it open (? for a size left "
                   "to run time); may be given for several inputs.")
def import_(model: str, out_dir: str | None, input_shapes: tuple[str, ...]) -> None:
    """Find the group normalizations of MODEL (.onnx, or .pt2 from torch.export.save) and
    write them as a spec with their parameters beside it."""
    from .importer import import_model, table

    try:
        result = import_model(model, out_dir, input_shapes)
    except GncodegenError as exc:
        _fail(exc)
    click.echo(_clean(table(result), keep_newlines=True))


@main.command()
@click.argument("spec")
@target_option
@allow_code_option
@keep_option
@target_options
def verify(spec: str, target: str, allow_code: bool, keep: bool, **values: str) -> None:
    """Build SPEC in a scratch folder and verify it against the reference; write nothing."""
    try:
        result = run(spec, target=target.lower(), verify=True, allow_code=allow_code,
                     options=run_options(keep, values))
    except GncodegenError as exc:
        _fail(exc)
    _keep_cache_small()
    click.echo(_report(result, verified=True))
    if not result.passed:
        sys.exit(1)


@main.command()
@click.argument("spec")
@click.option("--target", "-t", default="all", show_default=True,
              help="Whose choices to print (as for build).")
@allow_code_option
def show(spec: str, target: str, allow_code: bool) -> None:
    """Print the resolved layers of SPEC, their plans and each target's choices."""
    try:
        loaded = load_spec(spec, allow_code=allow_code)
        targets = resolve_targets(target.lower())
        result = run_spec(loaded, targets, verify=False)
    except GncodegenError as exc:
        _fail(exc)
    for i, plan in enumerate(result.plans):
        click.echo(f"layer {plan.layer.name}")
        for key, value in layer_rows(plan):
            click.echo(f"  {key:<20} {value}")
        click.echo("  plan")
        for line in plan.summary:
            click.echo(f"    {line}")
        for t in result.targets:
            click.echo(f"  target {t.name}")
            for key, value in option_rows(t, plan):
                click.echo(f"    {key}: {value}")
            for line in choice_lines(t, result.records[t.name][i], plan):
                click.echo(f"    {line}")


@main.group()
def cache() -> None:
    """See or empty the build cache ($GNCODEGEN_CACHE, else ~/.cache/gncodegen)."""


@cache.command("info")
def cache_info() -> None:
    """Print where the cache is, how many builds it holds and their size."""
    from .build import cache_entries, cache_limit, cache_root

    try:
        limit = cache_limit()
    except GncodegenError as exc:
        _fail(exc)
    entries = cache_entries()
    total = sum(size for _, size, _ in entries)
    click.echo(f"cache: {_clean(str(cache_root()))}")
    click.echo(f"{counted(len(entries), 'build')}, "
               f"{total / 2**20:.1f} MiB (kept under {limit / 2**20:.0f} MiB: "
               "GNCODEGEN_CACHE_MAX)")


@cache.command("clean")
def cache_clean() -> None:
    """Remove every build in the cache (they are made again when needed)."""
    from .build import prune_cache

    removed, freed = prune_cache(0)
    click.echo(f"removed {counted(removed, 'build')}, {freed / 2**20:.1f} MiB")


if __name__ == "__main__":  # pragma: no cover
    main()
