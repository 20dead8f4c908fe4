"""``python -m blasst_ref.cuda``: the kernel versions, and their generated source.

    python -m blasst_ref.cuda versions
    python -m blasst_ref.cuda dump-source prefill_v2 --dir kernels [--D 64] [--dtype float32]
    python -m blasst_ref.cuda dump-source decode_v2 --dir kernels [--Hq 32 --Hkv 8]

Needs no GPU: the source is generated for the GPU's launch plan on any machine.
"""

from __future__ import annotations

import argparse

from .launch import VERSIONS, dump_source


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blasst_ref.cuda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions", help="list the kernel versions, newest first per phase")
    dump = sub.add_parser("dump-source", help="write a version's generated kernel source")
    dump.add_argument("version", choices=[e.name for e in VERSIONS if e.sources is not None])
    dump.add_argument("--dir", default=".", help="where to write the files (default: here)")
    dump.add_argument("--Hq", type=int, default=32, help="query heads (decode rows: Hq/Hkv)")
    dump.add_argument("--Hkv", type=int, default=8, help="kv heads")
    dump.add_argument("--D", type=int, default=128, help="head dim (Dqk = Dv)")
    dump.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    dump.add_argument("--block-q", type=int, default=128)
    dump.add_argument("--block-k", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "versions":
        for e in VERSIONS:
            gen = "generated source" if e.sources is not None else "written out"
            fast = ", raw-pointer host path" if e.fast is not None else ""
            print(f"{e.name:<11} {e.phase:<8} blasst_ref/cuda/{e.name}.py ({gen}{fast})")
        return
    for path in dump_source(args.version, args.dir, q_heads=args.Hq, kv_heads=args.Hkv,
                            dqk=args.D, dtype=args.dtype, block_q=args.block_q,
                            block_k=args.block_k):
        print(path)


if __name__ == "__main__":
    main()
