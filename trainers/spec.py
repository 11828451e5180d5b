"""The run spec: one pydantic model shared by the launcher and the workers.

This module must stay importable without torch, ray or deepspeed: `launch validate`
and `launch schema` import it on a laptop. Field docstrings become the CLI help and
the JSON Schema (`launch schema`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from trainers.esft_spec import EsftSpec
from trainers.ppo_spec import PpoSpec
from trainers.spec_base import Strict
from trainers.tune_spec import TuneSpec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$")


# model.peft.quantize with ZeRO-3 (the shorthand here; a DeepSpeed JSON: trainers.quantize_check).
QUANTIZE_ZERO3 = ("model.peft.quantize 4bit works with ZeRO stages 0-2, not 3: transformers loads a 4-bit model "
                  "whole on every rank (never partitioned at load), and ZeRO-3's gathering of packed 4-bit "
                  "weights across ranks is untested here; the base is frozen, so stage 2 already shards all "
                  "that trains")


class LoraSpec(Strict):
    """Parameter-efficient fine-tuning with LoRA adapters (peft)."""

    type: Literal["lora"] = "lora"
    """`lora` trains low-rank adapters on frozen base weights."""
    r: int = Field(16, gt=0)
    """Rank of the adapter matrices."""
    alpha: int = Field(32, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Module names (or `all-linear`) to wrap with adapters."""
    quantize: Literal["4bit"] | None = None
    """`4bit`: QLoRA, the frozen base loaded in bitsandbytes NF4 with double quantization
    (computing in the training precision: bfloat16 on GPUs, float32 on CPUs) and the
    adapters trained on top; about a quarter of the base's memory. ZeRO stages 0-2 only.
    The export merges the adapter into the base loaded unquantized. Needs `bitsandbytes`
    (in `llmlaunch[train]`)."""


class ModelSpec(Strict):
    path: str = Field(min_length=1)
    """Hugging Face hub id, a local directory, or `s3://bucket/prefix` of a saved model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Training precision. `auto`: bfloat16 on GPUs, float32 on CPUs."""
    peft: LoraSpec | None = None
    """Adapters to train instead of all weights; omit for full fine-tuning."""
    freeze: list[str] = []
    """Regular expressions of parameter names to keep frozen (e.g. `embed_tokens`)."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the model."""
    init_from: str | None = None
    """Start from an earlier run's exported model (transfer learning): its weights and its
    tokenizer (with the chat template it was trained with). A run name (in this
    `checkpoint.storage`: its newest finished run), or a run's directory
    (`s3://.../<name>/<run-id>` or a local path) of a finished run. A LoRA parent's `model/`
    is already base plus merged adapter. A checkpoint (`.../checkpoints/step_N`) is refused:
    it holds DeepSpeed's training state, not a Hugging Face model; continue it with
    `checkpoint.resume`, or start from its finished run. `path` stays the base the lineage
    began with; the run's `spec.yaml` names the parent's model instead and records the
    parent under `lineage`."""

    @field_validator("freeze")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
        return v

    @field_validator("init_from")
    @classmethod
    def _run_reference(cls, v: str | None) -> str | None:
        if v is not None and "/" not in v and not NAME_RE.match(v):
            raise ValueError("use a run name (lowercase letters, digits and '-'), a run URI "
                             "(s3://bucket/prefix/<name>/<run-id>) or a run directory")
        return v


CHAT_ROLES = ("system", "user", "assistant", "tool")
# Formats whose rows are (or may be) conversations rendered with a chat template.
CHAT_FORMATS = ("messages", "sharegpt", "prompt_completion")
BUILTIN_CHAT_TEMPLATES = ("chatml", "llama3")  # their text: trainers.chat_templates


