"""featcircuits push DIR REPO_ID [--dry-run OUTDIR] [--revision R] [--private] [--token T]"""

from __future__ import annotations

import argparse

HELP = "Publish dictionaries (a `featcircuits train --out` folder) to the Hugging Face Hub with a model card."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder of dictionaries, e.g. what `featcircuits train --out` wrote")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/my-transcoders")
    parser.add_argument("--dry-run", metavar="OUTDIR", help="write the exact folder that would be uploaded to OUTDIR; "
                        "upload nothing")
    parser.add_argument("--revision", help="branch to commit to (created if new; default main)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the one `hf auth login` saved)")
    parser.add_argument("--base-model", help="Hub id of the model, for the card's base_model (default: the "
                        "dictionaries' model name when it is an org/name id)")


def run(args: argparse.Namespace) -> int:
    from ..hub.publish import HubAuthError, build_upload_folder, describe_folder, push_to_hub

    if args.dry_run:
        from pathlib import Path

        from .._paths import output_dir

        dry_run = output_dir(args.dry_run, "--dry-run", create=False)  # before loading anything
        if dry_run.is_dir() and any(dry_run.iterdir()):
            raise ValueError(f"--dry-run {dry_run} is not empty; choose a new folder for the upload so nothing in it "
                             "is overwritten.")
        if not Path(args.dir).is_dir():
            raise FileNotFoundError(f"push: {args.dir} is not a directory of dictionaries; give what "
                                    "`featcircuits train --out` wrote.")
        try:
            folder = build_upload_folder(args.dir, args.dry_run, args.repo_id, base_model=args.base_model)
        except FileExistsError as err:
            raise ValueError(str(err)) from None
        print(describe_folder(folder))
        print(f"dry run: wrote the folder that would be uploaded to {args.repo_id}: {folder}")
        return 0
    try:
        url = push_to_hub(args.dir, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                          base_model=args.base_model)
    except (HubAuthError, ConnectionError) as err:
        raise ValueError(str(err)) from None
    print(f"pushed to {args.repo_id}: {url}")
    return 0
