"""The one typed settings object every room reads.

Defaults describe the embedded mode (one machine, ``make demo``). Each field
can be overridden by an environment variable ``OSMF_<FIELD>`` (nested
sections with ``__``, e.g. ``OSMF_BROKER__PORT=19092``) or by a YAML file
named by ``OSMF_CONFIG`` (or ``osmf --config FILE``). Precedence: explicit
arguments > environment > YAML file > defaults.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV_VAR = "OSMF_CONFIG"


class BrokerSettings(BaseModel):
    """The embedded Tansu broker (ignored when ``kafka_bootstrap`` is set)."""

    host: str = Field("127.0.0.1", description="Address Tansu listens on.")
    port: int = Field(19092, ge=1, le=65535, description="Kafka port of Tansu.")
    storage: Literal["memory", "s3"] = Field(
        "memory",
        description="memory: fast, lost on restart; s3: durable, on a local SeaweedFS.",
    )
    s3_port: int = Field(18333, ge=1, le=65535, description="S3 port of the local SeaweedFS.")
    s3_bucket: str = Field("tansu", description="Bucket that holds the broker's data.")
    start_timeout_s: float = Field(30.0, gt=0, description="How long `start` waits for the broker.")


class TopicSettings(BaseModel):
    """Topic names and partition counts (docs/architecture.md §3)."""

    impressions: str = "osmf.impressions"
    clicks: str = "osmf.clicks"
    preference_pairs: str = "osmf.preference-pairs"
    dead_letter: str = "osmf.dead-letter"
    drift_alerts: str = "osmf.drift-alerts"
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of each topic created.")

    def all_names(self) -> list[str]:
        """Every topic the product writes to."""
        return [self.impressions, self.clicks, self.preference_pairs, self.dead_letter, self.drift_alerts]


class StreamsSettings(BaseModel):
    """The Faust stream worker (``osmf worker``)."""

    app_id: str = Field("osmf-worker", min_length=1, description="Consumer group and table-topic prefix.")
    batch_size: int = Field(
        1000, ge=1, le=100_000, description="Kafka messages per micro-batch (take_events); a batch message counts once."
    )
    batch_within_s: float = Field(0.1, gt=0, description="Longest wait to fill a micro-batch (adds to click -> feature latency).")
    dedupe_window_s: float = Field(3600.0, gt=0, description="Event-time window in which duplicate ids are dropped.")
    attribution_window_s: float = Field(1800.0, gt=0, description="Latest a click may follow its impression.")
    drift_label_delay_s: float = Field(
        60.0, gt=0, description="An impression counts as not clicked for drift once this much event time passed."
    )
    max_groups: int = Field(8, ge=1, le=256, description="Most groups per product category.")
    grouping_taste_alpha: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="A category splits only once users differ in taste at this adjusted p-value; 1 = off (levels alone split).",
    )
    min_pair_impressions: int = Field(100, ge=1, description="Impressions each creative needs before pairing.")
    pair_confidence: float = Field(0.95, gt=0.5, lt=1.0, description="P(CTR_A > CTR_B) needed for a pair.")
    outcome_partitions: int = Field(4, ge=1, le=1024, description="Partitions of the internal per-category topic.")
    session_timeout_s: float = Field(
        10.0, gt=1, description="Kafka group session timeout; joining a group takes about half of it on Tansu."
    )
    metrics_port: int = Field(
        9108, ge=0, le=65535, description="Prometheus metrics port of worker 1 (worker i: +i-1); 0 = off."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's metrics bind to (0.0.0.0 in a container, with security.http_token)."
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes started by `osmf worker`.")
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio", description="The worker's event loop: asyncio (Python's) or uvloop (docs/streams.md 'Faust settings')."
    )
    cython_optimizations: bool = Field(
        False, description="Faust's cython_optimizations: the opt-in fast paths of its compiled stream iterator and conductor."
    )
    buffer_maxsize: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Faust's stream_buffer_maxsize (messages buffered per stream); default max(4 x batch_size, 4096).",
    )
    max_poll_records: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Faust's broker_max_poll_records (most records one fetch hands over); default max(batch_size, 500).",
    )


class ProducerSettings(BaseModel):
    """How the product's producers (`osmf simulate`, `osmf replay`, ``infra.producer``) send events."""

    batch: bool = Field(True, description="Many events per Kafka message (schema 2); false: one event a message.")
    linger_ms: float = Field(
        10.0, ge=0, le=10_000, description="Longest an event waits for its partition's batch to fill before it is sent."
    )
    batch_events: int = Field(500, ge=1, le=10_000, description="A batch is sent once it holds this many events ...")
    batch_bytes: int = Field(
        256 * 1024, ge=1024, le=1024 * 1024, description="... or would grow past this many bytes (1 MiB at most)."
    )