class DatasetSpec(Strict):
    path: str = Field(min_length=1)
    """A `.jsonl`/`.json`/`.parquet` file or directory, local or `s3://`, or a hub dataset id."""
    format: Literal["text", "alpaca", "messages", "sharegpt", "prompt_completion", "preference", "ranking",
                    "prompt"] = "text"
    """`text`: raw text (`text_field`); `alpaca`: instruction/input/output; `messages`: chat turns;
    `sharegpt`: `{from, value}` turns (`conversations_field`, `roles`); `prompt_completion`: a
    `prompt` and a `completion`, both strings or both lists of chat turns (TRL's convention),
    trained on the completion only; `preference`: a `prompt`, a `chosen` and a `rejected`
    response, strings or lists of chat turns, or without `prompt` two whole conversations whose
    shared beginning is the prompt (Anthropic HH's `\\n\\nHuman: ... \\n\\nAssistant:` text too);
    `ranking`: a `prompt` and its `responses`, ordered by `ranking` (response indices, best
    first) or `scores` (higher is better, ties allowed); `prompt`: prompts alone (`prompt_field`,
    a string or a list of chat turns ending with a user turn), for `ppo`, whose policy writes
    the responses."""
    text_field: str = "text"
    """Column holding raw text (format `text`)."""
    messages_field: str = "messages"
    """Column holding a list of `{role, content}` turns (format `messages`)."""
    conversations_field: str = "conversations"
    """Column holding a list of `{from, value}` turns (format `sharegpt`)."""
    roles: dict[str, Literal[CHAT_ROLES]] = {
        "human": "user", "gpt": "assistant", "system": "system"}
    """ShareGPT `from` names and the chat roles they stand for (format `sharegpt`); a turn
    whose `from` is not listed is an error naming its file and line."""
    prompt_field: str = "prompt"
    """Column holding the prompt (formats `prompt_completion`, `preference`, `ranking`)."""
    completion_field: str = "completion"
    """Column holding the completion (format `prompt_completion`)."""
    loss_on: Literal["assistant", "last_turn", "all"] | None = None
    """Which tokens of chat data train (formats `messages`, `sharegpt`, `prompt_completion`):
    `assistant` (the default) every assistant turn (of the completion, for
    `prompt_completion`); `last_turn` only the final assistant turn; `all` every token,
    prompts and template markup included. Under `assistant`/`last_turn` a turn trains what
    its template's `{% generation %}` tags mark or, without tags, all the template writes
    for it after its header (with ChatML, `<|im_end|>` and the newline after it); string `prompt_completion`
    trains the completion and EOS under both."""
    split: str = "train"
    """Split to read when `path` is a hub dataset id."""
    chosen_field: str = "chosen"
    """Column holding the preferred response (format `preference`)."""
    rejected_field: str = "rejected"
    """Column holding the dispreferred response (format `preference`)."""
    responses_field: str = "responses"
    """Column holding the list of responses to one prompt (format `ranking`)."""
    ranking_field: str = "ranking"
    """Column holding the response indices from best to worst (format `ranking`)."""
    scores_field: str = "scores"
    """Column holding one score per response, higher is better, ties allowed (format `ranking`)."""
    margin_field: str | None = None
    """Column holding the margin a row's better response should win by, for reward modeling
    (formats `preference`, `ranking`: every pair of the row); none when unset."""

    @field_validator("loss_on")
    @classmethod
    def _loss_on_needs_chat(cls, v: str | None, info: ValidationInfo) -> str | None:
        # text trains every token and alpaca its response: a choice there would be ignored.
        fmt = info.data.get("format")  # absent when the format itself was invalid
        if v is not None and fmt is not None and fmt not in CHAT_FORMATS:
            raise ValueError(f"applies to formats {', '.join(CHAT_FORMATS)}; format {fmt} "
                             f"{'trains every token' if fmt == 'text' else 'trains the response'}: remove it")
        return v

    @model_validator(mode="after")
    def _txt_is_raw_text(self) -> "DatasetSpec":
        if self.path.endswith(".txt") and (self.format != "text" or self.text_field != "text"):
            raise ValueError("a .txt file is raw text: use format: text (its blank-line separated documents are "
                             "the rows, in `text`)")
        return self

    @property
    def loss(self) -> str:
        """`loss_on`, with its default."""
        return self.loss_on or "assistant"


