"""``reward_model``: score each (instruction, response) with a transformers sequence-classification reward model.

How the pair reaches the model follows what reward-model users do (TRL's ``RewardTrainer`` on
conversational data, distilabel's ``RewardModelScore``, the model cards of Skywork-Reward,
ArmoRM and InternLM2-reward): when the tokenizer has a chat template, the conversation
``[user: instruction, assistant: response]`` rendered by it and tokenized without adding special
tokens again (the template writes them; a second BOS changes the score); without a template,
instruction and response as a text pair (the tokenizer's own pair format: ``[CLS] a [SEP] b
[SEP]`` for DeBERTa-style reward models).

The score is the head's logit for a one-label head; for a two-label head it is ``logit[1] -
logit[0]``, the log-odds of label 1 ("good"/"chosen"), which is what a softmax over the two
labels ranks by. Heads with more labels are refused, and so are models whose head is code of their
own (ArmoRM, InternLM2-reward: ``trust_remote_code``), which would run outside any sandbox.

The model is loaded once per process (:func:`load_reward_model` keeps it by folder, device and
dtype); the step holds only its config, so it pickles to any executor.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from ..config import option
from ..errors import FactoryError
from ..hashing import fingerprint
from ..models import hub_snapshot
from ..text import has_text
from .base import RowStep
from .context import StepContext
from .drops import DROP

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DOWNLOAD = "download it where there is network (`hf download {model}`) or point `model` at a local folder"


@dataclass
class RewardModelConfig:
    model: str = option(help="The reward model: a local folder saved with save_pretrained (relative to the recipe's "
                             "folder or the current one), or a Hub id such as "
                             "`Skywork/Skywork-Reward-V2-Qwen3-0.6B` already in the local Hugging Face cache "
                             "(runs never download a model: `hf download ID` once). It must be an "
                             "AutoModelForSequenceClassification with a one- or two-label head.")
    column: str = option("instruction", help="The task column: the user turn.")
    response_column: str = option("response", help="The answer to score: the assistant turn.")
    output_column: str = option("reward", help="Where the score goes: the head's logit (a two-label head: logit[1] - "
                                               "logit[0]); null for rows without a response.")
    input_format: Literal["auto", "chat", "pair"] = option(
        "auto", help="`chat`: the conversation rendered by the tokenizer's chat template; `pair`: instruction and "
                     "response as a text pair; `auto`: chat when the tokenizer has a template, else pair.")
    batch_size: int = option(16, help="Rows per forward pass (rows of similar length go together).", min=1)
    max_length: int = option(4096, help="Most tokens per row; longer rows are cut to it (counted as `truncated` "
                                        "in the step's report).", min=2)
    device: str = option("auto", help="`auto` (cuda when there is a GPU, else cpu), `cpu`, `cuda`, `cuda:N` or "
                                      "`mps`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="`auto`: bfloat16 on a GPU, float32 on the CPU.")

    def validate(self):
        if not DEVICE.match(self.device):
            return [(f"unknown device '{self.device}'", "device", "use auto, cpu, cuda, cuda:N or mps")]
        return []


class RewardModel(RowStep):
    """Scores each response with a reward model (a sequence classifier): a verifier with no LLM calls.

    Rows without a response (null or blank) or without an instruction get a null score and
    are not sent to the model; nothing is dropped here. Use the score with ``score: {column:
    reward, min: ...}``, ``select: {verifier: reward_model}`` (best-of-n) or
    ``preference_pairs: {score_column: reward}``. The report counts ``rows_scored``,
    ``rows_unscored``, ``truncated`` rows and ``tokens``, and says the ``input`` format and
    ``device``.

    Requires: ``instruction`` and ``response`` (or ``column`` / ``response_column``).
    Produces: ``reward`` (or ``output_column``), a float.

    Example:
        - solve: {samples: 4, temperature: 0.8}
        - reward_model: {model: Skywork/Skywork-Reward-V2-Qwen3-0.6B}
        - select: {verifier: reward_model}   # best of 4 per task
    """

    name = "reward_model"
    Config = RewardModelConfig

    def requires(self):
        return [self.config.column, self.config.response_column]

    def produces(self):
        return [self.config.output_column]

    def check(self):
        try:
            folder = locate(self.config.model, self.base_dir)
        except FactoryError as err:
            return [(str(err), "model", None)]
        problem = head_problem(folder, self.config.model, self.config.input_format)
        return [(problem, "model", None)] if problem else []

    def fingerprint(self) -> str:
        # The weights are part of what it computes: a model retrained in place scores anew.
        return fingerprint([super().fingerprint(), weights_identity(self.config.model, self.base_dir)])

    def process(self, batch: pl.DataFrame, ctx: StepContext | None = None) -> pl.DataFrame:
        c = self.config
        ctx = ctx or StepContext()
        instructions, responses = batch[c.column].to_list(), batch[c.response_column].to_list()
        todo = [i for i in range(batch.height) if has_text(instructions[i]) and has_text(responses[i])]
        scores: list[float | None] = [None] * batch.height
        if todo:
            loaded = load_reward_model(c.model, device=c.device, dtype=c.dtype, base_dir=self.base_dir)
            encoded = encode(loaded, [instructions[i] for i in todo], [responses[i] for i in todo], c.input_format,
                             c.max_length)
            for i, score in zip(todo, score_encoded(loaded, encoded, c.batch_size)):
                scores[i] = score
            ctx.report.update(truncated=encoded.truncated, tokens=sum(map(len, encoded.ids)),
                              input="chat template" if encoded.chat else "text pair", device=loaded.where)
        scored = sum(score is not None for score in scores)
        ctx.report.update(rows_scored=scored, rows_unscored=batch.height - scored)
        return batch.with_columns(pl.Series(c.output_column, scores, dtype=pl.Float64),
                                  pl.lit(None, dtype=pl.String).alias(DROP))


# ---------------------------------------------------------------- finding the model (no torch)

def locate(model: str, base_dir: Path) -> str:
    """The local folder of reward model ``model`` (a folder, relative to ``base_dir`` or the current
    one, or a Hub id in the local cache: nothing is downloaded).

    Raises:
        FactoryError: naming the model, what is wrong and the fix.
    """
    path = Path(os.path.expanduser(model))
    for folder in ([path] if path.is_absolute() else [base_dir / path, path]):
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise FactoryError(f"reward model folder '{model}' has no config.json; point `model` at a folder "
                                   "written by save_pretrained (a sequence-classification model and its tokenizer)")
            return str(folder)
    if not HUB_ID.match(model):
        raise FactoryError(f"reward model '{model}' does not exist (no folder {base_dir / path}); point `model` at a "
                           "local folder written by save_pretrained, or a Hub id such as "
                           "Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    cached = hub_snapshot(model)
    if cached is None:  # runs load models from local files only, as the llm's model (factory.models)
        raise FactoryError(f"reward model '{model}' is neither a local folder ({base_dir / path}) nor in the local "
                           f"Hugging Face cache; {DOWNLOAD.format(model=model)}")
    return cached


def head_problem(folder: str, model: str, input_format: str = "auto") -> str | None:
    """What makes ``folder`` unusable as a reward model, read from its files (None when it looks fine)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"reward model '{model}': its config.json cannot be read ({err}); save the model again"
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        return (f"reward model '{model}' is a {architectures[0]}, not a sequence-classification model; use a "
                "reward model (AutoModelForSequenceClassification with a one-label head, e.g. one trained with "
                "TRL's RewardTrainer)")
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if labels > 2:
        return (f"reward model '{model}' has a {labels}-label head; use a reward model with one output (or two: "
                "scored as logit[1] - logit[0])")
    if input_format == "chat" and not has_chat_template(Path(folder)):
        return f"reward model '{model}': its tokenizer has no chat template; use `input_format: pair` (or auto)"
    return None


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def weights_identity(model: str, base_dir: Path) -> str:
    """The model's files (sizes and times) for cache keys; its name when it cannot be found."""
    from ..models import model_fingerprint

    try:
        folder = locate(model, base_dir)
        return model_fingerprint(folder)
    except FactoryError:
        return model


