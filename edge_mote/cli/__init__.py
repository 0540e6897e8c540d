"""The ``edge-mote`` command line: thin click commands over the library (one module per command).

Subcommands are imported lazily so that ``edge-mote --help`` stays fast (no numpy/llama_cpp import).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# command name -> (module, attribute, one-line help shown by --help without importing the module)
COMMANDS = {
    "convert": ("edge_mote.cli.convert", "convert",
                "Convert a transformers model (folder or Hub repo) to GGUF with llama.cpp's converter, plus profiles."),
    "demo": ("edge_mote.cli.demo", "demo", "Steer a tiny MoE the project makes itself (no downloads) and show the effect."),
    "eval": ("edge_mote.cli.eval", "eval_", "Top-N vs random-N experts OFF/DROP/ON: behaviour, false behaviour, KL, perplexity."),
    "info": ("edge_mote.cli.info", "info", "Show a model's architecture, MoE layers, experts and stored profiles."),
    "scan": ("edge_mote.cli.scan", "scan", "Find the experts behind a behaviour: rank them by risk difference between two prompt sets (fTRI)."),
    "prune": ("edge_mote.cli.prune", "prune",
              "Physically remove routed experts (bit-exact, also quantized; profiles renumbered)."),
    "profile": ("edge_mote.cli.profile", "profile", "Add, list and remove named steering profiles stored in a GGUF."),
    "quantize": ("edge_mote.cli.quantize", "quantize",
                 "Quantize with llama.cpp (uniform or expert-aware moe recipe, imatrix from prompts); profiles kept."),
    "rpc-worker": ("edge_mote.cli.rpc_worker", "rpc_worker", "Old name of `worker`."),
    "worker": ("edge_mote.cli.worker", "worker",
               "Run an RPC worker (loopback by default) so another machine can place layers here."),
    "cluster": ("edge_mote.cli.cluster", "cluster", "Home cluster: plan the layer split over RPC workers."),
    "run": ("edge_mote.cli.run", "run", "Generate text with optional expert steering (OFF/DROP/ON/bias, profiles)."),
    "serve": ("edge_mote.cli.serve", "serve",
              "OpenAI-compatible HTTP server; each request carries its own steering (continuous batching)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-mote")
def cli():
    """edge-mote: find, steer and ship the experts of Mixture-of-Experts LLMs (llama.cpp)."""


def _one_line_warnings() -> None:
    """edge-mote's own warnings (steering an untested architecture) as one ``warning: ...`` line on stderr."""
    import warnings

    from ..arch_support import UnverifiedArchitectureWarning

    shown = warnings.showwarning
    if getattr(shown, "_edge_mote", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedArchitectureWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._edge_mote = True
    warnings.showwarning = show


def main(argv=None) -> int:
    from ..errors import EdgeMoteError, UserError

    debug = os.environ.get("EDGE_MOTE_DEBUG") == "1"
    _one_line_warnings()
    try:
        cli.main(args=argv, prog_name="edge-mote", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:  # bad command line: one line and where to look, exit 2
        ctx = e.ctx
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # a bare group: its help, as click does
            click.echo(ctx.get_help())
            return 0
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        click.echo(f"hint: {ctx.command_path if ctx else 'edge-mote'} --help", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except EdgeMoteError as e:  # UserError (bad input): exit 2; other library errors: exit 1
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:  # an edge-mote bug: one line, traceback on request
        if debug:
            raise
        click.echo(f"error: internal error: {type(e).__name__}: {e}", err=True)
        click.echo("hint: rerun with EDGE_MOTE_DEBUG=1 for a traceback", err=True)
        return 1


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def entry() -> None:
    sys.exit(main())
