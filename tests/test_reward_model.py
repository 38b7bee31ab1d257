"""The `reward_model` step on tiny random reward models built here (nothing downloaded): batched
scores equal the model's own one-row-at-a-time scores, rows without a response are not sent,
truncation is counted, bad models are clear errors, and the reward feeds `score`, `select`
(best-of-n) and `preference_pairs` in recipe runs on the scripted backend."""

from __future__ import annotations

import json
import pickle
import shutil
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch

from factory.build import run_recipe
from factory.cache import Cache
from factory.driver import Driver
from factory.errors import FactoryError, RecipeError
from factory.recipe import load_recipe
from factory.steps import reward_model as rm
from factory.steps.context import StepContext
from factory.steps.reward_model import RewardModel, RewardModelConfig
from factory.store import read_version
from filters.select import Select, SelectConfig

from .conftest import SEEDS

TEMPLATE = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{{ eos_token }}"
CORPUS = ["What is the sum of two and three? The answer is five.", "Name a colour of the sky. Blue, mostly.",
          "Explain why ice floats on water: it is less dense.", "Answer 0123456789 abcdef", "Write a haiku."]
ROWS = pl.DataFrame({
    "instruction": ["What is 2 + 3?", "What is 2 + 3?", "What is 2 + 3?", "Name a colour of the sky.",
                    "Explain why ice floats on water, in one long sentence please.", "Write a haiku.", "Say hi."],
    "response": ["5", "The answer is five, since two and three make five.", "six", "Blue.",
                 "Ice is less dense than liquid water because its molecules sit in an open lattice.",
                 "Old pond / a frog jumps in / the sound of water", "hi"]})