# ---------------------------------------------------------------- loading and scoring

@dataclass
class LoadedRewardModel:
    """A reward model in memory: the model, its tokenizer, the pad id it pools by, where it runs."""

    model: Any
    tokenizer: Any
    pad_id: int | None  # the model's pad id; None: it pools at the last token
    chat: bool  # the tokenizer has a chat template
    device: str
    where: str  # "cuda, bfloat16": for the report


_LOADED: dict[tuple, LoadedRewardModel] = {}
_LOCK = threading.Lock()


def load_reward_model(model: str, *, device: str = "auto", dtype: str = "auto",
                      base_dir: Path | None = None) -> LoadedRewardModel:
    """Reward model ``model`` on ``device`` in ``dtype``, loaded once per process and kept."""
    from ..models import pick_device, pick_dtype

    folder = locate(model, base_dir or Path.cwd())
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    key = (folder, device, str(torch_dtype))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(folder, model, device, torch_dtype)
        return _LOADED[key]


def _load(folder: str, model: str, device: str, torch_dtype) -> LoadedRewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    problem = head_problem(folder, model)  # `locate` gives a local folder: nothing is downloaded
    if problem:
        raise FactoryError(problem)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        rm, info = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch_dtype,
                                                                      output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise FactoryError(f"reward model '{model}' could not be loaded as a sequence-classification model "
                           f"({str(err).splitlines()[0]}); point `model` at a reward model folder or Hub id") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FactoryError(f"reward model '{model}' has no trained classification head ({', '.join(missing[:3])} "
                           "missing from its weights: it would score at random); use a reward model saved with its "
                           "head")
    if rm.config.num_labels > 2:
        raise FactoryError(f"reward model '{model}' has a {rm.config.num_labels}-label head; use one with one output")
    pad_id = rm.config.get_text_config().pad_token_id
    chat = bool(getattr(tokenizer, "chat_template", None))
    where = f"{device}, {str(torch_dtype).removeprefix('torch.')}"
    return LoadedRewardModel(rm.to(device).eval(), tokenizer, pad_id, chat, device, where)