class DataSpec(Strict):
    train: list[DatasetSpec] = Field(min_length=1)
    """Training datasets; rows of all of them are concatenated."""
    eval: list[DatasetSpec] = []
    """Held-out datasets for eval loss; see also `eval_fraction`."""
    eval_fraction: float = Field(0.0, ge=0, lt=0.5)
    """Fraction of the training rows held out for evaluation when `eval` is empty."""
    max_seq_len: int = Field(2048, ge=8)
    """Tokens per training sequence; longer examples are truncated (or split when packing)."""
    packing: bool = True
    """Concatenate examples into full `max_seq_len` sequences instead of padding each.
    Packed examples do not attend to each other (positions restart with each); an example
    cut by the end of a sequence goes on in the next one as an example of its own."""
    shuffle: bool = True
    """Shuffle the tokenized rows once (seeded by `train.seed`)."""
    chat_template: str | None = Field(None, min_length=1)
    """Chat template for chat data, instead of the tokenizer's own: a built-in (`chatml`,
    `llama3`), a jinja file (relative to the spec), or the template text itself. Required
    when the tokenizer has none. The exported model's tokenizer carries it."""

    streaming: bool = False
    """Stream the training data through Ray Data as it trains instead of preparing it all
    before the first step: for corpora larger than the cluster's memory. Needs
    `train.max_steps` (the rows are not counted up front) and `data.eval` rather than
    `eval_fraction`; shuffling is then local (`shuffle_buffer`), and a resumed run reads the
    stream again up to where it was."""
    stream_memory_mb: int | None = Field(None, gt=0)
    """With `streaming`: object store memory (MB) the stream may hold at once, read ahead of
    the workers (Ray Data's resource limit). Default: Ray Data's share of the cluster's."""
    shuffle_buffer: int = Field(1000, gt=0)
    """Rows in each worker's local shuffle buffer when `streaming` (and `shuffle`)."""
    replay: list[DatasetSpec] = []
    """A general corpus mixed into the training data to limit forgetting (continued
    pre-training, domain fine-tuning): sampled (seeded; repeated if too small) to
    `replay_weight` of the training sequences. Not with `streaming`."""
    replay_weight: float = Field(0.1, gt=0, lt=1)
    """The share of the training sequences that come from `replay`."""
    on_bad_rows: Literal["skip", "fail"] = "skip"
    """A row that cannot be trained on (a missing field, a wrong type, an empty conversation,
    a role the template rejects): `skip` leaves it out and the job lists each one by file and
    line; `fail` stops the job at the first, naming its file and line. Either way a file
    whose first rows are all bad stops the run before it starts (its `format` is wrong)."""
    max_bad_rows: int = Field(100, ge=0)
    """With `on_bad_rows: skip`: more bad rows than this over all datasets fail the run."""

    @model_validator(mode="after")
    def _streaming_limits(self) -> "DataSpec":
        if self.streaming and self.eval_fraction:
            raise ValueError("data.eval_fraction splits counted rows: with data.streaming name held-out data in "
                             "data.eval")
        if self.streaming and self.replay:
            raise ValueError("data.replay is sampled from counted rows: with data.streaming add the general corpus "
                             "to data.train instead")
        return self

    def datasets(self) -> list[tuple[str, DatasetSpec]]:
        """(YAML path, dataset) of every dataset the run reads."""
        return [(f"data.{split}[{i}]", ds) for split in ("train", "eval", "replay")
                for i, ds in enumerate(getattr(self, split))]


class TaskSpec(Strict):
    """One task of a multi-task run: its data, its share of the mixture, its own eval set."""

    train: list[DatasetSpec] = Field(min_length=1)
    """The task's training datasets (any format); rows of all of them are concatenated."""
    eval: list[DatasetSpec] = []
    """The task's held-out datasets; see also `eval_fraction`."""
    eval_fraction: float = Field(0.0, ge=0, lt=0.5)
    """Fraction of the task's training rows held out for its evaluation when `eval` is empty."""
    weight: float = Field(1.0, gt=0)
    """The task's share of the mixture (`mixing: weights`; normalised over the tasks)."""


