"""`ppx-export`: the workstation toolchain's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personaplex_edge.runtime.backends.registry import BACKENDS
from personaplex_edge.runtime.errors import PpxError


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help text with each option's default, where it has one worth saying (not None, not a
    flag's False, not one the help already names)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _HelpfulParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


QUIET_HELP = "no progress bars or summary (errors still print)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppx-export",
        description="Turn a PersonaPlex checkpoint into streaming ONNX graphs (and, on the target, engines).")
    # Every subcommand's --help shows each option's default next to its help.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_HelpfulParser)

    synth = sub.add_parser("synth", help="write a seeded random-weight checkpoint in the released layout")
    synth.add_argument("--size", choices=("tiny", "full"), default="tiny",
                       help="tiny: a few MB for tests and the demo; full: the 7B layout")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    synth.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    synth.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    synth.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    onnx = sub.add_parser("onnx", help="export the checkpoint to streaming ONNX graphs + manifest")
    onnx.add_argument("--checkpoint", required=True,
                      help="checkpoint directory (a snapshot of nvidia/personaplex-7b-v1, or `synth` "
                           "output), or a repo id org/name[@revision] found in the Hugging Face cache")
    onnx.add_argument("--download", action="store_true",
                      help="with a repo id: fetch what the cache lacks of the files the export reads")
    onnx.add_argument("--out", type=Path, required=True,
                      help="build directory to write (graphs, manifest, tokenizer, voices)")
    onnx.add_argument("--dtype", default="fp32", help="graph weight/compute dtype: fp32 or fp16")
    onnx.add_argument("--prefill-steps", type=int, default=512,
                      help="most steps one batched prefill call takes (system prompt length)")
    onnx.add_argument("--depformer-steps", default="agent", choices=("agent", "all"),
                      help="agent: only the depth steps that predict the agent's audio (default; the "
                           "user's are always provided); all: every depth step, as upstream")
    onnx.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    onnx.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    quant = sub.add_parser("quantize", help="quantize a full-precision build with NVIDIA Model Optimizer "
                                             "(explicit Q/DQ graphs)")
    quant.add_argument("--build", type=Path, required=True, help="full-precision build from `ppx-export onnx`")
    quant.add_argument("--precision", required=True, choices=("int8", "int8-sq", "fp8", "int4-awq"),
                       help="int8: weight-only INT8; int8-sq: SmoothQuant W8A8; fp8: W8A8 FP8; "
                            "int4-awq: INT4 weight-only AWQ (temporal + depformer; Mimi stays)")
    quant.add_argument("--calib", type=Path,
                       help="directory of speech clips, WAV/FLAC/OGG (default: the shipped calibration set)")
    quant.add_argument("--out", type=Path, required=True, help="quantized build directory to write")
    quant.add_argument("--persona", metavar="NAME|FILE",
                       help="persona of the calibration conversation (default: copilot; its prompt "
                            "with a voice of the build when the build lacks its voice)")
    quant.add_argument("--network", action="append", metavar="NET=PRECISION",
                       help="per-network override, e.g. mimi_decoder=int8 or temporal=none (repeatable)")
    quant.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="calibrate on ONNX Runtime CPU (default) or CUDA (a workstation GPU, for the 7B)")
    quant.add_argument("--block-size", type=int, default=128, help="INT4 block size along K (int4-awq)")
    quant.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (int8-sq)")
    quant.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    quant.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    verify = sub.add_parser("verify", help="compare a quantized build or engines with the full-precision "
                                           "reference: table, JSON, exit 1 if a check fails")
    verify.add_argument("--build", type=Path, required=True, help="quantized build or engines directory")
    verify.add_argument("--reference", type=Path, required=True, help="the full-precision build")
    verify.add_argument("--json", type=Path, help="write the report as JSON")
    verify.add_argument("--inputs", type=Path,
                        help="directory of speech clips (default: the shipped calibration set)")
    verify.add_argument("--backend", default="ort-cpu", choices=BACKENDS,
                        help="runs the tested build (the reference always runs on ort-cpu)")
    verify.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "int8-sq", "fp8", "int4-awq"),
                        help="thresholds to apply (default: what the build's manifest records)")
    verify.add_argument("--persona", metavar="NAME|FILE",
                        help="persona of the compared conversation (default: the one quantize "
                             "calibrated the build with, as its manifest records; else copilot)")
    verify.add_argument("--frames", type=int, default=250, help="conversation frames compared per network")
    verify.add_argument("--e2e-frames", type=int, default=50, help="frames compared free-running")
    verify.add_argument("--quiet", action="store_true", help="no progress bars (the table is still printed)")

    engines = sub.add_parser("engines", help="build TensorRT engines for a target GPU (run it on that GPU)")
    engines.add_argument("--build", type=Path, required=True,
                         help="ONNX build (from `ppx-export onnx` or `quantize`)")
    engines.add_argument("--target", required=True,
                         help="target profile: a name in engines/targets/ or a YAML path")
    engines.add_argument("--out", type=Path, required=True, help="engines directory (a runnable build)")
    engines.add_argument("--timing-cache", type=Path,
                         help="timing cache to reuse and update (default: OUT/timing.cache)")
    engines.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    engines.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    keygen = sub.add_parser("keygen", help="an ed25519 key pair for signing bundles: NAME.key, NAME.pub")
    keygen.add_argument("--out", type=Path, required=True,
                        help="path and name without suffix (writes OUT.key and OUT.pub)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")

    bundle = sub.add_parser("bundle", help="one signed file holding a build, for `ppx-runtime update install`")
    bundle.add_argument("--build", type=Path, required=True, help="build or engines directory")
    bundle.add_argument("--key", type=Path, required=True, help="private key from `ppx-export keygen`")
    bundle.add_argument("--out", type=Path, required=True, help="bundle file to write")
    bundle.add_argument("--version", required=True, help="this build's version, dotted numbers (1.4.2)")
    bundle.add_argument("--target", help="target profile the build is for (engines: taken from "
                                         "the engines; ONNX builds: any)")
    bundle.add_argument("--min-runtime", default="0.1.0",
                        help="oldest personaplex-edge runtime that may install it")
    bundle.add_argument("--compress", choices=("none", "zstd"), default="zstd",
                        help="zstd: a 7B fp16 build 23%% smaller to download (15.6 -> 11.9 GB), its "
                             "install 40 -> 57 s on 2 vCPU; none: a plain tar")
    bundle.add_argument("--force", action="store_true", help="replace an existing bundle file")

    inspect = sub.add_parser("inspect", help="summarise a build: graphs, sizes, state, manifest checks")
    inspect.add_argument("--build", type=Path, required=True, help="a build or engines directory")
    return parser


def _inspect(build: Path) -> None:
    from personaplex_edge.runtime.core.manifest import load_manifest
    from personaplex_edge.runtime.core.network import NETWORKS, network_precisions

    manifest = load_manifest(build)
    manifest.verify_files()
    lm = manifest.model["lm"]
    print(f"build {build}: {_precision_summary(manifest.data)}, opset {manifest.data['opset']}, "
          f"LM dim {lm['dim']} x {lm['num_layers']} layers, context {lm['context']}, "
          f"{len(manifest.files)} files verified")
    precision = {key: p for net, p in network_precisions(manifest).items() for key in NETWORKS[net]}
    print(f"{'graph':<18}{'precision':<11}{'weights MB':>11}{'inputs':>8}{'state':>7}{'caches':>8}")
    for key, graph in manifest.graphs.items():
        state = len([t for t in graph.inputs if t.role == "state_in"])
        caches = len([t for t in graph.inputs if t.role == "cache"])
        mb = graph.meta.get("weight_bytes", 0) / 1e6
        print(f"{key:<18}{precision.get(key, '?'):<11}{mb:>11.1f}{len(graph.inputs):>8}{state:>7}"
              f"{caches:>8}")
    voices = ", ".join(manifest.data.get("voices", {})) or "none"
    print(f"voices: {voices}")


def _precision_summary(data: dict) -> str:
    """fp16; int4-awq (nvidia-modelopt 0.47.0) on fp16 graphs; TensorRT engines for thor."""
    dtype = data.get("dtype", "fp32")
    quantized = data.get("quantization")
    if quantized:
        return (f"{quantized['precision']} ({quantized.get('tool', '?')} "
                f"{quantized.get('modelopt_version', '?')}) on {dtype} graphs")
    engines = data.get("engines")
    if engines:
        target = (engines.get("target") or {}).get("name", "?")
        return f"TensorRT engines for {target} from {dtype} graphs"
    return str(dtype)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "synth":
            from .synth import synthesize

            synthesize(args.size, args.seed, args.out, force=args.force, quiet=args.quiet)
            print(f"wrote {args.size} checkpoint to {args.out}")
        elif args.command == "onnx":
            from .export_onnx import ExportOptions, export_onnx
            from .hf_cache import resolve_checkpoint

            opts = ExportOptions(dtype=args.dtype, prefill_steps=args.prefill_steps,
                                 depformer_steps=args.depformer_steps)
            checkpoint = resolve_checkpoint(args.checkpoint, download=args.download)
            export_onnx(checkpoint, args.out, opts, force=args.force, quiet=args.quiet)
            print(f"wrote build to {args.out}")
        elif args.command == "quantize":
            from .quantize import QuantizeOptions, parse_network_overrides, quantize_build

            qopts = QuantizeOptions(block_size=args.block_size, alpha=args.alpha, device=args.device,
                                    persona=args.persona)
            quantize_build(args.build, args.precision, args.calib, args.out,
                           networks=parse_network_overrides(args.network), options=qopts, force=args.force,
                           quiet=args.quiet)
            print(f"wrote {args.precision} build to {args.out}")
        elif args.command == "verify":
            from .atomic import refuse_overlap
            from .verify import run_verify

            if args.json is not None:  # the report must not land in (or over) a build it checks
                refuse_overlap(args.json, {"--build": args.build, "--reference": args.reference},
                               flag="--json")
            return run_verify(args.build, args.reference, json_path=args.json, inputs=args.inputs,
                              backend=args.backend, precision=args.precision, frames=args.frames,
                              e2e_frames=args.e2e_frames, quiet=args.quiet, persona=args.persona)
        elif args.command == "engines":
            from .engines import build_engines

            build_engines(args.build, args.target, args.out, force=args.force,
                          timing_cache=args.timing_cache, quiet=args.quiet)
            print(f"wrote engines to {args.out}")
        elif args.command == "keygen":
            from .bundle import keygen

            private, public = keygen(args.out, force=args.force)
            print(f"wrote {private} (keep it secret) and {public} (for /etc/personaplex/trusted-keys)")
        elif args.command == "bundle":
            from .bundle import write_bundle

            header = write_bundle(args.build, args.key, args.out, args.version, target=args.target,
                                  min_runtime=args.min_runtime, compress=args.compress,
                                  force=args.force)
            print(f"wrote {args.out}: version {header.version}, target {header.target}, "
                  f"signed by key {header.key_id}")
        elif args.command == "inspect":
            _inspect(args.build)
    except PpxError as exc:
        print(f"ppx-export: error: {exc}", file=sys.stderr)
        return 78 if type(exc).__name__ == "ConfigError" else 2
    except KeyboardInterrupt:
        print("ppx-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
