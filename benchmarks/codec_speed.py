"""Codec throughput on one CPU thread: encode + decode, in GB/s of float32 input, next to a
``torch`` copy of the same tensor measured in the same run (this machine is shared and noisy;
compare ratios within one table).

    python -m benchmarks.codec_speed --mb 100 --reps 5 --out docs/results/codec_speed/table.md

Encode includes the bucket norms and the random dither; decode writes into a preallocated
float32 tensor (as the compressor does into the gradient). Each figure is the best of --reps runs.
``--out FILE`` writes the markdown table (with the commit) there and the figures as JSON beside
it (FILE with the suffix .json); docs/results/codec_speed/CODEC_SPEED.md reads such a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import provenance
from hvd_gradq.bits import native, rotation
from hvd_gradq.bits.lanes import lane_layout
from hvd_gradq.codecs import LEVEL_CODECS, DitherSource, JointSQState, make_codec
from hvd_gradq.codecs import rotated as rot
from hvd_gradq.codecs.shared_scale import dequantize_lanes, quantize_to_lanes


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="size of the float32 input in MB")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--bucket", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="", help="write the markdown table here (and the figures as JSON beside it)")
    ap.add_argument("--isa", choices=native.ISA_NAMES, default=None,
                    help="use at most this instruction-set path of the kernels (default: the widest the CPU runs)")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    commit = provenance.commit(args.allow_dirty, outputs=[Path(args.out).parent] if args.out else [])
    torch.set_num_threads(1)
    native.set_isa(args.isa)
    n = int(args.mb * 1e6 / 4)
    gbytes = n * 4 / 1e9
    x = torch.randn(n)
    y = torch.empty_like(x)
    copy_s = best_of(lambda: y.copy_(x), args.reps)
    rows = []
    for name in sorted(LEVEL_CODECS):
        for bits in ([2] if name == "terngrad" else args.bits):
            codec = make_codec(name, bits, bucket_size=args.bucket)
            rng = DitherSource(0)
            enc_s = best_of(lambda codec=codec, rng=rng: codec.encode(x, rng), args.reps)
            enc = codec.encode(x, rng)
            dec_s = best_of(lambda codec=codec, enc=enc: codec.decode(enc, out=y), args.reps)
            rows.append((name, bits, enc_s, dec_s))
    for ratio in (20, 1000):  # JointSQ: the histogram-located magnitude order, fewer repetitions
        codec = make_codec("jointsq", ratio=ratio)
        rng, state = DitherSource(0), JointSQState()
        reps = min(args.reps, 2)
        enc_s = best_of(lambda codec=codec, rng=rng, state=state: codec.encode(x, rng, state), reps)
        enc = codec.encode(x, rng, state)
        dec_s = best_of(lambda codec=codec, enc=enc: codec.decode(enc, out=y), reps)
        rows.append((f"jointsq {ratio}x", "8/4/2/0", enc_s, dec_s))
    # the shared-scale, lane-packed uniform codec of UniformCompressor (N = 2 lanes; encode
    # includes the error-feedback residual; decode allocates its output)
    for bits in args.bits:
        layout = lane_layout(bits, 2, torch.int64)
        rng = DitherSource(0)
        residual = torch.zeros_like(x)  # read and rewritten in place, as error feedback does

        def enc_lanes(bits=bits, layout=layout, rng=rng, residual=residual):
            return quantize_to_lanes(x, 3.0, bits, layout, rng, residual, residual)

        words = enc_lanes()
        enc_s = best_of(enc_lanes, args.reps)
        dec_s = best_of(lambda bits=bits, layout=layout, words=words:
                        dequantize_lanes(words, n, 3.0, bits, layout, 1), args.reps)
        rows.append(("uniform-lanes (UniformCompressor)", bits, enc_s, dec_s))

    # the rotated codes (the defaults): the lanes of UniformCompressor and of the drop-in's allreduce
    # (rotation, block quantization, packing and the residual rotated back, fused per block; N = 2
    # lanes, last step's block scales), and the gathered rotated code (encode with its coding error,
    # decode added into the sum); rotation block 4096
    block = 4096
    m = rotation.padded(n, block)
    for bits in args.bits:
        layout = lane_layout(bits, 2, torch.int64)
        scales = rot.clip_scales(torch.ones(m // block), bits)
        residual = torch.zeros_like(x)
        staged = torch.empty_like(x)

        def enc_rot(bits=bits, layout=layout, scales=scales, residual=residual, staged=staged):
            out = rot.encode_lanes(x, scales, bits, layout, key=7, block=block, addend=residual, energy=True,
                                   resid_out=staged)
            if out is None:  # no kernels: the unfused torch path
                y, _ = rotation.rotate_energy(x, 7, block, residual)
                err = torch.empty_like(y)
                words = rot.quantize_blocks(y, scales, bits, layout, err_out=err)
                rotation.unrotate_(err, 7, block, n, out=staged)
                return words
            return out[0]

        words = enc_rot()
        enc_s = best_of(enc_rot, args.reps)

        def dec_rot(bits=bits, layout=layout, scales=scales, words=words):
            out = rot.decode_lanes(words, n, scales, bits, layout, 1, 1, key=7, block=block)
            if out is None:
                out = rotation.unrotate_(rot.dequantize_blocks(words, m, scales, bits, layout, 1), 7, block, n)
            return out

        dec_s = best_of(dec_rot, args.reps)
        rows.append(("rotated lanes (UniformCompressor, drop-in allreduce)", bits, enc_s, dec_s))
    for bits in args.bits:
        codec = make_codec("rotated", bits)
        rng = DitherSource(0)
        enc_s = best_of(lambda codec=codec, rng=rng: codec.encode_error(x, rng), args.reps)
        enc = codec.encode(x, rng)
        dec_s = best_of(lambda codec=codec, enc=enc: codec.decode(enc, out=y, accumulate=True), args.reps)
        rows.append(("rotated (gathered; encode with its error)", bits, enc_s, dec_s))

    lines = [
        f"Codec throughput, 1 thread, {args.mb:g} MB float32 input, bucket {args.bucket}, best of {args.reps}.",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"native kernels: {'yes, ' + native.isa() + ' path' if native.load() is not None else 'no'}.",
        f"Reference in the same run: torch copy_ of the same tensor: {gbytes / copy_s:.2f} GB/s.",
        f"Commit: {commit}.",
        "",
        "| codec | bits | encode GB/s | decode GB/s | encode+decode GB/s | vs copy_ |",
        "|---|---|---|---|---|---|",
    ]
    for name, bits, enc_s, dec_s in rows:
        both = gbytes / (enc_s + dec_s)
        lines.append(f"| {name} | {bits} | {gbytes / enc_s:.2f} | {gbytes / dec_s:.2f} | {both:.2f} | "
                     f"{both / (gbytes / copy_s):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        figures = [{"codec": name, "bits": bits, "encode_s": enc_s, "decode_s": dec_s}
                   for name, bits, enc_s, dec_s in rows]
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "commit": commit, "gbytes": gbytes,
                                                        "copy_s": copy_s, "rows": figures}, indent=1))
    return table


if __name__ == "__main__":
    main()
