"""`python -m crystallm_core COMMAND …`: one entry point, each command's code in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": ("crystallm_core.product.generate_cli", "sample structures for target properties"),
    "prepare-data": ("crystallm_core.chem.data.data_prep", "build the training table, splits and token cache"),
    "train": ("crystallm_core.lm.training", "train a PKV model from the token cache"),
    "finetune": ("crystallm_core.product.finetune", "fine-tune a model on your own structures and properties"),
    "align": ("crystallm_core.product.align", "reward fine-tuning: the model learns from its own judged samples"),
    "evaluate": ("crystallm_core.product.evaluate", "score a directory of CIF files"),
    "relax": ("crystallm_core.chem.judges.relaxation", "relax one CIF with CHGNet and re-check it"),
    "campaign": ("crystallm_core.product.campaign_cli", "a screening campaign on Ray: many targets × many samples"),
}


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one clear line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m crystallm_core", description="CrystaLLM Studio command line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