class MultitaskDataSpec(DataSpec):
    train: list[DatasetSpec] = []
    """Unused by multitask: each task lists its own under `tasks`."""
    tasks: dict[str, TaskSpec] = Field(min_length=2)
    """The tasks by name (lowercase letters, digits, `-` and `_`); each packs on its own, so
    no training sequence mixes two tasks."""
    mixing: Literal["weights", "temperature"] = "weights"
    """How much of each task the mixture holds: `weights` in proportion to the tasks'
    `weight`; `temperature`, p_i proportional to n_i^(1/T) over the tasks' sequence counts
    n_i (T=1: as the data is; larger T flattens toward equal shares)."""
    temperature: float = Field(1.0, gt=0)
    """T of `mixing: temperature`."""
    mixture_rows: int | None = Field(None, gt=0)
    """Training sequences in one epoch of the mixture. Default: all the tasks' sequences
    together; a task whose share is more than its data is repeated, one with less is sampled."""

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,40}", name):
                raise ValueError(f"task name {name!r}: use lowercase letters, digits, '-' and '_' (metric names carry it)")
        return v

    @model_validator(mode="after")
    def _no_top_level_datasets(self) -> "MultitaskDataSpec":
        if self.train or self.eval or self.eval_fraction or self.replay:
            raise ValueError("multitask reads each task's datasets: move data.train / data.eval / data.eval_fraction "
                             "under data.tasks.<name> (data.replay: a task of its own)")
        if self.streaming:
            raise ValueError("multitask counts each task's sequences to mix them: data.streaming is for sft/pretrain")
        return self

    def datasets(self) -> list[tuple[str, DatasetSpec]]:
        return [(f"data.tasks.{name}.{split}[{i}]", ds) for name, task in self.tasks.items()
                for split in ("train", "eval") for i, ds in enumerate(getattr(task, split))]

    def has_eval(self) -> bool:
        return any(t.eval or t.eval_fraction > 0 for t in self.tasks.values())


class ZeroSpec(Strict):
    """DeepSpeed shorthand: a ZeRO stage and CPU offload."""

    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 adds gradients, 3 adds parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-Infinity; stage 3 only)."""

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> "ZeroSpec":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3")
        return self


class EarlyStoppingSpec(Strict):
    """Stop when an eval metric stops improving."""

    metric: str = Field("eval_loss", pattern=r"^eval_")
    """The eval metric to watch (`eval_loss`, a task's `eval_loss/<task>`, ...)."""
    mode: Literal["min", "max"] = "min"
    """`min`: lower is better; `max`: higher is better."""
    patience: int = Field(3, gt=0)
    """Evaluations in a row without improvement before the run stops."""
    min_delta: float = Field(0.0, ge=0)
    """An evaluation improves only by more than this."""


class FewshotSpec(Strict):
    """Few-shot accuracy on held-out questions, before training and after: what the fine-tune
    bought over k-shot prompting (trainers.fewshot)."""

    path: str = Field(min_length=1)
    """Held-out questions: a `.jsonl`/`.json`/`.parquet` file or a directory of them, local or
    `s3://`. Each row has the question and its answer (and the choices, mode `choice`)."""
    pool: str | None = Field(None, min_length=1)
    """Where the k shots are drawn from (same formats and fields). Default: the other rows of
    `path`; a row is never a shot in its own prompt."""
    k: int = Field(3, ge=0)
    """Solved examples written before each question (0: zero-shot)."""
    mode: Literal["generate", "choice"] = "generate"
    """`generate`: greedy generation; correct when its first line, stripped, equals the
    answer (stripped). `choice`: multiple choice; the row's `choices_field` lists the choices
    and its answer is the index of the right one or its text; the model picks the choice whose
    tokens have the highest log-likelihood after the prompt (see `normalize`)."""
    normalize: bool = False
    """Mode `choice`: compare the mean log-probability per choice token instead of the sum,
    so that long choices are not penalised for their length."""
    question_field: str = "question"
    """Column holding the question (a string)."""
    answer_field: str = "answer"
    """Column holding the answer: a string (or a number), or for mode `choice` the index of
    the right choice or its text."""
    choices_field: str = "choices"
    """Column holding the list of choices (mode `choice`)."""
    template: str = "Question: {question}\nAnswer:"
    """How one question is written: `{question}` is the row's `question_field`, any other
    `{name}` the row's field of that name. A shot is the template followed by a space (none
    when the template ends in whitespace) and its answer; so is a choice being scored."""
    separator: str = "\n\n"
    """Written between the shots, and between the last shot and the question."""
    max_new_tokens: int = Field(16, gt=0)
    """Mode `generate`: tokens generated per question at most."""
    max_rows: int | None = Field(None, gt=0)
    """Score only the first N rows of `path` (default: all of them)."""
    batch_size: int = Field(8, gt=0)
    """Questions per forward pass on each worker."""
    seed: int = 0
    """Seed for drawing the shots; each question draws its own from it and its row number, so
    a prompt does not depend on the number of workers."""

    @field_validator("template")
    @classmethod
    def _template_names_question(cls, v: str) -> str:
        import string

        names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        if any(not name or name.isdigit() for name in names):
            raise ValueError("use named fields, e.g. {question}, not {} or {0}")
        if "question" not in names:
            raise ValueError("must contain {question}")
        return v


class ParamGroupSpec(Strict):
    """Parameters whose names match `pattern` train at `train.lr` x `lr_scale`."""

    pattern: str = Field(min_length=1)
    """Regular expression searched in parameter names, as in `model.freeze` (e.g. `layers\\.[0-3]\\.`)."""
    lr_scale: float = Field(ge=0)
    """Multiplies the learning rate of these parameters all through the schedule; 0 keeps
    them where they are."""

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, v: str) -> str:
        return ModelSpec._patterns_compile([v])[0]


