"""The command line shared by the run scripts, and how a run stops when it is told to.

``python -m experiments.run`` and ``python -m experiments.run_lm`` take ``--config FILE``, ``--print-config``
and ``key=value`` overrides in any order. Exit status: 0 completed, 3 failed (a NaN/inf loss, recorded),
2 bad input (a message naming the problem and the fix, no traceback), 143 / 130 stopped by SIGTERM / Ctrl-C
(the run's last checkpoint is kept and the same command resumes from it).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from doran.errors import DoranError


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or Ctrl-C: nothing was written but the checkpoint; the message says how to
    resume. A ``KeyboardInterrupt``, so that the sweep runner stops as it does on Ctrl-C."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


_SIGTERM_SEEN: list[bool] = []


def raise_on_sigterm(signum, frame) -> None:
    """SIGTERM handler: stop like Ctrl-C. Called by Lightning's handler during ``trainer.fit`` (another handler is
    installed then), it only records the signal: Lightning stops at the next batch and ``interruptible`` says how
    to resume. Raising there could land inside a finaliser (``__del__``), where Python prints and drops it."""
    _SIGTERM_SEEN.append(True)
    if signal.getsignal(signal.SIGTERM) is not raise_on_sigterm:
        return
    raise RunInterrupted(
        "SIGTERM: the run stopped before it finished and wrote no result; run the same command again (it "
        "resumes from the last checkpoint, if one was written)",
        "SIGTERM",
    )


class interruptible:
    """Turn SIGTERM / Ctrl-C during ``trainer.fit`` into ``RunInterrupted`` that says how to resume.

    Lightning answers SIGTERM by raising ``SIGTERMException`` (a ``SystemExit`` whose status is 0) at the next
    batch and Ctrl-C by ``sys.exit(1)``: left alone, a killed run would exit 0 and print nothing. The run's
    last checkpoint (written at every epoch end and every ``runtime.ckpt_every_n_steps``) is kept.
    """

    def __init__(self, trainer, ckpt: Path):
        self.trainer, self.ckpt = trainer, ckpt

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, (SystemExit, KeyboardInterrupt)):
            return False
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
        # Lightning turns any KeyboardInterrupt (ours included) into sys.exit(1): ask what was received
        sigterm = isinstance(err, SIGTERMException) or _SIGTERM_SEEN or getattr(err, "signal_name", "") == "SIGTERM"
        name = "SIGTERM" if sigterm else "SIGINT"
        if self.ckpt.is_file():
            import torch

            step = int(torch.load(self.ckpt, map_location="cpu", weights_only=True)["global_step"])
            resume = f"its checkpoint {self.ckpt} (step {step}) is kept: run the same command again to resume from it"
        else:
            resume = "no checkpoint had been written yet: the same command starts the run again"
        raise RunInterrupted(
            f"{name} at step {self.trainer.global_step}: the run stopped before it finished and wrote no "
            f"result; {resume}",
            name,
        ) from None


def cli(
    argv: list[str] | None,
    prog: str,
    doc: str,
    load: Callable[[str | None, list[str]], Any],
    run: Callable[[Any], dict[str, Any]],
    identify: Callable[[Any], str],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse the command line, load and validate the config, run it; the exit status (module docstring).

    ``load(config_file, overrides)`` gives the validated config, ``identify(cfg)`` its run_id (reading the
    data, never a model), ``errors`` the exception types that mean bad input (printed without a trace).
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML file of settings (merged over the defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. method=dora train.lr=5e-4)")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        cfg = load(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump({"run_id": identify(cfg), **cfg.to_dict()}, sort_keys=False))
            return 0
        result = run(cfg)
    except (DoranError, *errors) as err:  # every input error of the library: config, data, model, adapter
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"\ninterrupted: {err}", file=sys.stderr)
        return err.exit_status
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if not result or result["status"] == "completed" else 3  # {}: a non-zero rank of a multi-GPU run