@dataclass
class Encoded:
    """The rows as the model reads them: token ids, and token type ids where the tokenizer gives them
    (BERT-style pair models tell instruction from response by them)."""

    ids: list[list[int]]
    types: list[list[int]] | None
    truncated: int  # rows cut at max_length
    chat: bool  # rendered by the chat template (else a text pair)


def encode(loaded: LoadedRewardModel, instructions: list[str], responses: list[str], input_format: str,
           max_length: int) -> Encoded:
    """Each (instruction, response) as the model reads it, cut at ``max_length`` tokens."""
    tokenizer = loaded.tokenizer
    chat = input_format == "chat" or (input_format == "auto" and loaded.chat)
    if chat:
        if not loaded.chat:
            raise FactoryError("the reward model's tokenizer has no chat template; use `input_format: pair` (or auto)")
        try:
            texts = [tokenizer.apply_chat_template(conversation(q, a), tokenize=False)
                     for q, a in zip(instructions, responses)]
        except Exception as err:  # a template's own raise_exception() (jinja2 TemplateError), or a bad template
            raise FactoryError(f"the reward model's chat template failed on a user/assistant conversation ({err}); "
                               "use `input_format: pair`") from err
        tokens = tokenizer(texts, add_special_tokens=False)
    else:
        tokens = tokenizer(instructions, responses)
    ids, types = tokens["input_ids"], tokens.get("token_type_ids")
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    for i in long:
        if chat:
            ids[i] = ids[i][:max_length]
            if types is not None:
                types[i] = types[i][:max_length]
        else:  # the tokenizer's own pair truncation keeps its special tokens
            cut = tokenizer(instructions[i], responses[i], truncation=True, max_length=max_length)
            ids[i] = cut["input_ids"]
            if types is not None:
                types[i] = cut["token_type_ids"]
    return Encoded(ids, types, len(long), chat)


def batch_pad_id(loaded: LoadedRewardModel, rows: list[list[int]]) -> int:
    """The id to pad ``rows`` with. A sequence classifier pools at the last token that is not its pad id,
    so padding must use the model's own. A model without one pools at the very last token: then any id
    that ends none of the rows gives the same (set on the model for this batch)."""
    if loaded.pad_id is not None:
        return loaded.pad_id
    last = {row[-1] for row in rows}
    pad = next(i for i in range(len(rows) + 1) if i not in last)
    loaded.model.config.get_text_config().pad_token_id = pad
    return pad


def conversation(instruction: str, response: str) -> list[dict]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def score_encoded(loaded: LoadedRewardModel, encoded: Encoded, batch_size: int) -> list[float | None]:
    """The reward of each encoded row (None for a row of no tokens), in batches of rows of similar
    length (longest first, so that a batch too large for the device fails at once)."""
    import torch

    rows = encoded.ids
    order = sorted((i for i in range(len(rows)) if rows[i]), key=lambda i: -len(rows[i]))
    scores: list[float | None] = [None] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), batch_pad_id(loaded, [rows[i] for i in chunk]), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                mask[row, :len(rows[i])] = 1
                if encoded.types is not None:
                    types[row, :len(rows[i])] = torch.tensor(encoded.types[i], dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if encoded.types is not None:
                inputs["token_type_ids"] = types
            try:
                logits = loaded.model(**{k: v.to(loaded.device) for k, v in inputs.items()}).logits
            except torch.cuda.OutOfMemoryError as err:
                raise FactoryError(f"the reward model ran out of GPU memory on {len(chunk)} rows of {width} tokens; "
                                   "lower `batch_size` or `max_length`") from err
            logits = logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            for i, value in zip(chunk, values.tolist()):
                scores[i] = value
    return scores