class EvalSpec(Strict):
    """Evaluations besides the eval loss."""

    fewshot: FewshotSpec | None = None
    """k-shot accuracy on held-out questions before training and after (the difference is
    what the fine-tune bought over prompting); reported with the run's final metrics."""


class TrainSpec(Strict):
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; overrides `epochs`."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per worker per forward pass."""
    global_batch_size: int | None = Field(None, gt=0)
    """Sequences per optimizer step over all workers; gradient accumulation is derived.
    Default: micro_batch_size x workers."""
    deepspeed: Union[ZeroSpec, str] = ZeroSpec()
    """ZeRO shorthand (`{stage: 3, offload_optimizer: true}`) or a path to a DeepSpeed JSON;
    Hugging Face style `"auto"` values in it are filled from this spec. The JSON text itself
    (starting with `{`) is accepted too: the launcher sends a file's content that way, so the
    cluster needs no copy of the file."""
    seed: int = 42
    """Seed for weights of new modules, shuffling and dropout."""
    log_every: int = Field(1, gt=0)
    """Report metrics every N optimizer steps."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N steps (and always at the end when there is eval data)."""
    param_groups: list[ParamGroupSpec] = []
    """Learning rates by parameter name (discriminative fine-tuning): a trainable parameter
    joins the first group whose `pattern` its name matches and trains at `lr` x the group's
    `lr_scale`; one that matches none trains at `lr`. With `model.peft` the names are the
    adapter's (`...q_proj.lora_A.default.weight`); frozen parameters belong to no group.
    Scale 0: the parameters do not move (AdamW's weight decay is scaled by the learning rate
    too). Needs the spec's schedule: a DeepSpeed JSON with a `scheduler` block is refused."""
    eval_at_start: bool = False
    """Evaluate before the first step (a transfer run's starting point, a baseline); not
    again when a run resumes. Needs eval data."""
    early_stopping: EarlyStoppingSpec | None = None
    """Stop once `early_stopping.metric` has not improved for `patience` evaluations (needs
    eval data and `eval_every`); the run saves a checkpoint there and exports the model it
    ended with; `result.json` and the log name the best step."""


class ResourcesSpec(Strict):
    workers: int = Field(1, gt=0)
    """Ray Train workers (one DeepSpeed rank each)."""
    gpus_per_worker: Union[Literal["auto"], int] = "auto"
    """GPUs per worker. `auto`: 1 when the cluster has GPUs, else 0 (CPU training with gloo)."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved per worker."""
    accelerator_type: str | None = None
    """Ray accelerator type to pin workers to, e.g. `H100` or `A100-80G`."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v

    def worker_gpus(self, cluster: dict[str, float]) -> int:
        """GPUs each worker takes on a cluster with these resources (`auto` resolved)."""
        if self.gpus_per_worker == "auto":
            return 1 if cluster.get("GPU", 0) > 0 else 0
        return self.gpus_per_worker


class CheckpointSpec(Strict):
    storage: str = ""
    """Where runs are written: `s3://bucket/prefix` (any S3-compatible store via
    `AWS_ENDPOINT_URL`) or a local directory. Layout: `<storage>/<name>/<run-id>/`.
    Default: `$LLMLAUNCH_HOME/runs` (`~/.cache/llmlaunch/runs`) on the launcher's machine."""
    every_n_steps: int = Field(100, ge=0)
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep: int = Field(2, gt=0)
    """Checkpoints kept per run; older ones are deleted."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of this `name` unless the run
    that wrote it finished; `never`: start fresh; or the URI / absolute path of a checkpoint."""

    @field_validator("resume")
    @classmethod
    def _resume_mode(cls, v: str) -> str:
        if v not in ("auto", "never") and "://" not in v and not v.startswith("/"):
            raise ValueError("use auto, never, or the URI (s3://...) or absolute path of a checkpoint directory")
        return v