class SimulatorSettings(BaseModel):
    """The simulated ad system (``osmf simulate``)."""

    world: Path | None = Field(None, description="World YAML; default: example world A.")
    rate: float = Field(500.0, gt=0, description="Impressions per second.")
    duration_s: float = Field(20.0, gt=0, description="Seconds of simulated traffic.")
    seed: int = Field(0, description="Same seed, same events.")
    creatives_per_product: int = Field(4, ge=1, le=64, description="Random prompts shown per product.")


class RenderSettings(BaseModel):
    """Which renderer turns a creative prompt into pixels, and at what size."""

    kind: Literal["template", "diffusion"] = Field(
        "template",
        description="template (embedded default, Pillow) or diffusion (Stable Diffusion + ControlNet, production).",
    )
    size: int = Field(256, ge=16, le=2048, description="Side of the square ad image in pixels.")
    checkpoint: Path | None = Field(
        None,
        description="diffusion: local directory of an SD1.5-style pipeline (diffusers layout, model_index.json).",
    )
    controlnet: Path | None = Field(
        None, description="diffusion: local ControlNet (canny) directory; default <checkpoint>/controlnet."
    )
    steps: int = Field(20, ge=1, le=200, description="diffusion: denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="diffusion: classifier-free guidance scale.")
    controlnet_scale: float = Field(1.0, ge=0.0, le=5.0, description="diffusion: weight of the canny control.")
    device: str = Field("cpu", description="diffusion: torch device, e.g. cpu or cuda.")
    seed: int = Field(0, description="diffusion: seed of the initial noise (same prompt and seed, same image).")

    @model_validator(mode="after")
    def _diffusion_needs_checkpoint(self) -> RenderSettings:
        if self.kind == "diffusion" and self.checkpoint is None:
            raise ValueError("kind 'diffusion' needs render.checkpoint, the local pipeline directory")
        return self


class ModelSettings(BaseModel):
    """The G-MLLM: a tiny LLaVA built from config (embedded) or a local LLaVA-style checkpoint (production)."""

    base_checkpoint: Path | None = Field(
        None,
        description="Local LLaVA-style checkpoint directory (safetensors); None builds the tiny model below.",
    )
    vocab_size: int = Field(1024, ge=300, le=65536, description="Byte-level BPE vocabulary trained offline.")
    hidden_size: int = Field(128, ge=16, le=8192, description="Language model width.")
    layers: int = Field(4, ge=1, le=64, description="Language model decoder layers.")
    heads: int = Field(4, ge=1, le=64, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int = Field(384, ge=16, le=32768, description="Language model MLP width.")
    vision_hidden_size: int = Field(64, ge=16, le=4096, description="Vision tower (CLIP-style) width.")
    vision_layers: int = Field(2, ge=1, le=48, description="Vision tower layers.")
    image_size: int = Field(32, ge=8, le=1024, description="Side the product image is resized to.")
    patch_size: int = Field(8, ge=2, le=64, description="Vision patch side; (image_size/patch_size)^2 image tokens.")
    max_positions: int = Field(512, ge=64, le=32768, description="Longest sequence (tokens) the model takes.")

    @model_validator(mode="after")
    def _shapes(self) -> ModelSettings:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads {self.heads}")
        if self.vision_hidden_size % 4:
            raise ValueError(f"vision_hidden_size {self.vision_hidden_size} must be a multiple of 4 (its heads)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        return self


TaskName = Literal["group", "click", "product", "generate"]


QUICK_MODEL: dict[str, int] = {
    "vocab_size": 600, "hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128,
    "vision_hidden_size": 32, "vision_layers": 1, "image_size": 16, "patch_size": 8,
}
"""The G-MLLM of the quick benchmarks, the experiment's default and tests: ~0.15M parameters, a step in milliseconds."""


class PretrainSettings(BaseModel):
    """Pre-training on logged traffic (``osmf learner pretrain``)."""

    impressions: int = Field(300_000, ge=100, description="Simulated impressions logged when pre-training on a world.")
    creatives_per_product: int = Field(16, ge=1, le=256, description="Random creatives per product in that log.")
    traffic_seed: int = Field(0, description="Seed of the simulated log.")
    steps: int = Field(1400, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, le=4096, description="Examples per step (one task per step).")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak AdamW learning rate (cosine decay).")
    warmup_steps: int = Field(60, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay.")
    tasks: dict[TaskName, float] = Field(
        default_factory=lambda: {"group": 0.05, "click": 0.45, "product": 0.05, "generate": 0.45},
        description="Task mixture: share of steps spent on each task (normalised; 0 switches one off).",
    )
    generate_sharpness: float = Field(
        3.0,
        ge=0,
        le=20,
        description="Prompt-generation targets: logged creatives drawn with weight impressions x lift^sharpness "
        "(lift: smoothed CTR in the group / group CTR); 0 copies the logged mix, higher keeps the winners.",
    )
    click_prior_clicks: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="Click-task targets: each cell's CTR shrunk towards what the group's per-attribute lifts "
        "predict, with this many pseudo-clicks (0: the raw logged clicks).",
    )
    feature_snapshots: int = Field(
        4, ge=1, le=32, description="Group features read at this many points of the log (data augmentation)."
    )
    seed: int = Field(0, description="Seeds the model's initial weights and the example order.")
    log_every: int = Field(20, ge=1, description="Steps between loss log lines / plot points.")

    @field_validator("tasks")
    @classmethod
    def _mixture(cls, value: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("task weights must be >= 0 and not all 0")
        return value


class GenerationSettings(BaseModel):
    """How creative prompts are sampled from the G-MLLM."""

    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    candidates: int = Field(8, ge=1, le=256, description="Prompts sampled per (group, product).")
    rerank: bool = Field(
        True, description="Keep the candidate the model's own click prediction scores highest for the group."
    )
    constrained: bool = Field(True, description="Only allow tokens that keep the text a valid prompt prefix.")
    max_new_tokens: int = Field(64, ge=8, le=1024, description="Longest prompt in tokens.")


class DPOSettings(BaseModel):
    """Group-DPO training of one learner round (``learner/dpo/``)."""

    beta: float = Field(0.2, gt=0, le=10.0, description="DPO temperature β of the implicit reward.")
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="AdamW learning rate (constant after warm-up).")
    epochs: float = Field(2.0, gt=0, le=100.0, description="Passes over the round's training pairs.")
    max_steps: int = Field(
        400, ge=1, description="At most this many optimizer steps per round (caps rounds on a large buffer)."
    )
    min_steps: int = Field(
        60, ge=1, description="At least this many optimizer steps per round, however few its pairs (max_steps still "
        "caps it): the KL that holds groups without pairs pulls only once they have drifted, so a fit of a few "
        "steps moves them unchecked (measured on world A, 10 lipstick pairs: 3 steps cost drill/g1 12 % of its "
        "CTR, 60 steps held every drill group within 1 %; docs/learner.md)."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Pairs per optimizer step.")
    group_weighting: Literal["inverse_share", "uniform"] = Field(
        "inverse_share", description="inverse_share: every group gets the same weight; uniform: pairs alike."
    )
    group_weight_power: float = Field(1.0, ge=0, le=4.0, description="Exponent of the inverse group share.")
    group_weight_prior: float = Field(
        50.0, ge=0, description="Pseudo-pairs added to each group's pair count before inverting it: groups with "
        "few pairs are up-weighted less, so a handful of pairs is not drawn over and over (0: every group gets "
        "the same total weight). 50 was measured best for the worst group on example world B (docs/learner.md)."
    )
    sft_weight: float = Field(
        0.0, ge=0, le=10.0, description="Weight of TRL's SFT term on winners (0: pure sigmoid DPO loss)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "bco_pair", "nca_pair"] = Field(
        "sigmoid", description="TRL's DPO loss type (the SFT term is added beside it when its weight is above 0)."
    )
    preserve: Literal["mirror", "sft", "both", "kl", "mirror_kl", "off"] = Field(
        "mirror_kl", description="How a fit protects groups without pairs: mirror: other groups' pairs of its "
        "category, both ways, under its prefix (holds its preference between the creatives the fit moves where "
        "the incumbent has it); sft: the incumbent's own creatives for it as SFT-only rows (chosen == rejected); "
        "both: mirror and sft; kl: a token-level KL to the incumbent on those creatives, every step "
        "(preserve_kl_weight); mirror_kl: mirror and kl; off."
    )
    preserve_scope: Literal["quiet", "all"] = Field(
        "quiet", description="Which groups are protected: quiet (those without pairs of their own) or all (every "
        "group: mirrored pairs of the other groups of its category, anchors on its own creatives)."
    )
    preserve_weight: float = Field(
        5.0, ge=0, le=100.0, description="preserve=mirror/both: the sampling weight of a mirrored pair against a "
        "real one (its restoring force is second order in the drift, so it needs more weight than a real pair)."
    )
    preserve_sft_weight: float = Field(
        1.0, ge=0, le=10.0, description="preserve=sft/both: the SFT weight when anchor rows train (at least; TRL has "
        "one SFT weight for all rows, so winners get it too); 0 turns anchors off."
    )
    preserve_kl_weight: float = Field(
        10.0, ge=0, le=1000.0, description="preserve=kl/mirror_kl: the weight of the anchors' KL term beside the "
        "DPO loss."
    )
    anchor_products: int = Field(
        3, ge=1, le=1000, description="preserve=sft/both/kl/mirror_kl, a learner round: products of its category per group "
        "without pairs (any category) on which the incumbent's own samples (loop.onpolicy_candidates) are anchored."
    )
    seed: int = Field(0, description="Seeds pair order and dropout.")


class LoopSettings(BaseModel):
    """``osmf learner run``: when to train, what to keep, when to promote, where versions go."""

    model_repository: Path | None = Field(
        None, description="Model repository Triton reads (<repo>/gmllm/<n>/); default <data_dir>/models."
    )
    model_name: str = Field("gmllm", pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$", description="Model name in it.")
    min_new_pairs: int = Field(200, ge=1, description="Train once this many new pairs have arrived ...")
    max_wait_s: float = Field(600.0, gt=0, description="... or this long after the last round, with any new pair.")
    buffer_capacity: int = Field(20_000, ge=1, description="Most preference pairs kept (oldest dropped first).")
    half_life_s: float = Field(3600.0, gt=0, description="Recency weighting: a pair this much older weighs half.")
    heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of pairs (fixed by a hash of each pair) held out for the gate."
    )
    accuracy_tolerance: float = Field(
        0.05, ge=0, le=1, description="Gate: most held-out preference accuracy a group may lose."
    )
    ctr_tolerance: float = Field(0.002, ge=0, le=1, description="Gate: most simulated CTR a group may lose.")
    min_gain: float = Field(0.0, ge=0, le=1, description="Gate: the overall figure must rise by more than this.")
    min_group_pairs: int = Field(
        10, ge=1, description="Gate: a group's held-out accuracy can block promotion only from this many pairs on."
    )
    ctr_products_per_group: int = Field(
        4, ge=1, le=1000, description="Gate with a world: products per group whose served creatives are simulated."
    )
    ctr_served: Literal["slate", "rerank"] = Field(
        "slate", description="Gate with a world: what a group's CTR is of: slate (the mean of the creatives the "
        "version samples, what the creative client's Thompson sampling serves from) or rerank (the one creative "
        "its click answer picks of them)."
    )
    ctr_estimate: Literal["resample", "reweight"] = Field(
        "resample", description="Gate with a world, ctr_served=slate: resample (each version's own samples, the "
        "same seeds) or reweight (the candidate judged on the incumbent's samples by importance weights "
        "p_candidate/p_incumbent: off-policy evaluation, paired sample by sample)."
    )
    ctr_draws_per_product: int = Field(
        2, ge=1, le=64, description="Gate with a world: served creatives drawn per judged product (each from its own "
        "candidates; the same seeds for both versions, compared draw by draw)."
    )
    ctr_interval_z: float = Field(
        2.0, ge=0, le=10.0, description="Gate: a group may not lose more CTR than this many standard errors of the "
        "difference (over its judged products), nor more than ctr_tolerance; 0: ctr_tolerance only."
    )
    min_ctr_drop: float = Field(
        0.0005, ge=0, le=1, description="Gate: the interval never allows less than this drop (absolute)."
    )
    onpolicy_candidates: int = Field(
        8, ge=2, le=256, description="On-policy rounds: creatives the live model samples per (group, product)."
    )
    onpolicy_temperature: float = Field(
        1.0, gt=0, le=5.0, description="On-policy rounds: sampling temperature of those creatives."
    )
    onpolicy_impressions: int = Field(
        2000, ge=1, description="On-policy rounds (benchmark): impressions each sampled creative gets in its group."
    )
    onpolicy_products: int = Field(
        6, ge=1, le=1000, description="On-policy rounds (benchmark): products per group that get slates."
    )
    onpolicy_replay: bool = Field(
        False, description="On-policy rounds (benchmark): keep the pairs of earlier rounds after their model went "
        "live, as the learner's replay buffer does in production (false: a round fits on the live model's own "
        "pairs only)."
    )
    pair_min_lift: float = Field(
        0.0, ge=0, le=100.0, description="On-policy pairs: the winner's observed CTR must be at least (1 + this) "
        "times the loser's (a margin beside the miner's confidence)."
    )
    pair_best_winner: bool = Field(
        False, description="On-policy pairs: keep per (group, product) only the pairs of the slate's best winner."
    )
    repair_fits: int = Field(
        0, ge=0, le=5, description="Gate (promotion=model): when a candidate is refused because groups regress, refit from the "
        "incumbent up to this many times without those groups' pairs (they become groups without evidence, held "
        "by dpo.preserve) and gate again; 0: off."
    )
    lineage: Literal["version", "category", "group"] = Field(
        "group", description="promotion=group: what one fit covers: one group (group: no group's pairs move "
        "another's; up to one loaded version per group, one fit of at least dpo.min_steps per group with pairs), "
        "the groups of one category (category: a fit on one category's pairs cannot move another's groups), or "
        "every group one version serves (version: fewest fits and loaded versions). Measured on seven worlds "
        "(docs/learner.md, 'One fit per group'): group raised the oracle fraction to 0.63-0.72 against 0.50-0.66 "
        "(category) and 0.31-0.49 (version)."
    )
    promotion: Literal["model", "group"] = Field(
        "group", description="Gate: model, a candidate goes live for every group or for none; group, it goes live "
        "for each group it raises without regressing (the others keep the version they had, and their next "
        "round fits from it): one group's regression no longer holds back the others' gains."
    )


class LearnerSettings(BaseModel):
    """The learner: G-MLLM architecture, pre-training and generation."""

    output_dir: Path | None = Field(
        None, description="Where `osmf learner pretrain` writes its run; default <data_dir>/learner/pretrain."
    )
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="Torch CPU threads for training and inference. 1 for the tiny model: on 2 shared cores two "
        "threads were measured 10-50x slower under load (OpenMP waits); raise it for a large model.",
    )
    metrics_port: int = Field(
        9120, ge=0, le=65535, description="Prometheus metrics port of `osmf learner run` on 127.0.0.1; 0 = off."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the learner's metrics bind to (0.0.0.0 in a container, with security.http_token)."
    )
    model: ModelSettings = ModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    generation: GenerationSettings = GenerationSettings()
    dpo: DPOSettings = DPOSettings()
    loop: LoopSettings = LoopSettings()


class FeaturesSettings(BaseModel):
    """The Feast feature store (``features/``) and the worker's streaming push into it."""

    enabled: bool = Field(True, description="The stream worker pushes group, user and product features.")
    project: str = Field(
        "osmf",
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,62}$",
        description="Feast project name (letters, digits, underscores; it prefixes every online key).",
    )
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: a file under data_dir (embedded); redis: a Redis server (production)."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis of the online store: redis://[:password@]host:port[/db] or Feast's 'host:port,db=0'.",
    )
    registry_url: SecretStr | None = Field(
        None,
        description="Feast SQL registry as an SQLAlchemy URL (e.g. postgresql+psycopg://feast:pw@postgres:5432/feast), "
        "shared by every machine; None: a file registry under data_dir (one machine only).",
    )
    push_batch_rows: int = Field(1000, ge=1, le=100_000, description="A push is flushed once this many rows wait.")
    push_flush_s: float = Field(0.1, gt=0, le=60, description="Longest time a row waits before its push.")
    push_queue_rows: int = Field(
        200_000, ge=1, description="Most rows waiting to be pushed; past it new rows are dropped and counted."
    )
    push_retries: int = Field(3, ge=0, le=20, description="Retries of a failed push before its rows are dropped.")
    push_retry_backoff_s: float = Field(0.2, ge=0, le=60, description="Wait before the first retry (doubles).")
    offline_flush_s: float = Field(
        10.0, gt=0, description="Pushed rows are appended to the parquet history this often (one part file)."
    )
    top_prompts: int = Field(5, ge=1, le=100, description="Top prompts kept per group.")
    embed_titles: bool = Field(True, description="Embed product titles with all-MiniLM-L6-v2 (loaded offline).")
    read_cache: bool = Field(True, description="Readers cache online rows until the next push.")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        _redis_connection_string(value)
        return value

    @property
    def redis_connection_string(self) -> str:
        """The Redis address in Feast's ``host:port,db=N[,password=...]`` form."""
        return _redis_connection_string(self.redis_url)


def _redis_connection_string(url: str) -> str:
    """``redis://[user:password@]host:port[/db]`` (or Feast's own form) as Feast's connection string.

    >>> _redis_connection_string("redis://:pw@10.0.0.5:6380/2")
    '10.0.0.5:6380,db=2,password=pw'
    >>> _redis_connection_string("127.0.0.1:6379,db=1")
    '127.0.0.1:6379,db=1'
    """
    from urllib.parse import unquote, urlsplit

    text = url.strip()
    fix = "write redis://host:port/db (e.g. redis://127.0.0.1:6379/0) or Feast's 'host:port,db=0'"
    if "://" not in text:
        host_port = text.split(",", 1)[0]
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r} has no host:port; {fix}")
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme {parts.scheme!r} is not redis://; {fix}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port; {fix}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host; {fix}")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"database {db_text!r} is not a number; {fix}")
    out = f"{parts.hostname}:{port},db={int(db_text)}"
    if parts.password:
        out += f",password={unquote(parts.password)}"
    if parts.scheme == "rediss":
        out += ",ssl=true"
    return out


