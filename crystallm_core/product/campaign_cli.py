"""`python -m crystallm_core campaign SPEC --out DIR` and `campaign status DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="SPEC.toml or SPEC.json (or 'status' to report on DIR)")
    parser.add_argument("directory", nargs="?", type=Path, help="with 'status': the campaign directory")
    parser.add_argument("--out", type=Path, help="campaign directory (an unfinished campaign there is continued)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to ('auto' or ray://host:10001); default: a local Ray")
    parser.add_argument("--workers", type=int, default=None, help="sampler actors (default: CPUs − 1)")
    parser.add_argument("--local", action="store_true", help="no Ray: every chunk in this process, in order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from crystallm_core.product.campaign import campaign_status, run_campaign
    from crystallm_core.product.campaign_spec import load_spec

    if args.spec == "status":
        if args.directory is None:
            raise ValueError("campaign status needs the campaign directory")
        print(campaign_status(args.directory))
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {args.workers}")
    spec = load_spec(args.spec)
    summary = run_campaign(spec, args.out, address=args.address, workers=args.workers,
                           backend="local" if args.local else "ray", progress=not args.no_progress)
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"rows: {args.out / 'rows'} · top candidates: {args.out / 'top.csv'} · summary: {args.out / 'summary.csv'}")
    return 0