def build_reward_model(dest: Path, *, arch: str = "llama", chat: bool = True, pad: bool = True) -> Path:
    """A 2-layer random sequence classifier (one label) with a byte-level BPE tokenizer trained here;
    its head is scaled up so that scores spread over several units (a pooling bug shows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                              PreTrainedTokenizerFast)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Like Llama's and BERT's tokenizers, it adds its own begin-of-text (the chat template writes one too).
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B:1",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # Llama's tokenizers give no token type ids; BERT's do (and its model reads them).
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>" if pad else None, model_input_names=inputs)
    if chat:
        tokenizer.chat_template = TEMPLATE
    pad_id = tokenizer.pad_token_id if pad else None
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=pad_id))
    else:
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, num_labels=1, pad_token_id=pad_id))
    with torch.no_grad():
        (model.score if arch == "llama" else model.classifier).weight.mul_(50.0)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """chat: Llama with a chat template and a pad token; pair: BERT without a template (it attends both
    ways, so padding that the attention mask lets through shows; it reads token type ids); nopad:
    Llama whose config has no pad id and whose template ends in the end-of-text."""
    root = tmp_path_factory.mktemp("reward-models")
    return {"chat": build_reward_model(root / "chat"), "pair": build_reward_model(root / "pair", arch="bert", chat=False),
            "nopad": build_reward_model(root / "nopad", pad=False)}


def one_at_a_time(folder: Path, instruction: str, response: str, chat: bool, max_length: int | None = None) -> float:
    """The model's score of one row, unpadded, through transformers' own chat-template path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if chat:
        conversation = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        inputs = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
    else:
        inputs = tokenizer(instruction, response)
    inputs = {k: torch.tensor([v[:max_length] if max_length else v]) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


def scored(folder: Path, rows: pl.DataFrame = ROWS, **options) -> tuple[pl.DataFrame, dict]:
    ctx = StepContext()
    out = RewardModel(RewardModelConfig(model=str(folder), device="cpu", **options)).process(rows, ctx)
    return out, ctx.report


@pytest.mark.parametrize("kind", ["chat", "pair", "nopad"])
def test_batched_scores_equal_the_models_own_one_row_at_a_time(models, kind):
    out, report = scored(models[kind], batch_size=3)
    expected = [one_at_a_time(models[kind], q, a, chat=kind != "pair") for q, a in ROWS.iter_rows()]
    assert out["reward"].to_list() == pytest.approx(expected, abs=1e-4)
    assert out.columns == ["instruction", "response", "reward", "_drop_reason"] and out["_drop_reason"].null_count() == 7
    assert report["input"] == ("text pair" if kind == "pair" else "chat template")
    assert (report["rows_scored"], report["rows_unscored"], report["truncated"]) == (7, 0, 0)
    assert report["device"] == "cpu, float32"


def test_the_tiny_model_reads_the_whole_conversation(models):
    """Scores that did not depend on every token would let a padding or pooling bug pass unseen."""
    rewards = scored(models["chat"])[0]["reward"].to_list()
    assert min(abs(a - b) for i, a in enumerate(rewards) for b in rewards[i + 1:]) > 0.01
    same_answer = pl.DataFrame({"instruction": ["What is 2 + 3?", "Say hi."], "response": ["5", "5"]})
    first, second = scored(models["chat"], same_answer)[0]["reward"].to_list()
    assert abs(first - second) > 0.01


def test_rows_without_a_response_get_a_null_reward_and_are_not_sent(models, monkeypatch):
    sent = []
    score = rm.score_encoded
    monkeypatch.setattr(rm, "score_encoded", lambda loaded, encoded, size: sent.append(len(encoded.ids)) or
                        score(loaded, encoded, size))
    rows = pl.DataFrame({"instruction": ["Say hi.", "Say hi.", "Say hi.", None, "Write a haiku."],
                         "response": ["hi", None, "   ", "hello", "Old pond"]})
    out, report = scored(models["chat"], rows)
    rewards = out["reward"].to_list()
    assert [r is None for r in rewards] == [False, True, True, True, False] and sent == [2]
    assert rewards[0] == pytest.approx(one_at_a_time(models["chat"], "Say hi.", "hi", chat=True), abs=1e-4)
    assert (report["rows_scored"], report["rows_unscored"]) == (2, 3)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for rows with nothing to score")

    monkeypatch.setattr(rm, "load_reward_model", no_model)
    empty, report = scored(models["chat"], rows.filter(pl.col("response").is_null()))
    assert empty["reward"].to_list() == [None] and empty["reward"].dtype == pl.Float64
    assert report == {"rows_scored": 0, "rows_unscored": 1}


def test_rows_past_max_length_are_cut_and_counted(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["chat"])
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                 tokenize=True, return_dict=True)["input_ids"]) for q, a in ROWS.iter_rows()]
    limit = sorted(lengths)[3]  # three rows are longer
    out, report = scored(models["chat"], max_length=limit, batch_size=4)
    assert report["truncated"] == sum(n > limit for n in lengths) == 3
    assert report["tokens"] == sum(min(n, limit) for n in lengths)
    expected = [one_at_a_time(models["chat"], q, a, chat=True, max_length=limit) for q, a in ROWS.iter_rows()]
    assert out["reward"].to_list() == pytest.approx(expected, abs=1e-4)


def test_the_model_is_loaded_once_per_process_and_the_step_pickles_without_it(models):
    first = rm.load_reward_model(str(models["chat"]), device="cpu")
    assert rm.load_reward_model(str(models["chat"]), device="cpu", dtype="float32") is first
    assert rm.load_reward_model(str(models["chat"]), device="cpu", dtype="bfloat16") is not first
    step = RewardModel(RewardModelConfig(model=str(models["chat"]), device="cpu"))
    step.process(ROWS)
    copy = pickle.loads(pickle.dumps(step))
    assert len(pickle.dumps(step)) < 2000 and copy.process(ROWS).equals(step.process(ROWS))


def test_a_two_label_head_scores_the_log_odds_of_label_1(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "two"
    shutil.copytree(models["chat"], folder)
    one_label = AutoModelForSequenceClassification.from_pretrained(folder).score.weight
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True)
    with torch.no_grad():  # logit[1] - logit[0] = (0.5 - 1) * the one-label score
        model.score.weight.copy_(torch.cat([one_label, 0.5 * one_label]))
    model.save_pretrained(folder)
    one, two = scored(models["chat"])[0]["reward"], scored(folder)[0]["reward"]
    assert two.to_list() == pytest.approx((one * -0.5).to_list(), abs=1e-4)


# ---------------------------------------------------------------- bad models: clear errors before or at loading

