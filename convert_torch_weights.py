"""Convert PyTorch / Hugging Face checkpoints to ppllava-jax parameter directories and back.

    # a released PPLLaVA directory (config.json, model*.safetensors or .bin, clip/config.json)
    python convert_torch_weights.py --source hf/ppllava-vicuna-7b --output ckpt/ppllava \\
        --dtype bfloat16
    # the paper's training start point: LLaVA-NeXT + OpenAI CLIP -> a PPLLaVA directory
    python convert_torch_weights.py --source hf/llava-v1.6-vicuna-7b-hf \\
        --clip hf/clip-vit-large-patch14-336 --output ckpt/ppllava_start
    # and back to a PyTorch / transformers directory (safetensors + config.json)
    python convert_torch_weights.py --to_torch --source ckpt/ppllava --output hf_out/ppllava
    # the Qwen2 + SigLIP family: a released PPLLaVA-Qwen, and its start point
    python convert_torch_weights.py --source hf/ppllava-qwen-7b --output ckpt/ppllava_qwen
    python convert_torch_weights.py --source hf/llava-onevision-qwen2-7b-si-hf \\
        --clip hf/siglip-so400m-patch14-384 --output ckpt/ppllava_qwen_start
    # any transformers directory of a known family (LLaMA, Qwen2, CLIP, SigLIP, LLaVA-NeXT,
    # LLaVA-OneVision), one layer per subtree instead of stacked
    python convert_torch_weights.py --source hf/vicuna-7b --output ckpt/vicuna --no-scan

The model family is detected from config.json (``--family`` overrides). The output is written
to a temporary sibling (``OUTPUT.tmp-XXXX``) and replaces ``--output`` as a whole only when
complete: an interrupted run leaves the previous output untouched. An output that is (or holds)
the source, or an existing directory that is not a checkpoint, is refused. A mistake (a missing
directory, an unknown family, a damaged weight file, tensors that do not fit the config) is
printed as one ``error: ...`` line without a traceback (``PPLLAVA_TRACEBACK=1`` shows it) and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

from ppllava_jax import command_line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    # the shared style: --help shows this docstring, dashes or underscores in flag names
    # (--no-scan, --to-torch), a flag mistake is one error line with exit status 2
    p = command_line.argument_parser(__doc__, "convert_torch_weights.py")
    p.add_argument("--source", required=True, help="directory to read")
    p.add_argument("--output", required=True, help="directory to write (replaced when complete)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="storage dtype (default: float32 for JAX, as stored for --to_torch)",
    )
    p.add_argument("--family", default=None, help="model family; default: from config.json")
    p.add_argument(
        "--clip",
        default=None,
        help="OpenAI CLIP directory: with a LLaVA-NeXT --source, build the PPLLaVA training "
        "start point (BT-Adapter from the trunk's last layers, 248-position CLIP text tower); "
        "a SigLIP directory with a LLaVA-OneVision --source: the PPLLaVA-Qwen start point",
    )
    p.add_argument("--btadapter_depth", type=int, default=4, help="with --clip: BT-Adapter depth")
    p.add_argument(
        "--no_scan",
        dest="scan",
        action="store_false",
        help="store layers as layers_0..N-1 (default: one stacked, scanned, tree)",
    )
    p.add_argument(
        "--to_torch",
        action="store_true",
        help="reverse: --source is a converted directory, --output a transformers directory",
    )
    p.add_argument(
        "--max_shard_gb",
        type=float,
        default=5.0,
        help="with --to_torch: largest safetensors shard, in GiB",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Imported after argument parsing so that --help is fast.
    from ppllava_jax.convert import api, params_io
    from ppllava_jax.convert.torch_io import CheckpointError

    try:
        if args.clip:
            from ppllava_jax.convert.start_point import build_start_point

            params_io.check_output(args.output, [args.source, args.clip])
            out = build_start_point(
                args.source,
                args.clip,
                args.output,
                dtype=args.dtype or "float32",
                scan_layers=args.scan,
                btadapter_depth=args.btadapter_depth,
            )
        elif args.to_torch:
            if args.family:
                raise ValueError("--family is read from the converted directory with --to_torch")
            out = api.export_checkpoint(
                args.source,
                args.output,
                dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_gb * 2**30),
            )
        else:
            out = api.convert_checkpoint(
                args.source,
                args.output,
                dtype=args.dtype or "float32",
                family=args.family,
                scan_layers=args.scan,
            )
    except (OSError, NotImplementedError, ValueError, CheckpointError) as e:
        # ConversionError, CheckpointError and OutputError are ValueErrors with messages for
        # people; OSError: a missing directory, no permission or space to write the output.
        if command_line.show_traceback():
            raise
        command_line.print_error(e)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
