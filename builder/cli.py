"""`python -m builder build|run`: the command line, in TensorRT-LLM's spirit (explicit long flags).

Every user-facing failure is a PdropError, printed here as one `error: ...` line (exit 1);
bad flags exit 2; `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .format.config import EXPORTS, Limits
from .format.errors import ConfigError, PdropError


DTYPE_HELP = ("precision to run in: auto (default: what the build chose, see build --dtype) | float32 | float16 | "
              "bfloat16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _indices(text: str, option: str, what: str, example: str) -> list[int]:
    """'8,16,24' -> [8, 16, 24]; anything else is one error line naming the option."""
    try:
        indices = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise ConfigError(f"{option} takes comma-separated {what} indices like {example}, got '{text}'")
    return indices


def _flops(x: float) -> str:
    unit = next(u for u in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1, "FLOPs")) if x >= u[0] or u[0] == 1)
    return f"{x / unit[0]:.2f} {unit[1]}"


def cmd_build(args) -> int:
    from .convert.build import build_engine
    from .convert.checkpoint import open_checkpoint
    from .convert.presets import PRESETS, preset_checkpoint
    from .format.config import PyramidSchedule
    from .network.flops import report
    from .network.vision import largest_image_tokens

    layers = _indices(args.layers, "--layers", "layer", "8,16,24") if args.layers is not None else None
    model = args.model
    ckpt = preset_checkpoint(model, args.seed) if model in PRESETS else open_checkpoint(model)
    llm = ckpt.llm
    schedule = PyramidSchedule.create(llm.n_layers, args.drop_ratio, layers)
    max_seq = args.max_seq_len or min(llm.max_position_embeddings, ckpt.sliding_window or llm.max_position_embeddings)
    # leave room for an answer: 512 tokens, or half the sequence on small models
    limits = Limits(args.max_batch_size, args.max_input_len or max_seq - min(512, max_seq // 2), max_seq,
                    args.max_image_pixels)
    output = Path(args.output or f"engines/{Path(model).name}")
    archs = [a.strip() for a in args.cuda_archs.split(",")] if args.cuda_archs else None
    # trtllm-build reads the checkpoint; the vision ONNX is the multimodal runner's other half
    exports = sorted(set(args.export) | (set(EXPORTS) if args.backend == "tensorrt-llm" else set()))
    if args.backend == "tensorrt-llm":  # refused before anything is written that would fail later
        from .convert.build import vision_spec
        from .export.vision_onnx import runner_geometry_problem

        problem = runner_geometry_problem(vision_spec(ckpt.hf_config))
        if problem:
            raise ConfigError(f"--backend tensorrt-llm cannot serve this checkpoint: {problem} (build without "
                              "--backend: pdrop's own runtime handles it)")
    manifest, params = build_engine(ckpt, output, schedule, limits, args.dtype, args.force,
                                    progress=not args.quiet, plugins=args.plugins, cuda_archs=archs, exports=exports,
                                    cpu_kernels=args.cpu_kernels)
    n_img = largest_image_tokens(manifest.vision)
    fl = report(llm, schedule, n_img, 32)
    per_stage = schedule.tokens_per_layer(n_img, llm.n_layers)
    stages = [per_stage[0]] + [per_stage[b] for b in schedule.layers]
    print(f"engine written to {output}")
    print(f"  model        {ckpt.source} ({params / 1e6:.1f}M parameters, {manifest.dtype})")
    print(f"  pyramid      drop ratio {schedule.drop_ratio}, boundaries at layers {schedule.layers}")
    print(f"  image tokens {' -> '.join(map(str, stages))} per stage (largest image, N = {n_img})")
    for kind, label in (("paper", "paper formula"), ("full", "full count")):
        f = fl[kind]
        print(f"  prefill      {label:13} {_flops(f['no_drop'])} -> {_flops(f['drop'])} "
              f"({100 * (1 - f['ratio']):.1f}% less)")
    print(f"  limits       batch {limits.max_batch_size}, input {limits.max_input_len}, seq {limits.max_seq_len}, "
          f"image {limits.max_image_pixels / 1e6:g} MP")
    plug = manifest.plugins
    print(f"  kernels      {plug['library']} (sm_{', sm_'.join(plug['archs'])}; PTX {plug['ptx']})" if plug["library"]
          else f"  kernels      none ({plug['reason']}): the drop runs on torch ops")
    cpu = plug["cpu"]
    print(f"  cpu kernels  {', '.join(cpu['libraries'].values())}" if cpu["libraries"]
          else f"  cpu kernels  none ({cpu['reason']}): decode runs on torch ops on a CPU")
    if "onnx" in manifest.exports:
        onnx = manifest.exports["onnx"]
        print(f"  export       {onnx['path']} (opset {onnx['opset']}, {onnx['precision']}, onnxruntime vs torch "
              f"{onnx['relative_max_abs_diff']:.2e} of the output scale)")
    if "trtllm-checkpoint" in manifest.exports:
        ckpt_export = manifest.exports["trtllm-checkpoint"]
        print(f"  export       {ckpt_export['path']}/ (TensorRT-LLM checkpoint, {ckpt_export['architecture']})")
    if args.backend == "tensorrt-llm":
        from .export.trtllm_build import build_llm_engine, build_vision_engine

        sys.stdout.flush()  # the summary above stays before trtllm-build's log or the error line
        print(f"  tensorrt-llm {build_llm_engine(output, manifest)}")
        sys.stdout.flush()
        print(f"  tensorrt     {build_vision_engine(output)}")
    return 0


def cmd_run(args) -> int:
    from .runtime.engine import Engine
    from .network.images import load_image

    if args.keep_map and not args.image:  # before loading and generating, not after
        raise ConfigError("--keep-map needs an --image")
    engine = Engine.load(args.engine, device=args.device, dtype=args.dtype, compiled=args.compile)
    image = load_image(args.image, engine.manifest.limits.max_image_pixels) if args.image else None
    prompt = engine.chat_prompt(args.prompt, image is not None) if args.chat else args.prompt
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop, drop_ratio=args.drop_ratio)
    result = None
    for delta in engine.stream([prompt], [image], **kwargs):
        if not args.json:
            print(delta.text, end="", flush=True)
        result = delta.result or result
    if args.keep_map:
        from .network.keep_map import draw_keep_map

        draw_keep_map(image, result.layout, result.image_tokens, result.stages, args.keep_map)
    if args.json:
        print(json.dumps({**result.to_dict(), "dtype": engine.precision}))
    else:
        t = result.timings
        print()
        print(f"[{result.prompt_tokens} prompt tokens ({result.image_tokens} image), {len(result.token_ids)} generated; "
              f"TTFT {t['ttft_s'] * 1e3:.1f} ms (vision {t['vision_s'] * 1e3:.1f}, prefill {t['prefill_s'] * 1e3:.1f}), "
              f"decode {t['decode_tokens_per_s']:.1f} tok/s; prefill FLOPs x{result.flops['full']['ratio']:.3f}; "
              f"{engine.precision} on {engine.device}]",
              file=sys.stderr)
    return 0


def cmd_package(args) -> int:
    from .serve.package import package_repo

    model = package_repo(args.engine, args.output, args.model_name, args.instances, args.max_batch_size,
                         args.copy_engine, args.device, args.max_queue_delay_us, args.force, scheduler=args.scheduler,
                         kv_cache_tokens=args.kv_cache_tokens, max_queued_requests=args.max_queued_requests,
                         kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                         decoupled=args.decoupled == "true",
                         gpus=_indices(args.gpus, "--gpus", "GPU", "0,1,2,3") if args.gpus is not None else None,
                         prefix_cache_tokens=args.prefix_cache_tokens, dtype=args.dtype)
    print(f"model repository written to {args.output} (model '{model.name}')")
    print(f"serve it:  python -m builder serve --repo {args.output}")
    print(f"or, in NVIDIA's Triton container (with pdrop installed):  tritonserver --model-repository={args.output}")
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from .serve.launcher import TritonServer

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(args.repo, args.host, args.grpc_port, args.http_port, args.log_file, args.verbose,
                          args.metrics_port)
    with server, contextlib.ExitStack() as frontend:
        metrics = f", metrics {server.metrics_url}" if server.metrics_url else ""
        if args.openai_port:
            from .frontend.server import OpenAIServer

            openai = frontend.enter_context(OpenAIServer(server.grpc_url, server.models()[0], args.host,
                                                         args.openai_port, args.max_request_bytes))
            metrics += f", OpenAI API {openai.url}"
        print(f"serving {', '.join(server.models())} on grpc://{server.grpc_url} "
              f"(http://{server.host}:{server.http_port}{metrics}); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            if server.proc.poll() is not None:
                raise ConfigError(f"tritonserver exited unexpectedly with code {server.proc.returncode}")
    print("stopped", flush=True)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m builder", description="pdrop: LLaVA-NeXT engines with PyramidDrop")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="convert a LLaVA-NeXT checkpoint into an engine directory")
    b.add_argument("--model", default="demo",
                   help="Hugging Face LLaVA-NeXT directory, or a built-in random-weight preset: demo (default), "
                        "llava-next-small, llava-next-vicuna-7b, llava-next-mistral-7b")
    b.add_argument("--drop-ratio", type=float, default=0.5,
                   help="fraction of the image tokens dropped at each stage boundary, in [0, 1) (default 0.5)")
    b.add_argument("--layers", help="stage boundaries, e.g. 8,16,24 (default: the quarters of the LLM depth)")
    b.add_argument("--dtype", default="auto",
                   help="auto | float32 | float16 | bfloat16 (default auto: stores the checkpoint's dtype; the runtime "
                        "runs it on a GPU, and on a CPU bfloat16 where it has native bf16, else float32); a dtype "
                        "named here runs on every device")
    b.add_argument("--max-batch-size", type=int, default=8)
    b.add_argument("--max-input-len", type=int, help="longest prompt, image tokens included")
    b.add_argument("--max-seq-len", type=int, help="prompt + output (default: the model's max positions)")
    b.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels,
                   help="larger images are refused before decoding (default: %(default)s)")
    b.add_argument("--output", help="engine directory (default engines/<model name>)")
    b.add_argument("--force", action="store_true", help="replace an existing output directory")
    b.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    b.add_argument("--plugins", default="auto",
                   help="compile the drop's CUDA kernels into the engine: auto (when nvcc is found, or the cache "
                        "holds a build of these sources, as scripts/gpu_prepare.sh leaves one), on, off")
    b.add_argument("--cpu-kernels", default="auto",
                   help="compile the CPU decode kernels into the engine: auto (when a C++ compiler is found), on, off")
    b.add_argument("--cuda-archs", help="GPU architectures for the kernels, any this nvcc lists (nvcc --list-gpu-arch), "
                                        "e.g. 80,90,100,120 (default 80,86,89,90); PTX of the newest is embedded too")
    b.add_argument("--export", action="append", default=[], choices=EXPORTS,
                   help="also write a TensorRT deployment artifact into the engine (repeatable): onnx = the vision "
                        "tower + projector as vision/model.onnx, checked with onnxruntime; trtllm-checkpoint = "
                        "the LLM as a TensorRT-LLM checkpoint in trtllm-checkpoint/")
    b.add_argument("--backend", default="pytorch", choices=["pytorch", "tensorrt-llm"],
                   help="pytorch (default): the engine pdrop runs; tensorrt-llm: also run trtllm-build on the "
                        "exports into <output>/llm (needs TensorRT-LLM installed)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("run", help="answer a prompt about an image with an engine")
    r.add_argument("--engine", required=True, help="engine directory")
    r.add_argument("--prompt", required=True,
                   help="raw prompt; <image> marks where the image goes (put first when absent)")
    r.add_argument("--image", help="image file")
    r.add_argument("--chat", action="store_true", help="wrap --prompt in the checkpoint's chat template")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--drop-ratio", type=float, help="override the engine's drop ratio for this run")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    r.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (compiled at load: tens of seconds)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--keep-map", metavar="OUT.png", help="draw which image patches survived each stage")
    r.set_defaults(func=cmd_run)

    k = sub.add_parser("package", help="turn an engine into a Triton model repository")
    k.add_argument("--engine", required=True, help="engine directory")
    k.add_argument("--output", required=True, help="model repository directory to write")
    k.add_argument("--model-name", default="pdrop", help="'ensemble' makes it a drop-in for tensorrtllm_backend clients")
    k.add_argument("--instances", type=int, default=1,
                   help="model instances; each loads the engine and has its own KV pool (1: one scheduler sees all)")
    k.add_argument("--max-batch-size", type=int, help="Triton batch size (default: the engine's)")
    k.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching window")
    k.add_argument("--device", default="auto", help="where the model runs: auto | cpu | cuda | cuda:N")
    k.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    k.add_argument("--gpus", metavar="0,1,...",
                   help="one engine on each of these GPUs (Triton KIND_GPU instances; --instances per GPU): "
                        "data parallel, each with its own KV pool and scheduler")
    k.add_argument("--copy-engine", action="store_true", help="copy the engine into the repository")
    k.add_argument("--scheduler", default="inflight", choices=["inflight", "static"],
                   help="inflight (default): requests join and leave the running batch between steps; "
                        "static: a batch runs to its end before the next is admitted (the baseline)")
    k.add_argument("--kv-cache-tokens", type=int, default=0,
                   help="KV pool size in token slots per layer (default 0: on CUDA planned from memory, "
                        "see --kv-cache-memory-fraction; on a CPU max batch size x max seq len)")
    k.add_argument("--kv-cache-memory-fraction", type=float, default=0.0,
                   help="on CUDA without --kv-cache-tokens: the KV pool takes this fraction of the GPU memory "
                        "left by the weights and the measured peak of the largest prefill and decode step "
                        "(TensorRT-LLM's free_gpu_memory_fraction); 0: the default, 0.9")
    k.add_argument("--prefix-cache-tokens", type=int,
                   help="token slots per layer for prefixes shared across requests (an image and the text "
                        "before it: its vision features and first-stage KV); default a quarter of the pool's, "
                        "0 turns the cache off")
    k.add_argument("--max-queued-requests", type=int, default=64,
                   help="waiting requests beyond this get 'server busy, retry later'")
    k.add_argument("--decoupled", default="true", choices=["true", "false"],
                   help="true (default): streaming, one response per token; false: for unary clients "
                        "(ModelInfer), one response per request")
    k.add_argument("--force", action="store_true", help="replace an existing output directory")
    k.set_defaults(func=cmd_package)

    s = sub.add_parser("serve", help="run tritonserver (from nvidia-pytriton) on a model repository")
    s.add_argument("--repo", required=True, help="model repository (from `package`)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--openai-port", type=int, default=0,
                   help="also serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) "
                        "on this port, a gRPC client of the server (default 0: off)")
    s.add_argument("--max-request-bytes", type=int,
                   help="OpenAI API: larger request bodies get 413, before any of them is decoded (default: an "
                        "image of the engine's --max-image-pixels at one byte a pixel, base64, plus 1 MiB)")
    s.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics at http://HOST:PORT/metrics, tensorrtllm_backend's families (0: off)")
    s.add_argument("--log-file", help="tritonserver's log (default: discarded)")
    s.add_argument("--verbose", action="store_true", help="verbose tritonserver log")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except PdropError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