def recipe_text(model: str, steps: str = "", source: Path = SEEDS, output: str = "raw") -> str:
    return textwrap.dedent(f"""\
        name: rewarded
        seed: 5
        llm:
          backend: scripted
          rules:
            - {{match: ".", reply: "Answer {{hash}}"}}
        source: {{path: {source}}}
        steps:
          - solve: {{samples: 4, temperature: 0.8}}
          - reward_model: {{model: {model}, batch_size: 5}}
        """) + textwrap.indent(textwrap.dedent(steps), "  ") + f"output: {{format: {output}}}\n"


def test_a_missing_model_folder_is_a_located_recipe_error(write_recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(recipe_text("./no-such-reward-model")))
    line = str(err.value)
    assert "steps[1].reward_model.model: reward model './no-such-reward-model' does not exist" in line
    assert "point `model` at a local folder written by save_pretrained" in line
    with pytest.raises(FactoryError, match="reward model '/nowhere/rm' does not exist"):
        rm.load_reward_model("/nowhere/rm")


def test_a_causal_lm_is_not_a_reward_model(write_recipe, tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"steps\[1\].reward_model.model: reward model '.*' is a LlamaForCausalLM, "
                                          "not a sequence-classification model; use a reward model"):
        load_recipe(write_recipe(recipe_text(str(tiny_model_dir))))
    unmarked = tmp_path / "unmarked"  # a config that does not say its architecture: found at loading
    shutil.copytree(tiny_model_dir, unmarked)
    config = json.loads((unmarked / "config.json").read_text())
    (unmarked / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    with pytest.raises(FactoryError, match=r"has no trained classification head \(score.weight missing"):
        rm.load_reward_model(str(unmarked), device="cpu")


def test_a_chat_input_needs_a_chat_template(write_recipe, models):
    with pytest.raises(RecipeError, match="its tokenizer has no chat template; use `input_format: pair`"):
        load_recipe(write_recipe(recipe_text(str(models["pair"])).replace("batch_size: 5", "input_format: chat")))


def test_a_hub_id_is_read_from_the_local_cache(models, monkeypatch, tmp_path):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--reward"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(models["chat"], repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert rm.locate("tiny/reward", tmp_path) == str(repo / "snapshots" / commit)
    from_hub = scored(Path("tiny/reward"))[0]["reward"]
    assert from_hub.to_list() == pytest.approx(scored(models["chat"])[0]["reward"].to_list(), abs=1e-6)
    with pytest.raises(FactoryError, match="reward model 'tiny/absent' is neither a local folder .* nor in the local "
                                           "Hugging Face cache; download it where there "
                                           r"is network \(`hf download tiny/absent`\)"):
        rm.locate("tiny/absent", tmp_path)


def test_bad_options_are_recipe_errors(write_recipe, models):
    text = recipe_text(str(models["chat"])).replace("batch_size: 5", "device: gpu, batch_size: 0")
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(text))
    assert "steps[1].reward_model.batch_size" in str(err.value)
    with pytest.raises(RecipeError, match="steps\\[1\\].reward_model.device: unknown device 'gpu'; use auto, cpu"):
        load_recipe(write_recipe(text.replace("batch_size: 0", "batch_size: 2")))


# ---------------------------------------------------------------- the reward in use: select, score, preference_pairs

REWARDS = pl.DataFrame({
    "instruction": ["a"] * 4 + ["b"] * 3 + ["c"],
    "response": ["x", "x", "a longer y", "z", "p", "q", "r", "s"],
    "reward": [1.5, 1.5, 3.0, None, -2.0, 0.25, float("nan"), -1.0]})


@pytest.mark.parametrize("options, reasons", [
    ({}, ["over_per_task", "duplicate", None, "missing_reward", "over_per_task", None, "missing_reward", None]),
    ({"per_task": 2}, [None, "duplicate", None, "missing_reward", None, None, "missing_reward", None]),
    ({"min_reward": 0.0}, ["over_per_task", "duplicate", None, "missing_reward", "below_min_reward", None,
                           "missing_reward", "below_min_reward"]),
    ({"per_task": 3, "min_reward": 1.5}, [None, "duplicate", None, "missing_reward", "below_min_reward",
                                          "below_min_reward", "missing_reward", "below_min_reward"]),
])
def test_select_by_reward_keeps_the_best_of_n(options, reasons):
    select = Select(SelectConfig(verifier="reward_model", **options))
    assert select.keep(REWARDS, StepContext())["reason"].to_list() == reasons
    assert select.requires() == ["instruction", "reward", "response"]