class _RunBase(Strict):
    name: str
    """Run name: lowercase letters, digits and `-`; runs are stored under it."""
    model: ModelSpec
    """The model to start from, its precision, adapters and frozen parts."""
    data: DataSpec
    """Training and evaluation data, and how it becomes fixed-length sequences."""
    train: TrainSpec = TrainSpec()
    """Steps, optimizer, batch sizes and DeepSpeed."""
    eval: EvalSpec = EvalSpec()
    """Evaluations besides the eval loss of `data.eval` (few-shot accuracy)."""
    resources: ResourcesSpec = ResourcesSpec()
    """Workers and what each reserves on the cluster."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Where the run is stored, how often it checkpoints, and resuming."""
    env: dict[str, Union[str, int, float, bool]] = {}
    """Environment variables for the workers (no secrets: use `secrets`)."""
    secrets: list[str] = []
    """Names of environment variables the workers receive from the cluster's secret store
    (local: the launcher's environment). Values never appear in the spec or logs."""
    defaults: list[str] = []
    """Spec files merged under this one, in order (resolved by the launcher)."""
    tune: TuneSpec | None = None
    """A hyperparameter search: every trial is a whole run of this spec with values sampled
    from `search_space` (see docs/tune.md). Omit for a single run."""

    @field_validator("env")
    @classmethod
    def _env_as_strings(cls, v: dict[str, Any]) -> dict[str, str]:
        return {k: str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use 1-52 lowercase letters, digits and '-', starting and ending alphanumeric")
        return v

    @model_validator(mode="after")
    def _tune_needs_its_metric(self) -> "_RunBase":
        t = self.tune
        if t is None:
            return self
        sampled = [p for p, d in t.search_space.items() if p.startswith("data.") and d.kind not in ("choice", "grid")]
        if sampled:
            raise ValueError(f"tune.search_space: search data fields ({', '.join(sampled)}) with choice or grid: "
                             "the data is prepared once per value, before the trials start")
        if t.metric.startswith("eval_") and not self._has_eval():
            raise ValueError(f"tune.metric {t.metric} needs eval data: set data.eval or data.eval_fraction")
        if t.scheduler.type == "asha" and t.metric.startswith("eval_") and not self.train.eval_every:
            raise ValueError("tune.scheduler asha compares trials at every evaluation: set train.eval_every")
        if t.scheduler.type == "asha" and not self.train.max_steps and not t.scheduler.max_t:
            raise ValueError("tune.scheduler asha needs train.max_steps (or scheduler.max_t): its rungs are steps")
        if t.scheduler.type == "pbt":
            every, interval = self.checkpoint.every_n_steps, t.scheduler.perturbation_interval
            # A trial copies the newest checkpoint of another: one must exist at each
            # perturbation, and every report PBT reads must carry the metric.
            if not every or interval % every:
                raise ValueError(f"tune.scheduler.perturbation_interval ({interval}) must be a multiple of "
                                 f"checkpoint.every_n_steps ({every}): an exploit copies the newest checkpoint")
            if t.metric.startswith("eval_") and (not self.train.eval_every or every % self.train.eval_every):
                raise ValueError(f"tune.scheduler pbt compares trials at every report: checkpoint.every_n_steps "
                                 f"({every}) must be a multiple of train.eval_every ({self.train.eval_every})")
        return self

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self) -> "_RunBase":
        if self.data.streaming and not self.train.max_steps:
            raise ValueError("data.streaming does not count the rows up front, so epochs are unknown: set "
                             "train.max_steps")
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> "_RunBase":
        if self.train.early_stopping is None:
            return self
        if not self._has_eval():
            raise ValueError("train.early_stopping watches an eval metric: set data.eval or data.eval_fraction")
        if not self.train.eval_every:
            raise ValueError("train.early_stopping counts evaluations: set train.eval_every")
        return self

    def _has_eval(self) -> bool:
        return bool(self.data.eval) or self.data.eval_fraction > 0

    @model_validator(mode="after")
    def _batch_divides(self) -> "_RunBase":
        per_step = self.train.micro_batch_size * self.resources.workers
        gbs = self.train.global_batch_size
        if gbs is not None and gbs % per_step:
            raise ValueError(
                f"train.global_batch_size ({gbs}) must be a multiple of micro_batch_size x workers ({per_step})"
            )
        if self.model.peft is not None and self.model.freeze:
            raise ValueError("model.freeze has no effect with model.peft (the base model is frozen already)")
        if self.train.eval_at_start and not self._has_eval():
            raise ValueError("train.eval_at_start needs eval data: set data.eval or data.eval_fraction")
        ds = self.train.deepspeed
        if self.model.peft is not None and self.model.peft.quantize and isinstance(ds, ZeroSpec) and ds.stage == 3:
            raise ValueError(QUANTIZE_ZERO3 + ": use train.deepspeed.stage 2")
        return self

    @property
    def grad_accum_steps(self) -> int:
        per_step = self.train.micro_batch_size * self.resources.workers
        return (self.train.global_batch_size or per_step) // per_step


