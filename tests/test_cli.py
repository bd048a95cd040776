"""End to end: `python -m builder build|run`, the happy path and every kind of bad input.

The happy path and one case of each error family run as real subprocesses (exit codes, streams);
the other bad inputs go through `builder.cli.main`, the function `python -m builder` calls, in this
process (each subprocess pays ~4 s of imports), and are checked exactly the same way.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.cli import main
from builder.format.manifest import read_manifest, write_manifest
from builder.runtime.engine import Engine
from builder.network.keep_map import draw_keep_map

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTION = "What is in the image?"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
STATS = re.compile(r"^\[(\d+) prompt tokens \((\d+) image\), (\d+) generated; TTFT [\d.]+ ms "
                   r"\(vision [\d.]+, prefill [\d.]+\), decode [\d.]+ tok/s; prefill FLOPs x([\d.]+); "
                   r"(float32|bfloat16|float16) on cpu\]$")
# one of each family as a real process: argparse (exit 2), build (exit 1), run (exit 1)
SUBPROCESS = {"build:drop-ratio-abc", "build:model-missing", "run:engine-checksum", "exists"}


def cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)


def write_png(path: Path, height: int = 100, width: int = 150) -> Path:
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_bomb_png(path: Path) -> Path:
    """A valid PNG header claiming 20000 x 20000 pixels: Pillow refuses it as a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---- the bad inputs --------------------------------------------------------------------------
# id -> (args after `build --output out/engine --quiet`, exit code, what the error line must say).
# "{ck}" is the directory of the prepared checkpoints below.
BUILD_ERRORS = {
    "model-missing": (["--model", "{ck}/no-such-dir"], 1, "checkpoint directory not found"),
    "config-corrupt-json": (["--model", "{ck}/corrupt-json"], 1, "corrupt config.json"),
    "model-llama": (["--model", "{ck}/llama"], 1, "unsupported model 'llama'"),
    "llm-qwen2": (["--model", "{ck}/qwen2"], 1, "unsupported language model 'qwen2'"),
    "weights-truncated": (["--model", "{ck}/truncated"], 1, "corrupt weights file model.safetensors"),
    "weights-garbage": (["--model", "{ck}/garbage"], 1, "corrupt weights file model.safetensors"),
    # fails while the engine is being written: the staging directory must vanish
    "weights-wrong-shape": (["--model", "{ck}/wrong-shape"], 1, "has shape (128, 127)"),
    "drop-ratio-1": (["--drop-ratio", "1.0"], 1, "drop ratio must be in [0, 1)"),
    "drop-ratio-negative": (["--drop-ratio", "-0.1"], 1, "drop ratio must be in [0, 1)"),
    "drop-ratio-nan": (["--drop-ratio", "nan"], 1, "drop ratio must be in [0, 1)"),
    "drop-ratio-abc": (["--drop-ratio", "abc"], 2, "invalid float value: 'abc'"),
    "layers-repeated": (["--layers", "2,2"], 1, "strictly increasing"),
    "layers-zero": (["--layers", "0,4"], 1, "must lie in 1..7"),
    "layers-decreasing": (["--layers", "4,2"], 1, "strictly increasing"),
    "layers-too-deep": (["--layers", "9"], 1, "must lie in 1..7"),
    "layers-not-numbers": (["--layers", "a,b"], 1, "comma-separated layer indices"),
    "layers-empty": (["--layers", ""], 1, "comma-separated layer indices"),
    "dtype-int8": (["--dtype", "int8"], 1, "unsupported dtype 'int8'"),
    "input-len-over-seq-len": (["--max-input-len", "4096", "--max-seq-len", "2048"], 1,
                               "--max-input-len (4096) must be below --max-seq-len (2048)"),
}