def test_select_reads_the_reward_column_it_is_given():
    table = REWARDS.rename({"reward": "rm_score"})
    reasons = Select(SelectConfig(verifier="reward_model", reward_column="rm_score")).keep(table, StepContext())
    assert reasons["reason"].to_list()[:4] == ["over_per_task", "duplicate", None, "missing_reward"]


def run(path: Path, tmp_path: Path) -> tuple[pl.DataFrame, dict]:
    version, manifest, _ = run_recipe(load_recipe(path), tmp_path / "out",
                                      driver=Driver(Cache(tmp_path / "cache"), progress=False))
    return read_version(version), {s["name"]: s for s in manifest["steps"]}


@pytest.fixture
def rewarded(models, write_recipe, tmp_path):
    """Three tasks, four scripted answers each, and the rewards of all twelve (checked one row at a time)."""
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps({"instruction": q}) for q in
                                ["What is 2 + 3?", "Name a colour of the sky.", "Write a haiku."]) + "\n")

    def recipe(steps: str = "") -> Path:
        return write_recipe(recipe_text(str(models["chat"]), steps, source))

    table, steps = run(recipe(), tmp_path)
    assert table.height == 12 and steps["reward_model"]["report"]["rows_scored"] == 12
    sample = table.row(5, named=True)
    assert sample["reward"] == pytest.approx(one_at_a_time(models["chat"], sample["instruction"], sample["response"],
                                                           chat=True), abs=1e-4)
    return table, recipe


def test_a_score_threshold_on_the_reward(rewarded, tmp_path):
    table, recipe = rewarded
    ranked = sorted(table["reward"])
    cut = float(f"{(ranked[4] + ranked[5]) / 2:.6f}")  # five rewards below it
    kept, steps = run(recipe(f"- score: {{column: reward, min: {cut:.6f}}}\n"), tmp_path)
    assert steps["score"]["dropped"] == {"below_min": 5}
    assert sorted(kept["response"]) == sorted(table.filter(pl.col("reward") >= cut)["response"])


def test_select_by_reward_in_a_recipe_keeps_each_tasks_best(rewarded, tmp_path):
    table, recipe = rewarded
    kept, steps = run(recipe("- select: {verifier: reward_model}\n"), tmp_path)
    best = table.sort("reward", descending=True).unique("instruction", keep="first")
    assert sorted(kept["response"]) == sorted(best["response"])
    assert steps["select"]["dropped"] == {"over_per_task": 9}


def test_preference_pairs_ranked_by_reward_with_a_margin_in_reward_units(rewarded, tmp_path):
    table, recipe = rewarded
    spans = table.group_by("instruction").agg(pl.col("reward").max().alias("hi"), pl.col("reward").min().alias("lo"),
                                              (pl.col("reward").max() - pl.col("reward").min()).alias("margin"))
    margins = sorted(spans["margin"])
    cut = float(f"{(margins[0] + margins[1]) / 2:.6f}")  # the task of the smallest spread goes
    pairs, steps = run(recipe(f"- preference_pairs: {{by: score, score_column: reward, min_margin: {cut:.6f}}}\n"),
                       tmp_path)
    assert steps["preference_pairs"]["dropped"] == {"small_margin": 4}
    expected = spans.filter(pl.col("margin") >= cut)
    assert sorted(pairs["prompt"]) == sorted(expected["instruction"])
    for row in pairs.iter_rows(named=True):
        task = table.filter(pl.col("instruction") == row["prompt"])
        assert row["chosen"] == task.sort("reward", descending=True)["response"][0]
        assert row["rejected"] == task.sort("reward")["response"][0]
        assert (row["chosen_score"], row["rejected_score"]) == (task["reward"].max(), task["reward"].min())