class ServingSettings(BaseModel):
    """Triton serving (``osmf serve``) and the creative client for ad systems (``serving/``)."""

    host: str = Field("127.0.0.1", description="Address tritonserver binds its HTTP, gRPC and metrics ports to.")
    http_port: int = Field(18000, ge=1, le=65535, description="Triton HTTP/REST port.")
    grpc_port: int = Field(18001, ge=1, le=65535, description="Triton gRPC port.")
    metrics_port: int = Field(18002, ge=1, le=65535, description="Triton's own Prometheus metrics port.")
    client_metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus port of the creative client's own metrics; 0 = not served."
    )
    protocol: Literal["http", "grpc"] = Field("grpc", description="Protocol the creative client talks to Triton.")
    env_dir: Path = Field(
        Path(".venv-triton"),
        description="Triton backend environment (numpy<2, torch, transformers; `make .venv-triton`); relative "
        "paths are taken from the project root.",
    )
    repository: Path | None = Field(
        None, description="Generated Triton model repository; default <data_dir>/triton/repository."
    )
    version_policy: Literal["live_and_previous", "all", "latest"] = Field(
        "live_and_previous",
        description="gmllm versions kept loaded: live_and_previous (rollback is a switch), all, or latest only.",
    )
    slate_size: int = Field(4, ge=1, le=64, description="K: creatives per (group, product) slate.")
    prior_impressions: float = Field(
        20.0, ge=0, description="Thompson sampling: pseudo-impressions at the group's CTR added to every creative."
    )
    max_new_tokens: int = Field(64, ge=8, le=1024, description="Longest generated prompt in tokens.")
    temperature: float = Field(0.9, ge=0.0, le=5.0, description="Sampling temperature of slate generation.")
    instances: int = Field(1, ge=1, le=64, description="Triton instances of each python model (CPU: 1 per core).")
    start_timeout_s: float = Field(120.0, gt=0, description="How long `serve start` waits for Triton's readiness.")
    load_timeout_s: float = Field(120.0, gt=0, description="How long loading one model version may take.")
    request_timeout_s: float = Field(30.0, gt=0, description="Client: timeout of one generation request.")
    retries: int = Field(2, ge=0, le=10, description="Client: retries of a failed generation request.")
    retry_backoff_s: float = Field(0.2, ge=0, le=60, description="Client: wait before the first retry (doubles).")
    watch_interval_s: float = Field(2.0, gt=0, description="How often the watcher looks for new versions.")
    pregenerate_workers: int = Field(2, ge=1, le=64, description="Background slate generations in flight.")
    cache_dir: Path | None = Field(
        None, description="Content-addressed creative cache (PNG + index); default <data_dir>/serving/cache."
    )
    response_cache: bool = Field(
        False, description="Enable Triton's local response cache on `creative` (measured: see docs/serving.md)."
    )