class SftRun(_RunBase):
    """Supervised fine-tuning (full or LoRA) on text, alpaca or chat data."""

    method: Literal["sft"]
    """Training method."""


class MultitaskRun(_RunBase):
    """Multi-task fine-tuning: several tasks' data mixed by weight or temperature, trained
    with one causal LM loss, each task evaluated on its own eval set."""

    method: Literal["multitask"]
    """Training method."""
    data: MultitaskDataSpec
    """The tasks (`data.tasks`), how they are mixed, and how rows become sequences."""

    def _has_eval(self) -> bool:
        return self.data.has_eval()


class PretrainRun(_RunBase):
    """Continued pre-training (domain adaptation): causal LM loss on every token of raw text."""

    method: Literal["pretrain"]
    """Training method."""

    @model_validator(mode="after")
    def _text_only(self) -> "PretrainRun":
        for where, ds in self.data.datasets():
            if ds.format != "text":
                raise ValueError(f"pretrain reads raw text: {where}.format is {ds.format!r}; "
                                 "use format: text or method: sft")
        return self


class _PreferenceRun(_RunBase):
    """A method that learns from comparisons: its datasets are `preference` (or `ranking`) rows."""

    _formats: tuple[str, ...] = ("preference",)

    @model_validator(mode="after")
    def _comparison_data(self) -> "_PreferenceRun":
        for where, ds in self.data.datasets():
            if ds.format not in self._formats:
                raise ValueError(f"{self.method} learns from comparisons: {where}.format is {ds.format!r}; use "
                                 + " or ".join(self._formats))
        if self.data.streaming:
            raise ValueError(f"data.streaming is for sft/pretrain corpora; {self.method} prepares its pairs up front")
        return self


class RewardSpec(Strict):
    """Reward modeling: a scalar head scored at each sequence's last token."""

    center_coefficient: float | None = Field(None, ge=0)
    """Weight of TRL's reward-centring term, coefficient x mean((r_chosen + r_rejected)^2)
    (Eisenstein et al. 2023): keeps rewards near zero. Omit to leave it out."""


class RewardRun(_PreferenceRun):
    """Reward modeling (Bradley-Terry on preference pairs) and comparative ranking (all
    ordered pairs of K ranked responses, InstructGPT)."""

    method: Literal["reward"]
    """Training method."""
    reward: RewardSpec = RewardSpec()
    """The reward loss's options."""
    _formats = ("preference", "ranking")


