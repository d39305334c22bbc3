"""``llama-proc which``: the binary a command would run, and with ``-v`` each step's reason.

A cache hit imports no manifest, download or host-probe code (a test holds it to that).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from llama_proc._cli.common import settings_from_args
from llama_proc._cli.handlers.output import (
    attestation_line,
    chain_lines,
    compute_line,
    print_steps,
)
from llama_proc.errors import LlamaProcError
from llama_proc.provision.explain import Step, StepName
from llama_proc.provision.resolve import plan, resolve_server

if TYPE_CHECKING:
    import argparse


def which(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    explain: list[str] = []
    if not args.verbose:
        print(resolve_server(settings, explain=explain, provision=False).server_binary)
        return 0
    res = None
    if settings.server_binary is None:
        # On error the resolver raises the same error below, after the steps are printed.
        with contextlib.suppress(LlamaProcError):
            res = plan(settings)
    try:
        # The plan's host and manifest, so the ladder looks for what the chain printed.
        install = resolve_server(
            settings,
            explain=explain,
            provision=False,
            host=res.host if res else None,
            manifest=res.manifest if res else None,
        )
    finally:
        if res is None:
            print_steps(explain)
        else:
            # The chain replaces the selection's reasoning lines, where they stood.
            chain = [f"select: {line}" for line in chain_lines(res.selection, settings.variant)]
            at = next(
                (
                    i
                    for i, s in enumerate(explain)
                    if isinstance(s, Step) and s.step == StepName.SELECT
                ),
                len(explain),
            )
            print_steps([*explain[:at], *chain, *explain[at:]], skip=(StepName.SELECT,))
    print_steps([compute_line(install), attestation_line(install)])
    print(install.server_binary)
    return 0
