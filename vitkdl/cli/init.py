"""``vitkdl init --teacher T --student S``: write a recipe with the paper's layout for a pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from vitkdl.cli.common import consoles
from vitkdl.exits import writing

HELP = """Write a recipe that distils TEACHER into STUDENT (any two timm ViTs with the same token
grid) with the ViTKD paper's layout: mimic the student's first two blocks to the teacher's,
generate the teacher's final norm tokens from the student's, NKD on the logits, and the paper's
DeiT data and training recipe. Feature weights are scaled so that each term's per-element
coefficient (what `vitkdl explain` shows) equals the paper's for its reference pair, DeiT-Tiny
taught by DeiT III-Small at 196 tokens (3e-5 and 3e-6 there); every choice is commented in the
recipe. The recipe is checked before it is written."""

EPILOG = """examples:
  vitkdl init --teacher deit3_small_patch16_224.fb_in22k_ft_in1k --student deit_tiny_patch16_224
  vitkdl init --teacher vit_base_patch16_224 --student vit_small_patch16_224 -o my.vkd
  vitkdl init --teacher vit_base_patch16_224 --student vit_small_patch16_224 \\
      --data /data/imagenet -o my.vkd
  vitkdl init --teacher vit_base_patch16_224 --student vit_tiny_patch16_224 --data synthetic

--data: a source (imagefolder, the default, digits, synthetic) or an ImageNet-layout folder;
digits and synthetic get a quick run (2 epochs) instead of the paper's 300."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write a recipe with the paper's layout for a model pair",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, metavar="T", help="a timm model name")
    p.add_argument("--student", required=True, metavar="S", help="a timm model name")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        default=None,
        help="imagefolder (default), digits, synthetic, or a dataset folder",
    )
    p.add_argument("--name", default=None, help="the recipe name (default: the file's stem)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="write here (default: print to standard output)",
    )
    p.add_argument("--force", action="store_true", help="overwrite FILE when it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkdl.scaffold import InitError, init_recipe

    _, err = consoles()
    if args.output is not None and args.output.exists() and not args.force:
        err.print(
            f"[bold red]vitkdl init: error:[/] {escape(str(args.output))} exists; pass "
            "--force to overwrite it",
            soft_wrap=True,
        )
        return 2
    try:
        text = init_recipe(
            args.teacher, args.student, data=args.data, name=args.name, path=args.output
        )
    except InitError as exc:
        err.print(f"[bold red]vitkdl init: error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    if args.output is None:
        sys.stdout.write(text)
        return 0
    with writing(args.output):  # a failure: exit status 74, naming the file (vitkdl.exits)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    err.print(
        f"wrote {escape(str(args.output))}; see its plan with: vitkdl explain "
        f"{escape(str(args.output))}",
        soft_wrap=True,
    )
    return 0