class DashboardSettings(BaseModel):
    """The read-only CTR drift dashboard (``osmf dashboard``, docs/dashboard.md)."""

    host: str = Field("127.0.0.1", description="Address the dashboard listens on (loopback: only this machine).")
    port: int = Field(8050, ge=1, le=65535, description="HTTP port of the dashboard page.")
    refresh_s: float = Field(5.0, ge=0.5, le=3600, description="Seconds between data refreshes of the page.")
    ctr_bin_s: float = Field(
        30.0, ge=1.0, le=86_400, description="Width of the time bins CTR and traffic share are drawn over."
    )
    thumbnails_per_group: int = Field(
        3, ge=1, le=16, description="Creatives shown per group (those it was served most recently)."
    )
    scrape_timeout_s: float = Field(
        1.0, gt=0, le=30, description="Timeout of one read of a component's /metrics (stream lag)."
    )


class KafkaSecurity(BaseModel):
    """How every Kafka client (producers, Faust, learner, tools) authenticates and encrypts (docs/deployment.md)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol; PLAINTEXT for the embedded broker."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (protocol SASL_PLAINTEXT or SASL_SSL)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged or printed).")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates (PEM).")
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    ssl_check_hostname: bool = Field(True, description="Check that a broker's certificate names its host.")

    @model_validator(mode="after")
    def _complete(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL_") and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(
                f"protocol {self.protocol} needs sasl_username and sasl_password; set OSMF_SECURITY__KAFKA__SASL_USERNAME "
                "and OSMF_SECURITY__KAFKA__SASL_PASSWORD"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS); set both or neither")
        return self


class SecuritySettings(BaseModel):
    """Security of the project's network endpoints (infra/security.py, docs/deployment.md)."""

    http_token: SecretStr | None = Field(
        None,
        description="Bearer token every HTTP endpoint of the project asks for (metrics, dashboard); None: open "
        "(they bind 127.0.0.1 by default).",
    )
    kafka: KafkaSecurity = KafkaSecurity()


