"""Write a perf_analyzer `--input-data` file: the benchmark's prompt + image pairs as data URLs.

    python scripts/make_pa_input.py --out pa_input.json --max-tokens 32 --drop-ratio 0.5
"""
from __future__ import annotations

import argparse
import json

from bench_grpc import workload

from builder.client.grpc import data_url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pa_input.json")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image-size", default="672x672")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--drop-ratio", type=float, help="per-request drop ratio (default: the engine's)")
    args = p.parse_args()
    rows = []
    for prompt, image in workload(args.images, args.image_size):
        row = {"text_input": [prompt], "image_url_input": [data_url(image)], "max_tokens": [args.max_tokens],
               "stream": [True]}
        if args.drop_ratio is not None:
            row["drop_ratio"] = [args.drop_ratio]
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"data": rows}, f)
    print(f"wrote {len(rows)} requests to {args.out}")


if __name__ == "__main__":
    main()
