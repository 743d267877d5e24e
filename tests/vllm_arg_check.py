"""Parse vLLM server argument lists with the installed vLLM's own parser.

    .venv-vllm/bin/python tests/vllm_arg_check.py < argvs.json

Reads a JSON list of argument lists (what follows the launcher) and prints a JSON list of
{"ok": bool, "error": str}, one per list: the parser `vllm serve` and the api_server module use,
so a flag that vLLM renamed or removed fails here as it would at start-up.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser


def check(argv: list[str]) -> dict:
    parser = make_arg_parser(FlexibleArgumentParser())
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(argv)
    except SystemExit:
        return {"ok": False, "error": errors.getvalue().strip().splitlines()[-1]}
    return {"ok": True, "error": ""}


if __name__ == "__main__":
    json.dump([check(argv) for argv in json.load(sys.stdin)], sys.stdout)