class DpoSpec(Strict):
    """Direct preference optimization and its reference-free relative SimPO."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """`sigmoid`: DPO (Rafailov et al. 2023), with `label_smoothing` (conservative DPO);
    `ipo`: IPO (Azar et al. 2023), on length-normalised log-ratios as TRL computes it;
    `simpo`: SimPO (Meng et al. 2024), length-normalised log-probs, no reference model."""
    beta: float = Field(0.1, gt=0)
    """Inverse temperature: how far the policy may move from the reference."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a pair's preference is flipped (sigmoid and simpo)."""
    gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin, in reward units (TRL's `simpo_gamma`)."""
    precompute_reference: bool = False
    """Compute the reference's log-probs once over the data (a Ray Data pass of the starting
    model, before training) and train with the policy alone: no frozen copy in memory, no
    second forward per step. The starting model must fit on one worker's device. Not for
    `simpo`, which has no reference."""

    @model_validator(mode="after")
    def _precompute_needs_reference(self) -> "DpoSpec":
        if self.precompute_reference and self.loss == "simpo":
            raise ValueError("dpo.precompute_reference: simpo has no reference model; remove the option "
                             "or use loss sigmoid or ipo")
        return self


class DpoRun(_PreferenceRun):
    """DPO, IPO and SimPO on preference pairs. The reference is the starting model: with
    LoRA the base with adapters disabled (no second copy), with full fine-tuning a frozen
    copy under the same ZeRO stage or log-probs precomputed over the data; SimPO needs none."""

    method: Literal["dpo"]
    """Training method."""
    dpo: DpoSpec = DpoSpec()
    """The preference loss and its coefficients."""


class PpoRun(_RunBase):
    """PPO, GRPO and RLOO: the policy (actor), critic, reference and reward model are each a
    group of Ray actors with a DeepSpeed engine of their own; see docs/rl.md."""

    method: Literal["ppo"]
    """Training method."""
    ppo: PpoSpec
    """The rollouts, the reward, the advantage estimator and the losses."""

    @model_validator(mode="after")
    def _prompts_and_iterations(self) -> "PpoRun":
        for where, ds in self.data.datasets():
            if ds.format != "prompt":
                raise ValueError(f"ppo generates its own responses: {where}.format is {ds.format!r}; use prompt")
        if self.data.streaming:
            raise ValueError("data.streaming is for sft/pretrain corpora; ppo samples prompts from prepared data")
        if not self.train.max_steps:
            raise ValueError("ppo counts iterations: set train.max_steps")
        per_iteration = self.ppo.prompts_per_iteration
        if per_iteration % self.resources.workers:
            raise ValueError(f"ppo.prompts_per_iteration ({per_iteration}) must be a multiple of resources.workers "
                             f"({self.resources.workers}): each actor worker samples its share")
        samples = per_iteration // self.resources.workers * self.ppo.samples_per_prompt
        if samples % self.ppo.mini_batches:
            raise ValueError(f"ppo.mini_batches ({self.ppo.mini_batches}) must divide the responses each actor worker "
                             f"trains on per iteration ({samples} = prompts_per_iteration / workers x "
                             "samples_per_prompt)")
        return self


class EsftRun(_RunBase):
    """Expert-Specialized Fine-Tuning of a mixture-of-experts model: only the routed experts
    most relevant to the task train (selected from their routing on a sample of the data);
    supervised data and loss as for `sft`."""

    method: Literal["esft"]
    """Training method."""
    esft: EsftSpec = EsftSpec()
    """How experts are scored and selected, and what else trains."""

    @model_validator(mode="after")
    def _full_experts(self) -> "EsftRun":
        if self.model.peft is not None:
            raise ValueError("model.peft: esft trains the selected experts' own weights, not adapters; remove "
                             "model.peft (or use method: sft for LoRA)")
        if self.model.freeze:
            raise ValueError("model.freeze: esft freezes everything but the selected experts itself; remove it")
        for where, ds in self.data.datasets():
            if ds.format in ("preference", "ranking", "prompt"):
                raise ValueError(f"esft trains on supervised data: {where}.format is {ds.format!r}")
        return self


AnyRun = Union[SftRun, PretrainRun, MultitaskRun, RewardRun, DpoRun, PpoRun, EsftRun]
RunSpec = Annotated[AnyRun, Field(discriminator="method")]
METHODS = ("sft", "pretrain", "multitask", "reward", "dpo", "ppo", "esft")

_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunSpec)


def parse_spec(data: dict[str, Any]) -> AnyRun:
    """Validate a plain dict; raises pydantic.ValidationError with every problem."""
    return _ADAPTER.validate_python(data)


def json_schema() -> dict[str, Any]:
    return _ADAPTER.json_schema()
