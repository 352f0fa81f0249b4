"""`ppx-runtime`: the on-device program (no torch, no export stack)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personaplex_edge.runtime.backends.registry import BACKENDS
from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.extras import missing_extra
from personaplex_edge.runtime.service.config import DEFAULT_CONFIG_PATH
from personaplex_edge.runtime.service.ctl import add_arguments as add_ctl_arguments
from personaplex_edge.runtime.service.update_cli import add_arguments as add_update_arguments

EX_CONFIG = 78  # sysexits.h: configuration error (systemd's RestartPreventExitStatus uses it)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppx-runtime", description="PersonaPlex Edge runtime.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    play = sub.add_parser("play", help="run a recorded conversation through the full pipeline")
    play.add_argument("input", type=Path, help="user audio (WAV/FLAC/OGG, any rate or channel count)")
    play.add_argument("--build", type=Path, required=True, help="build directory from `ppx-export onnx`")
    play.add_argument("--persona", default="copilot", help="built-in persona name or a persona YAML file")
    play.add_argument("--out", type=Path, required=True, help="reply audio (WAV, 24 kHz), as long as the input")
    play.add_argument("--dump-tokens", type=Path, help="write user_tokens [T,8] and out_tokens [T,17] (.npz)")
    play.add_argument("--transcript", type=Path, help="write the agent's text stream")
    play.add_argument("--seed", type=int, help="sampling seed (default: the persona's, else random)")
    play.add_argument("--greedy", action="store_true", help="argmax sampling (top-k 1)")
    play.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    play.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime")
    play.add_argument("--snapshot-dir", type=Path, help="where compiled persona snapshots are kept")
    play.add_argument("--quiet", action="store_true", help="no latency report")
    play.add_argument("--report", type=Path, metavar="HTML",
                      help="also write a one-page HTML picture of the run (needs the report extra)")

    serve = sub.add_parser("serve", help="the in-car daemon: microphone -> model -> speakers")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    serve.add_argument("--static", type=Path, default=None, metavar="DIR",
                       help="serve a web client's built files (DIR/index.html) on the network "
                            "endpoint's port (network.enabled); overrides network.static_dir")

    check = sub.add_parser("check", help="validate config, audio devices, build and personas on this device")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    ctl = sub.add_parser("ctl", help="talk to the running daemon over its control socket")
    add_ctl_arguments(ctl)

    update = sub.add_parser("update", help="signed build bundles: install into the A/B slots, "
                                           "activate, roll back")
    add_update_arguments(update)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "play":
            from personaplex_edge.runtime.console import warnings_to_stderr
            from personaplex_edge.runtime.play.run import (
                check_output_paths,
                play,
                report,
                write_outputs,
            )

            if args.report is not None:  # before the play: a missing extra must not cost a whole run
                from personaplex_edge.runtime.play.report_html import (
                    require_matplotlib,
                    write_report,
                )

                require_matplotlib()
            check_output_paths(args.out, args.dump_tokens, args.transcript)
            warnings_to_stderr("ppx-runtime")  # e.g. a prompt that crowds the context
            result = play(args.input, args.build, args.persona, seed=args.seed, greedy=args.greedy,
                          backend=args.backend, threads=args.threads, snapshot_dir=args.snapshot_dir)
            write_outputs(result, args.out, args.dump_tokens, args.transcript)
            if not args.quiet:
                print(report(result))
            print(f"wrote {args.out} ({len(result.reply) / 24000:.2f} s)")
            if args.report is not None:
                # The audio is already written: a report that cannot be is a partial success (1).
                try:
                    write_report(result, args.report, args.input)
                except PpxError as exc:
                    print(f"ppx-runtime: error: {exc}", file=sys.stderr)
                    return 1
                print(f"wrote {args.report}")
        elif args.command == "serve":
            from personaplex_edge.runtime.service.config import load_config, with_static_dir
            from personaplex_edge.runtime.service.logs import setup_logging
            from personaplex_edge.runtime.service.serving import serve

            cfg = load_config(args.config)
            if args.static is not None:
                cfg = with_static_dir(cfg, args.static)
            logs = setup_logging(cfg.logging.level, cfg.logging.transcripts)
            try:
                return serve(cfg)
            finally:
                logs.stop()
        elif args.command == "check":
            from personaplex_edge.runtime.service.check import main as check_main

            return check_main(args.config)
        elif args.command == "ctl":
            from personaplex_edge.runtime.service.ctl import main as ctl_main

            return ctl_main(args)
        elif args.command == "update":
            from personaplex_edge.runtime.service.update_cli import main as update_main

            return update_main(args)
    except ConfigError as exc:
        _fatal(exc)
        return EX_CONFIG
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise  # a module of ours or a core dependency: a bug, keep its traceback
        _fatal(missing)
        return EX_CONFIG
    except PpxError as exc:
        _fatal(exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _fatal(exc: PpxError) -> None:
    """The one line a failed command leaves; in the journal at error priority (<3>), since
    journald would otherwise file stderr at the unit's default (info)."""
    from personaplex_edge.runtime.service.logs import is_journal

    lead = "<3>" if is_journal(sys.stderr) else ""
    print(f"{lead}ppx-runtime: error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
