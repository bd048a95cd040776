"""pdrop against OpenVINO GenAI on CPU: the same checkpoint, threads and precision, runs alternated.

    python scripts/bench_peers.py                      # llava-next-peer preset, ~15 min on 2 cores
    python scripts/bench_peers.py --model HF_DIR --threads 8 --precision bf16

Writes the checkpoint in Hugging Face layout (a random-weight --shape preset unless --model names
one), builds a pdrop engine from it and exports it with optimum-intel (`optimum-cli export openvino
--task image-text-to-text`) in a virtual environment of the peer's own (--peer-venv, created on
first use: optimum-intel pins its own transformers). Each engine serves from a worker process of its
own (scripts/peers/*_worker.py), so each has its own threads and peak RSS. One 672x672 image,
greedy, exactly --max-new-tokens new tokens per request (EOS ignored by both). pdrop decodes through
torch.compile (--no-compile: plain calls); both engines compile before the timed runs.

Batch 1: TTFT and decode tok/s, median of --repeats, the engines' runs alternated. Concurrent:
--concurrency requests at once (OpenVINO's ContinuousBatchingPipeline, pdrop's in-flight
scheduler): output tok/s and TTFT p50. Then the issue's targets, each said met or MISSED.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PEER_PACKAGES = ["openvino==2026.4.1", "openvino-genai==2026.4.1.0", "openvino-tokenizers==2026.4.1.0",
                 "optimum==2.3.0", "transformers==5.5.4", "nncf==3.4.0", "pillow", "requests"]
QUESTION = "What is shown in this image? Answer in one short sentence."


def log(msg: str) -> None:
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> None:
    log(" ".join(map(str, cmd)))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def peer_venv(path: Path) -> Path:
    """The peer's interpreter; the venv is made on first use. torch comes as pdrop's own (the machine's
    wheel), optimum-intel without its deps (its torchvision pin breaks beside that torch)."""
    python = path / "bin" / "python"
    if not (path / ".complete").exists():
        import torch

        run([sys.executable, "-m", "venv", path])
        run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", *PEER_PACKAGES])
        run([python, "-m", "pip", "install", "-q", "--no-deps", "optimum-intel==2.2.0"])
        (path / ".complete").touch()
    return python


def export_openvino(python: Path, hf_dir: Path, out: Path) -> Path:
    if not (out / "openvino_language_model.xml").exists():
        run([python.parent / "optimum-cli", "export", "openvino", "--model", hf_dir, "--task", "image-text-to-text",
             "--weight-format", "fp32", out])
        # transformers 5 keeps the image processor inside processor_config.json, where GenAI does not
        # look: without this copy it silently skips normalization and answers differently
        processor = json.loads((out / "processor_config.json").read_text())
        (out / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2))
    return out


class Worker:
    """One engine in a process of its own, answering JSON commands line by line."""

    def __init__(self, name: str, cmd: list):
        self.name = name
        log(f"starting {name}")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def out_tps(m: dict) -> float:
    """Output tokens per second of a concurrent run, over its whole wall time."""
    return m["output_tokens"] / m["wall_s"]


def instruction_sets() -> str:
    """The vector instruction sets that decide each engine's kernels and default precision."""
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return " ".join(have) + ("" if "avx512_bf16" in have or "amx_bf16" in have else " (no native bf16)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llava-next-peer", help="random-weight preset (when no --model)")
    p.add_argument("--model", type=Path, help="a LLaVA-NeXT checkpoint in Hugging Face layout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "default", "f32", "bf16"],
                   help="both engines' compute precision; auto: bf16 where the CPU has native bf16, else f32 "
                        "(pdrop's default); default: each engine's own default (OpenVINO's KV cache 8-bit)")
    p.add_argument("--drop-ratio", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", default="4,8", help="comma-separated; empty for batch 1 only")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "peers", help="checkpoint, engine, export cache")
    p.add_argument("--peer-venv", type=Path, default=ROOT / ".venv-peers")
    p.add_argument("--no-compile", action="store_true",
                   help="pdrop's decode steps as plain calls, not through torch.compile")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()

    import torch

    from builder.convert.build import build_engine
    from builder.convert.checkpoint import open_checkpoint
    from builder.convert.presets import preset_checkpoint, write_hf_checkpoint
    from builder.format.config import Limits, PyramidSchedule
    from builder.network.precision import cpu_has_bf16

    precision = args.precision if args.precision != "auto" else "bf16" if cpu_has_bf16() else "f32"
    name = args.model.name if args.model else args.shape
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = args.model or work / "hf"
    if not args.model and not (hf_dir / "config.json").exists():
        write_hf_checkpoint(preset_checkpoint(args.shape), hf_dir)
    engine_dir = work / f"pdrop-{args.drop_ratio}"
    ckpt = open_checkpoint(hf_dir)  # built every time (seconds), so that the engine is this checkout's
    n = ckpt.llm.max_position_embeddings
    build_engine(ckpt, engine_dir, PyramidSchedule.create(ckpt.llm.n_layers, args.drop_ratio),
                 Limits(8, n - 512, n), "auto", force=True)
    python = peer_venv(args.peer_venv)
    ov_dir = export_openvino(python, hf_dir, work / "openvino")
    image = work / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8)).save(image)

    dtype = {"f32": "float32", "bf16": "bfloat16", "default": "auto"}[precision]
    ov = Worker("openvino", [python, ROOT / "scripts/peers/openvino_worker.py", ov_dir, args.threads, precision])
    pd = Worker("pdrop", [sys.executable, ROOT / "scripts/peers/pdrop_worker.py", engine_dir, args.threads, dtype,
                          int(not args.no_compile)])
    arms = [("OpenVINO GenAI", ov, None), ("pdrop, drop 0", pd, 0.0), (f"pdrop, drop {args.drop_ratio}", pd, args.drop_ratio)]
    one = dict(op="one", image=str(image), question=QUESTION, max_new_tokens=args.max_new_tokens)
    single: dict[str, list[dict]] = {a: [] for a, _, _ in arms}
    t_start = time.perf_counter()
    for a, w, drop in arms:  # warm-up: first-call allocations, caches and compiles (batch 1 and 2+), untimed
        w.ask(**one, drop_ratio=drop)
        w.ask(op="many", image=str(image), questions=[QUESTION] * 2, max_new_tokens=4, drop_ratio=drop)
    for r in range(args.repeats):
        for a, w, drop in arms:
            single[a].append(w.ask(**one, drop_ratio=drop))
            log(f"batch 1, run {r + 1}: {a}: TTFT {single[a][-1]['ttft_s']:.2f} s, "
                f"{single[a][-1]['decode_tok_s']:.1f} tok/s")
    many: dict[tuple[str, int], dict] = {}
    for c in [int(c) for c in args.concurrency.split(",") if c]:
        questions = [f"{QUESTION} ({i})" for i in range(c)]
        for a, w, drop in arms:
            many[a, c] = w.ask(op="many", image=str(image), questions=questions,
                               max_new_tokens=args.max_new_tokens, drop_ratio=drop)
            m = many[a, c]
            log(f"{c} at once: {a}: {out_tps(m):.1f} tok/s, TTFT p50 {p50(m['ttft_s']):.1f} s")
    rss = {a: w.ask(op="rss")["peak_rss_mb"] for a, w, _ in arms}
    runs_in = {a: w.ask(op="precision")["precision"] for a, w, _ in arms}
    ov.close(), pd.close()
    elapsed = time.perf_counter() - t_start

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "CPU")
    ttft = {a: p50([x["ttft_s"] for x in xs]) for a, xs in single.items()}
    tps = {a: p50([x["decode_tok_s"] for x in xs]) for a, xs in single.items()}
    base = arms[0][0]
    print(f"\n{name}, {single[arms[1][0]][0]['prompt_tokens']} prompt tokens (OpenVINO counts "
          f"{single[base][0]['prompt_tokens']}), {args.max_new_tokens} new, greedy, prefix caches off; {cpu}, "
          f"{args.threads} threads, --precision {args.precision} (torch {torch.__version__}); "
          f"median of {args.repeats} alternated runs; {elapsed / 60:.1f} min")
    print(f"CPU: {instruction_sets()}; torch's CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| engine | precision | TTFT s | × OpenVINO | decode tok/s | × OpenVINO | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for a, _, _ in arms:  # pdrop's two rows share one process, so one peak
        print(f"| {a} | {runs_in[a]} | {ttft[a]:.2f} | {ttft[a] / ttft[base]:.2f} | {tps[a]:.1f} | "
              f"{tps[a] / tps[base]:.2f} | {rss[a]:.0f} |")
    concurrency = sorted({c for _, c in many})
    if concurrency:
        print("\n| requests at once | engine | output tok/s | × OpenVINO | TTFT p50 s | × OpenVINO |")
        print("|---:|---|---:|---:|---:|---:|")
        for c in concurrency:
            b = many[base, c]
            for a, _, _ in arms:
                m = many[a, c]
                print(f"| {c} | {a} | {out_tps(m):.1f} | {out_tps(m) / out_tps(b):.2f} | "
                      f"{p50(m['ttft_s']):.1f} | {p50(m['ttft_s']) / p50(b['ttft_s']):.2f} |")
    drop0, dropped = arms[1][0], arms[2][0]
    targets = [("batch 1, drop 0: TTFT <= 1.0x OpenVINO's", ttft[drop0] / ttft[base], "<=", 1.0),
               ("batch 1, drop 0: decode tok/s >= 1.0x OpenVINO's", tps[drop0] / tps[base], ">=", 1.0),
               (f"batch 1, drop {args.drop_ratio}: TTFT <= 0.55x OpenVINO's", ttft[dropped] / ttft[base], "<=", 0.55)]
    for c in concurrency:
        targets.append((f"{c} at once, drop {args.drop_ratio}: output tok/s >= 1.5x OpenVINO's",
                        out_tps(many[dropped, c]) / out_tps(many[base, c]), ">=", 1.5))
    print("\nTargets:")
    for text, value, op, bound in targets:
        met = value <= bound if op == "<=" else value >= bound
        print(f"- {text}: {value:.2f}x, {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"single": single, "many": {f"{a}|{c}": m for (a, c), m in many.items()},
                                         "rss_mb": rss, "precision": runs_in, "threads": args.threads,
                                         "cpu": instruction_sets()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