# id -> (args after `run`, what the error line must say); "{x}" are prepared paths, see `cases`.
# Without --engine, the error cases run conftest's demo engine.
RUN_ERRORS = {
    "engine-missing": (["--engine", "{tmp}/no-such-engine", "--prompt", "hi"], "not an engine directory"),
    "engine-checksum": (["--engine", "{bad_sum}", "--prompt", "hi"], "checksum mismatch"),
    "engine-format-999": (["--engine", "{v999}", "--prompt", "hi"], "format version 999"),
    "engine-manifest-edited": (["--engine", "{edited}", "--prompt", "hi"], "manifest.json does not match"),
    "engine-unlisted-corrupt": (["--engine", "{unlisted}", "--prompt", "hi"], "not in the manifest"),
    "engine-digest-missing": (["--engine", "{no_digest}", "--prompt", "hi"], "manifest.sha256 is missing"),
    "image-missing": (["--image", "{tmp}/no-such.png", "--prompt", "hi"], "image not found"),
    "image-text-file": (["--image", "{text}", "--prompt", "hi"], "unreadable image"),
    "prompt-too-long": (["--image", "{img}", "--prompt", " ".join(["word"] * 3000)], "max_input_len is 1536"),
    "prompt-two-images": (["--image", "{img}", "--prompt", "<image> left <image> right"], "2 <image> markers"),
    "drop-ratio-1.5": (["--image", "{img}", "--prompt", "hi", "--drop-ratio", "1.5"], "drop ratio must be in [0, 1)"),
    "temperature-negative": (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    "max-new-tokens-0": (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive"),
    "keep-map-no-image": (["--prompt", "hi", "--keep-map", "km.png"], "--keep-map needs an --image"),
    # extra cases (product fixes): these were tracebacks or a silently empty answer
    "image-bomb": (["--image", "{bomb}", "--prompt", "hi"], "decompression bomb"),
    "prompt-image-no-image": (["--prompt", "<image> what?"], "no image was given"),
    "stop-empty": (["--prompt", "hi", "--stop", ""], "stop must be non-empty strings"),
    "device-unknown": (["--prompt", "hi", "--device", "bogus"], "unsupported device 'bogus'"),
    "device-absent": (["--prompt", "hi", "--device", "cuda:99"], "no CUDA device 'cuda:99'"),
}

def prepare_checkpoints(hf_dir: Path, ck: Path) -> None:
    """Broken copies of conftest's Hugging Face export of the demo preset."""
    from safetensors.torch import load_file, save_file

    for name in ("corrupt-json", "llama", "qwen2", "truncated", "garbage", "wrong-shape"):
        shutil.copytree(hf_dir, ck / name)
    (ck / "corrupt-json/config.json").write_text('{"model_type": "llava_next", "text_config": {')
    (ck / "llama/config.json").write_text(json.dumps(json.loads((hf_dir / "config.json").read_text())["text_config"]))
    edit_json(ck / "qwen2/config.json", lambda c: c["text_config"].update(model_type="qwen2"))
    weights = (hf_dir / "model.safetensors").read_bytes()
    (ck / "truncated/model.safetensors").write_bytes(weights[:len(weights) // 2])
    (ck / "garbage/model.safetensors").write_bytes(bytes(range(256)) * 64)
    tensors = load_file(hf_dir / "model.safetensors")
    key = "model.multi_modal_projector.linear_2.weight"  # read after llm.safetensors is already staged
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, ck / "wrong-shape/model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def cases(hf_dir, engine_dir, tmp_path_factory):
    """Every CLI call of this module but the happy path: id -> (cwd, argv)."""
    out: dict[str, tuple[Path, list[str]]] = {}

    def new_dir(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    # An existing output: refused without --force, replaced with it.
    for name, extra in (("exists", []), ("force", ["--force"])):
        cwd = new_dir(name)
        (cwd / "out/engine").mkdir(parents=True)
        (cwd / "out/engine/keep.txt").write_text("precious")
        out[name] = (cwd, ["build", "--output", "out/engine", "--quiet", *extra])

    ck = new_dir("ckpts")
    prepare_checkpoints(Path(hf_dir), ck)
    for name, (args, _, _) in BUILD_ERRORS.items():
        cwd = new_dir("build-" + name)
        (cwd / "out").mkdir()
        args = [a.replace("{ck}", str(ck)) for a in args]
        out["build:" + name] = (cwd, ["build", "--output", "out/engine", "--quiet", *args])

    inputs = new_dir("run-inputs")
    paths = {"tmp": inputs, "img": write_png(inputs / "img.png"), "bomb": write_bomb_png(inputs / "bomb.png"),
             "bad_sum": inputs / "bad-sum", "v999": inputs / "v999", "text": inputs / "notes.txt",
             "edited": inputs / "edited", "unlisted": inputs / "unlisted", "no_digest": inputs / "no-digest"}
    paths["text"].write_text("this is not an image\n")
    shutil.copytree(engine_dir, paths["bad_sum"])
    with open(paths["bad_sum"] / "llm.safetensors", "r+b") as f:  # one byte flipped, size unchanged
        f.seek(f.seek(0, os.SEEK_END) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    for name in ("v999", "edited", "unlisted", "no_digest"):
        shutil.copytree(engine_dir, paths[name])
    manifest = read_manifest(engine_dir)
    # as a newer builder writes it (its digest matches): only the version is wrong
    write_manifest(paths["v999"], dataclasses.replace(manifest, format_version=999))
    edit_json(paths["edited"] / "manifest.json", lambda m: m["pyramid"].update(drop_ratio=0.9))
    # the weights dropped from the file list (the digest made to match) and then corrupted
    write_manifest(paths["unlisted"], dataclasses.replace(
        manifest, files={k: v for k, v in manifest.files.items() if k != "llm.safetensors"}))
    (paths["unlisted"] / "llm.safetensors").write_bytes(b"\0" * 64)
    (paths["no_digest"] / "manifest.sha256").unlink()
    for name, (args, _) in RUN_ERRORS.items():
        args = [a.format(**paths) if "{" in a else a for a in args]
        if "--engine" not in args:
            args = ["--engine", engine_dir, *args]
        out["run:" + name] = (new_dir("run-" + name), ["run", *map(str, args)])
    return out


def result(cases, name: str, monkeypatch, capsys) -> tuple[subprocess.CompletedProcess, Path]:
    cwd, argv = cases[name]
    if name in SUBPROCESS:
        return cli(argv, cwd), cwd
    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err), cwd


def assert_one_error(p: subprocess.CompletedProcess, code: int, says: str) -> None:
    report = f"exit {p.returncode}\nstdout: {p.stdout!r}\nstderr:\n{p.stderr}"
    lines = p.stderr.splitlines()
    assert p.returncode == code, report
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    assert "Traceback" not in p.stderr, report
    assert says in lines[0], report
    assert p.stdout == "", report


def only_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---- happy path ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def happy(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`build` of the demo preset by the CLI, in a directory that also holds the test image."""
    cwd = tmp_path_factory.mktemp("happy")
    write_png(cwd / "img.png")
    return cli(["build", "--output", "engine", "--quiet"], cwd), cwd


@pytest.fixture(scope="module")
def built(happy) -> Path:
    p, cwd = happy
    assert p.returncode == 0, p.stderr
    return cwd / "engine"


@pytest.fixture(scope="module")
def runs(built) -> dict[str, subprocess.CompletedProcess]:
    args = {
        "run-json": ["--prompt", QUESTION, "--json", "--max-new-tokens", 4, "--keep-map", "km.png"],
        "run-drop-0": ["--prompt", QUESTION, "--json", "--max-new-tokens", 2, "--drop-ratio", 0],
        "run-chat-stream": ["--prompt", QUESTION, "--chat", "--max-new-tokens", 4],
    }
    return {name: cli(["run", "--engine", "engine", "--image", "img.png", *a], built.parent)
            for name, a in args.items()}


@pytest.fixture(scope="module")
def reference(built) -> Engine:
    """The CLI-built engine loaded in this process, to check what the subprocesses printed."""
    return Engine.load(built, device="cpu")


def run_json(runs, name: str) -> dict:
    p = runs[name]
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout  # one JSON object, nothing streamed around it
    return json.loads(lines[0])


def test_build_writes_an_engine_and_a_summary(happy, built):
    p, cwd = happy
    assert "Traceback" not in p.stderr and "converting" not in p.stderr  # --quiet: no progress bar
    names = only_entries(built)
    for required in ("manifest.json", "llm.safetensors", "vision.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "processor_config.json"):
        assert required in names
    assert [n for n in only_entries(cwd) if n.startswith(".")] == []  # no staging directory left beside it
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["pyramid"] == {"layers": [2, 4, 6], "drop_ratio": 0.5, "method": "attention",
                                   "positions": "renumber", "seed": 0}
    assert manifest["limits"] == {"max_batch_size": 8, "max_input_len": 1536, "max_seq_len": 2048,
                                  "max_image_pixels": 50_000_000}
    assert sorted(manifest["files"]) == [n for n in names if n not in ("manifest.json", "manifest.sha256")]
    out = p.stdout
    assert out.startswith("engine written to engine\n")
    assert "preset:demo" in out
    assert "drop ratio 0.5, boundaries at layers [2, 4, 6]" in out
    assert "336 -> 168 -> 84 -> 42 per stage" in out
    assert out.count("% less)") == 2  # paper formula and full count
    assert "limits       batch 8, input 1536, seq 2048" in out


def test_run_json(runs, built, reference):
    r = run_json(runs, "run-json")
    keys = {"text", "token_ids", "prompt_tokens", "image_tokens", "stages", "timings", "flops"}
    assert keys <= set(r)
    eos = set(json.loads((built / "manifest.json").read_text())["eos_token_ids"])
    ids = r["token_ids"]
    assert len(ids) == 4 or (0 < len(ids) < 4 and ids[-1] in eos)
    assert isinstance(r["text"], str)

    n = r["image_tokens"]
    assert 0 < n < r["prompt_tokens"] <= 1536
    assert [s["layer"] for s in r["stages"]] == [2, 4, 6]
    alive, previous = n, set(range(n))
    for i, s in enumerate(r["stages"]):
        assert s["tokens_in"] == alive
        assert s["tokens_kept"] == int(n * 0.5 ** (i + 1))
        kept = s["kept"]
        assert len(kept) == s["tokens_kept"] and kept == sorted(set(kept))
        assert set(kept) <= previous  # a token dropped once stays dropped
        alive, previous = s["tokens_kept"], set(kept)

    t = r["timings"]
    for key in ("vision_s", "prefill_s", "ttft_s", "decode_s", "decode_tokens_per_s"):
        assert isinstance(t[key], float) and math.isfinite(t[key]) and t[key] >= 0, (key, t)
    assert t["ttft_s"] >= t["vision_s"]
    for kind in ("paper", "full"):
        f = r["flops"][kind]
        assert 0 < f["drop"] < f["no_drop"]
        assert 0 < f["ratio"] < 1 and f["ratio"] == pytest.approx(f["drop"] / f["no_drop"])

    # the same request in this process: same prompt, same schedule, same greedy tokens
    [ref] = reference.generate([QUESTION], [Image.open(built.parent / "img.png")], max_new_tokens=4)
    assert (r["prompt_tokens"], r["image_tokens"]) == (ref.prompt_tokens, ref.image_tokens)
    assert [s["kept"] for s in r["stages"]] == [s.kept for s in ref.stages]
    assert (r["token_ids"], r["text"]) == (ref.token_ids, ref.text)


def test_run_keep_map_is_a_png_of_the_stages(runs, built, tmp_path):
    r = run_json(runs, "run-json")
    km = built.parent / "km.png"
    assert km.read_bytes().startswith(PNG_MAGIC)
    with Image.open(km) as img:
        img.verify()
    with Image.open(km) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0
        pixels = np.asarray(img.convert("RGB"))
    # drawn again here from the printed stages and layout: the very same picture
    expected = draw_keep_map(Image.open(built.parent / "img.png").convert("RGB"), r["layout"], r["image_tokens"],
                             r["stages"], tmp_path / "expected.png")
    assert np.array_equal(pixels, np.asarray(Image.open(expected).convert("RGB")))


def test_run_drop_ratio_zero_keeps_every_image_token(runs):
    r = run_json(runs, "run-drop-0")
    full = run_json(runs, "run-json")
    n = r["image_tokens"]
    assert (n, r["prompt_tokens"]) == (full["image_tokens"], full["prompt_tokens"])
    assert [s["layer"] for s in r["stages"]] == [2, 4, 6]
    for s in r["stages"]:
        assert s["tokens_in"] == s["tokens_kept"] == n
        assert s["kept"] == list(range(n))
    assert r["flops"]["full"]["ratio"] == 1.0 and r["flops"]["paper"]["ratio"] == 1.0
    assert len(r["token_ids"]) <= 2


def test_run_chat_streams_text_and_a_stats_line(runs, built, reference):
    p = runs["run-chat-stream"]
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    stats = STATS.match(lines[0])
    assert stats, lines[0]
    prompt_tokens, image_tokens, generated, ratio, dtype = stats.groups()
    assert dtype == reference.precision  # the CLI-built engine (--dtype auto): this CPU's choice

    prompt = reference.chat_prompt(QUESTION, with_image=True)
    assert prompt.startswith("A chat between") and prompt.endswith("ASSISTANT:")
    [ref] = reference.generate([prompt], [Image.open(built.parent / "img.png")], max_new_tokens=4)
    assert p.stdout == ref.text + "\n"  # the streamed text, then the newline before the stats
    assert (int(prompt_tokens), int(image_tokens), int(generated)) == (
        ref.prompt_tokens, ref.image_tokens, len(ref.token_ids))
    assert float(ratio) == pytest.approx(ref.flops["full"]["ratio"], abs=1e-3)
    # the template wraps the question: more prompt tokens than the raw prompt, the same image
    raw = run_json(runs, "run-json")
    assert int(prompt_tokens) > raw["prompt_tokens"] and int(image_tokens) == raw["image_tokens"]


# ---- bad input: one `error:` line, no traceback, nothing left behind -----------------------

@pytest.mark.parametrize("name", BUILD_ERRORS)
def test_build_error(cases, name, monkeypatch, capsys):
    p, cwd = result(cases, "build:" + name, monkeypatch, capsys)
    _, code, says = BUILD_ERRORS[name]
    assert_one_error(p, code, says)
    assert only_entries(cwd) == ["out"]
    assert only_entries(cwd / "out") == []  # no engine, no .engine.partial-* staging directory


def test_build_refuses_an_existing_output(cases, monkeypatch, capsys):
    p, cwd = result(cases, "exists", monkeypatch, capsys)
    assert_one_error(p, 1, "exists; pass --force")
    assert only_entries(cwd / "out") == ["engine"]
    assert only_entries(cwd / "out/engine") == ["keep.txt"]
    assert (cwd / "out/engine/keep.txt").read_text() == "precious"


def test_build_force_replaces_an_existing_output(cases, monkeypatch, capsys):
    p, cwd = result(cases, "force", monkeypatch, capsys)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("engine written to out/engine\n")
    assert only_entries(cwd / "out") == ["engine"]  # no .engine.partial-* nor .engine.old-*
    names = only_entries(cwd / "out/engine")
    assert "keep.txt" not in names
    assert {"manifest.json", "llm.safetensors", "vision.safetensors", "tokenizer.json"} <= set(names)


@pytest.mark.parametrize("name", RUN_ERRORS)
def test_run_error(cases, name, monkeypatch, capsys):
    p, cwd = result(cases, "run:" + name, monkeypatch, capsys)
    assert_one_error(p, 1, RUN_ERRORS[name][1])
    assert only_entries(cwd) == []  # e.g. no keep map drawn


def test_run_error_names_the_corrupt_file(cases, monkeypatch, capsys):
    p, _ = result(cases, "run:engine-checksum", monkeypatch, capsys)
    assert "llm.safetensors" in p.stderr and "rebuild" in p.stderr



def test_a_build_removes_what_killed_builds_left_but_not_a_live_builds(tmp_path, monkeypatch, capsys):
    leftover = []
    for _ in range(5):  # SIGKILL while it stages (a build that wins the race finishes; try again)
        killed = subprocess.Popen([sys.executable, "-m", "builder", "build", "--output", "out/engine", "--quiet",
                                   "--force"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        while killed.poll() is None and not list((tmp_path / "out").glob(".engine.partial-*")):
            time.sleep(0.005)
        killed.kill()
        killed.wait()
        leftover = list((tmp_path / "out").glob(".engine.partial-*"))
        if leftover:
            break
    assert len(leftover) == 1
    shutil.rmtree(tmp_path / "out/engine", ignore_errors=True)
    live = tmp_path / "out" / f".engine.partial-{os.getpid()}-abcd"  # this process is alive
    live.mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--output", "out/engine", "--quiet"]) == 0
    assert only_entries(tmp_path / "out") == sorted(["engine", live.name])
