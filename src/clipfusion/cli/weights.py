"""``clipfusion weights fetch|verify|where``: the pretrained weights, once on a connected machine, then
offline anywhere."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    build_config,
    err,
    say,
    weights_dir,
    weights_origin,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="fetch, verify or locate the pretrained weights (offline use)")
    wsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    w = wsub.add_parser(
        "fetch", help="download everything the preset needs into one folder (connected machine)"
    )
    w.add_argument("--to", required=True, type=Path, help="the weights folder to create or complete")
    w.add_argument("--variant", help="weight variant, e.g. fp16 (half the download for the SD components)")
    w.add_argument("--clip-repo", help="hub repository of the OpenCLIP weights (default: open_clip's own)")
    w.add_argument("--clip-revision", default="main", help="revision of the OpenCLIP repository")
    w.add_argument("--sd-repo", help="hub repository of SD-2-inpainting (default: the configuration's)")
    w.add_argument("--sd-revision", help="revision of the SD-2-inpainting repository")
    add_model_options(w)
    w.set_defaults(func=run)
    w = wsub.add_parser("verify", help="check a weights folder against its manifest")
    w.add_argument("folder", type=Path)
    w.set_defaults(func=run)
    w = wsub.add_parser(
        "where",
        help="say which weights would be used, from where, and whether every required file is present "
        "(exit 2 when one is missing; -q: nothing printed but the problems)",
    )
    add_model_options(w)
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.models import weights

    if args.action == "verify":
        problems = weights.verify(args.folder)
        for line in problems:
            err(line)
        if problems:
            return EXIT_USAGE
        manifest = weights.read_manifest(args.folder) or {}
        total = sum(f["size"] for f in manifest.get("files", []))
        print(f"{args.folder}: {len(manifest.get('files', []))} files, {total / 1e9:.2f} GB, all intact")
        return EXIT_OK
    config = build_config(args)
    if args.action == "where":
        lines, problems = weights.describe(config, weights_dir(args), origin=weights_origin(args))
        if args.quiet:  # for scripts: nothing on success, one line per problem otherwise
            for line in problems:
                err(line)
        else:
            print("\n".join(lines))
            if problems:
                err(f"{len(problems)} problem(s) with the weights this configuration needs (listed above)")
        return EXIT_USAGE if problems else EXIT_OK
    sources = weights.sources_for(
        config, clip_repo=args.clip_repo, clip_revision=args.clip_revision, variant=args.variant
    )
    if args.sd_repo or args.sd_revision:
        sd = sources[1]
        sources[1] = replace(sd, repo_id=args.sd_repo or sd.repo_id, revision=args.sd_revision or sd.revision)
    say(f"fetching into {args.to}:")
    for source in sources:
        say(f"  {source.component}: {source.repo_id}@{source.revision}")
    manifest = weights.fetch(args.to, sources, log=say)
    total = sum(f["size"] for f in manifest["files"])
    print(f"done: {len(manifest['files'])} files, {total / 1e9:.2f} GB; use it with --weights-dir {args.to}")
    return EXIT_OK
