"""``desmoe`` command line: demo, train, eval, export, specialization, bench, experiment, parity, info.

``main(argv)`` returns the exit status (0 ok, 2 bad input: the message names the field or file).
"""
from __future__ import annotations

import os
import sys

from .commands import (cmd_bench, cmd_eval, cmd_experiment, cmd_export, cmd_info, cmd_parity, cmd_specialization,
                       cmd_train)
from .demo import cmd_demo
from .parser import build_parser as _parser


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass


def _cpu_threads(cmd: str) -> None:
    """One intra-op thread on CPU for the commands that train or evaluate the project's tiny models, unless
    OMP_NUM_THREADS says otherwise: their ops are too small to gain from a second thread, and two spinning OpenMP
    threads on a busy 2-core machine made the same run up to 20x slower (27.5 s vs 7.5 s measured)."""
    import torch

    if cmd in ("demo", "train", "eval", "export", "specialization", "experiment", "parity") \
            and not torch.cuda.is_available() and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    from ..progress import quiet

    args = _parser().parse_args(argv)
    _quiet_transformers()
    _cpu_threads(args.cmd)
    from ..train.numerics import flush_denormals

    flush_denormals()  # subnormal floats slow CPU training up to 5x; flushing them changes nothing kept (numerics.py)
    fn = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo,
          "experiment": cmd_experiment, "parity": cmd_parity, "info": cmd_info,
          "export": cmd_export, "specialization": cmd_specialization}[args.cmd]
    from ..train.signals import Interrupted

    try:
        with quiet(getattr(args, "quiet", False)):
            return fn(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"desmoe {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system (read-only, full, a file in the way): the message names the path
        print(f"desmoe {args.cmd}: error: {e.strerror or e}" + (f": {e.filename!r}" if e.filename else ""),
              file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"desmoe {args.cmd}: stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"desmoe {args.cmd}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