class Settings(BaseSettings):
    """All of OSMF's configuration in one object."""

    model_config = SettingsConfigDict(
        env_prefix="OSMF_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("data"), description="Pid, log, store and model files live here.")
    kafka_bootstrap: str | None = Field(
        None, description="External Kafka bootstrap servers; when set Tansu is never started."
    )
    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    streams: StreamsSettings = StreamsSettings()
    producer: ProducerSettings = ProducerSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    render: RenderSettings = RenderSettings()
    learner: LearnerSettings = LearnerSettings()
    features: FeaturesSettings = FeaturesSettings()
    serving: ServingSettings = ServingSettings()
    dashboard: DashboardSettings = DashboardSettings()
    security: SecuritySettings = SecuritySettings()

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @property
    def bootstrap_servers(self) -> str:
        """Where Kafka clients connect: the external cluster or the embedded broker."""
        return self.kafka_bootstrap or f"{self.broker.host}:{self.broker.port}"

    @property
    def uses_external_kafka(self) -> bool:
        """True when an external cluster is configured and Tansu must not start."""
        return self.kafka_bootstrap is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV_VAR)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_existing_file(config_file)))
        return tuple(sources)


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{CONFIG_ENV_VAR}={path}: no such file; point it at a YAML settings file or unset it")
    return file


class ConfigError(ValueError):
    """A settings file or variable is invalid; the message names the field and the fix."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from defaults, the YAML file, the environment and ``overrides``.

    Raises :class:`ConfigError` with a one-line message naming the bad field.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source="settings")) from None


def describe_validation_error(exc: "ValidationError", source: str) -> str:  # noqa: F821
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = err.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {field}: {err['msg']}{got_text}")
    return "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, loaded once."""
    return load_settings()
