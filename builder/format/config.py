"""Dataclass configs: the language model's shape, the pyramid schedule and the engine limits."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import CheckpointError, ConfigError

# Llama-family text models whose decoder is exactly ours (RMSNorm, RoPE, SwiGLU, no biases).
SUPPORTED_TEXT_MODELS = ("llama", "mistral")
# TensorRT deployment artifacts `build --export` writes beside the engine (export/vision_onnx.py,
# export/trtllm_checkpoint.py).
EXPORTS = ("onnx", "trtllm-checkpoint")
# Weight dtypes of an engine, by torch's names (torch.float32, ...).
DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(name: str, error: type[Exception] = ConfigError) -> None:
    """`name` is "auto" or one of DTYPES (build, package and load take the same names); else `error`,
    one line."""
    if name not in ("auto", *DTYPES):
        raise error(f"unsupported dtype '{name}': choose auto, {', '.join(DTYPES)}")
# How the runtime batches: requests join and leave between steps, or static batches (the baseline).
SCHEDULERS = ("inflight", "static")


@dataclass
class LLMConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, text_config) -> "LLMConfig":
        """Map a transformers Llama/Mistral config, refusing anything our decoder would run wrongly."""
        kind = text_config.model_type
        if kind not in SUPPORTED_TEXT_MODELS:
            raise CheckpointError(
                f"unsupported language model '{kind}': pdrop runs {', '.join(SUPPORTED_TEXT_MODELS)} (Llama family)")
        rope = getattr(text_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise CheckpointError(f"unsupported RoPE scaling '{rope_type}' in the text model")
        if getattr(text_config, "attention_bias", False) or getattr(text_config, "mlp_bias", False):
            raise CheckpointError("unsupported text model: linear biases in attention or MLP")
        if text_config.hidden_act != "silu":
            raise CheckpointError(f"unsupported text model activation '{text_config.hidden_act}'")
        n_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        return cls(
            vocab_size=text_config.vocab_size,
            dim=text_config.hidden_size,
            n_layers=text_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=text_config.num_key_value_heads or n_heads,
            head_dim=head_dim,
            intermediate_size=text_config.intermediate_size,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=text_config.rms_norm_eps,
            max_position_embeddings=text_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        )


@dataclass
class PyramidSchedule:
    """Stage boundaries and drop ratio. Stage s (0-based) ends before layer `layers[s]`.

    Keep counts are taken from the ORIGINAL image-token count N, as the authors' code does:
    after boundary s the image span holds int(N * stage_ratio(s)) tokens, stage_ratio(s) being
    keep_ratio**(s+1) as the decimal the authors write out.
    """
    layers: list[int] = field(default_factory=list)
    drop_ratio: float = 0.5
    # Baselines for comparison, not PyramidDrop: "random" keeps a seeded random subset of the same
    # size; positions "original" keeps the survivors' original RoPE positions (FastV) instead of
    # renumbering them 0..L'-1 (the authors' rule).
    method: str = "attention"
    positions: str = "renumber"
    seed: int = 0

    @property
    def keep_ratio(self) -> float:
        """λ, the fraction of the image tokens each boundary keeps."""
        return round(1.0 - self.drop_ratio, 12)

    @property
    def active(self) -> bool:
        return self.drop_ratio > 0 and bool(self.layers)

    def stage_ratio(self, stage: int) -> float:
        """λ^(stage+1) equal to the literal the authors pass (0.7 -> 0.7, 0.49, 0.343): a float power
        is an ulp off (0.7**2 = 0.48999999999999994), and int(N * ratio) then loses a token."""
        return round(self.keep_ratio ** (stage + 1), 12)

    def kept_after(self, n_image: int, stage: int) -> int:
        """Image tokens alive after boundary `stage` for a span of `n_image` original tokens."""
        return int(n_image * self.stage_ratio(stage))

    def tokens_per_layer(self, n_image: int, n_layers: int) -> list[int]:
        counts, alive = [], n_image
        for i in range(n_layers):
            if self.active and i in self.layers:
                alive = self.kept_after(n_image, self.layers.index(i))
            counts.append(alive)
        return counts

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "drop_ratio": self.drop_ratio, "method": self.method,
                "positions": self.positions, "seed": self.seed}

    @classmethod
    def default_layers(cls, n_layers: int) -> list[int]:
        """The quarters of the depth: [8, 16, 24] for a 32-layer model, as in the paper."""
        layers = sorted({round(n_layers * q / 4) for q in (1, 2, 3)} - {0})
        return [layer for layer in layers if layer < n_layers]

    @classmethod
    def create(cls, n_layers: int, drop_ratio: float, layers: list[int] | None = None, method: str = "attention",
               positions: str = "renumber", seed: int = 0) -> "PyramidSchedule":
        validate_drop_ratio(drop_ratio)
        if method not in ("attention", "random") or positions not in ("renumber", "original"):
            raise ConfigError(f"unknown drop method '{method}' or positions '{positions}'")
        layers = cls.default_layers(n_layers) if layers is None else list(layers)
        if any(not 0 < layer < n_layers for layer in layers):
            raise ConfigError(f"--layers must lie in 1..{n_layers - 1} for a {n_layers}-layer model, got {layers}")
        if layers != sorted(set(layers)):
            raise ConfigError(f"--layers must be strictly increasing, got {layers}")
        return cls(layers=layers, drop_ratio=float(drop_ratio), method=method, positions=positions, seed=seed)


def validate_drop_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ConfigError(f"drop ratio must be in [0, 1), got {ratio}")


@dataclass
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    # larger images are refused before they are decoded; LLaVA-NeXT resizes every image to a grid of
    # at most ~0.5 MP, and 50 MP still takes any camera's photo
    max_image_pixels: int = 50_000_000

    def validate(self, llm: LLMConfig, sliding_window: int | None) -> None:
        if min(self.max_batch_size, self.max_input_len, self.max_seq_len, self.max_image_pixels) < 1:
            raise ConfigError("--max-batch-size, --max-input-len, --max-seq-len and --max-image-pixels must be "
                              "positive")
        if self.max_input_len >= self.max_seq_len:
            raise ConfigError(
                f"--max-input-len ({self.max_input_len}) must be below --max-seq-len ({self.max_seq_len})")
        if self.max_seq_len > llm.max_position_embeddings:
            raise ConfigError(f"--max-seq-len ({self.max_seq_len}) exceeds the model's "
                              f"max_position_embeddings ({llm.max_position_embeddings})")
        if sliding_window is not None and self.max_seq_len > sliding_window:
            raise ConfigError(f"--max-seq-len ({self.max_seq_len}) exceeds the model's sliding window "
                              f"({sliding_window}); pdrop runs full attention only")

    def to_dict(self) -> dict:
        return asdict(self)
