"""LLM-Adapters task sets (Hu et al. 2023): loading, the Alpaca-style prompt, answer extraction, evaluation.

The data are the zips under `shared/data/llm-adapters/`, read in place. Every record is
`{"instruction", "input", "output", "answer"}`; outputs read "the correct answer is <label>" and the
instruction ends with "Answer format: a/b/...", which gives the label set of each record, so one
extractor serves every task (true/false, solution1/2, answer1-5, option1/2, ending1-4).
"""
from __future__ import annotations

import json
import os
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ANSWER_CUE = "the correct answer is"
_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9_/]+)\s*$")
# Fallback label sets when an instruction lacks its "Answer format:" line.
TASK_LABELS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "winogrande": ("option1", "option2"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    answer: str
    task: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return label_set(self.instruction, self.task)


# -- data --------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """$NEUROADA_DATA, else ../shared/data/llm-adapters relative to the repository root."""
    env = os.environ.get("NEUROADA_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data" / "llm-adapters")


def _split_members(names: Sequence[str], task: str, split: str) -> str:
    if f"{split}.json" in names:
        return f"{split}.json"
    if split == "train" and f"{task}.json" in names:  # a zip holding only the full set
        return f"{task}.json"
    raise FileNotFoundError(f"{task}.zip has no {split}.json (has: {', '.join(sorted(names))})")


def load_task(task: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Records of `<data_dir>/<task>.zip:<split>.json`, read in place (nothing is extracted)."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    path = folder / f"{task}.zip"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.zip")) if folder.is_dir() else []
        raise FileNotFoundError(f"no task set {path}" + (f" (have: {', '.join(have)})" if have else
                                                           " (set --data or NEUROADA_DATA)"))
    with zipfile.ZipFile(path) as zf:
        member = _split_members(zf.namelist(), task, split)
        records = json.loads(zf.read(member))
    out = []
    for i, r in enumerate(records):
        try:
            out.append(Example(r["instruction"], r.get("input") or "", r["output"], str(r["answer"]), task))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{member} record {i} lacks field {exc}") from None
    return out


def subset(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A fixed random subset of n items (all, in order, when n is None or >= len); same seed, same items."""
    if n is None or n >= len(examples):
        return list(examples)
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


# -- prompt ------------------------------------------------------------------------------------------
def build_prompt(ex: Example | str, input_text: str = "") -> str:
    """The LLM-Adapters prompt up to and including "### Response:\\n" (the model writes the rest)."""
    instruction = ex.instruction if isinstance(ex, Example) else ex
    if isinstance(ex, Example):
        input_text = ex.input
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    if input_text:
        return (f"{PROMPT_HEADER}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input_text}\n\n### Response:\n")
    return f"{PROMPT_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def label_set(instruction: str, task: str = "") -> tuple[str, ...]:
    """Labels named by the instruction's "Answer format: a/b/c" line, else the task's known set."""
    last = instruction.strip().splitlines()[-1] if instruction.strip() else ""
    m = _FORMAT_RE.search(last)
    if m:
        return tuple(s.lower() for s in m.group(1).split("/") if s)
    if task in TASK_LABELS:
        return TASK_LABELS[task]
    raise ValueError(f"cannot tell the label set of task {task!r} from its instruction")


# -- answers -----------------------------------------------------------------------------------------
def _normalise(text: str) -> str:
    # "Solution 1" / "Answer  2" -> "solution1" / "answer2": the untuned model spaces its labels
    return re.sub(r"\b(solution|answer|option|ending)\s+(\d)\b", r"\1\2", text.lower())


def extract_answer(response: str, labels: Iterable[str]) -> str | None:
    """The first label of `labels` in the response, read after "the correct answer is" when present.

    Case-insensitive; a label must stand as a whole word ("answer1" does not match "answer12").
    Returns None when no label is found (scored as wrong).
    """
    text = _normalise(response)
    cue = text.find(ANSWER_CUE)
    if cue >= 0:
        text = text[cue + len(ANSWER_CUE):]
    labels = sorted({l.lower() for l in labels}, key=len, reverse=True)
    m = re.search(r"\b(" + "|".join(map(re.escape, labels)) + r")\b", text)
    return m.group(1) if m else None


def is_correct(ex: Example, response: str) -> bool:
    return extract_answer(response, ex.labels) == ex.answer.strip().lower()


# -- training tensors --------------------------------------------------------------------------------
IGNORE_INDEX = -100


def encode_for_training(tokenizer, ex: Example, max_len: int = 256) -> dict[str, list[int]]:
    """input_ids/labels of prompt + output + EOS, with labels = IGNORE_INDEX on the prompt tokens.

    The prompt is tokenised on its own so the loss boundary is exact; over-long items are cut from the
    left of the prompt (the response must survive: it is all the loss sees).
    """
    prompt_ids = tokenizer(build_prompt(ex), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ex.output.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep = max_len - len(answer_ids)
    if keep <= 0:
        raise ValueError(f"max_len {max_len} leaves no room for the prompt")
    prompt_ids = prompt_ids[-keep:]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict:
    """Left-padded tensors (input_ids, attention_mask, position_ids, labels) plus `keep`.

    Left padding puts every response at the right edge, so the loss needs logits for the last `keep`
    positions only (`logits_to_keep`): the 49k-wide output head then runs on a handful of tokens per
    row instead of the whole prompt, the largest single saving in memory and time on CPU. Positions
    count from each row's first real token, as `generate` does with left padding.
    """
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    answer_len = 0
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, width - n:] = torch.tensor(b["input_ids"])
        mask[i, width - n:] = 1
        labels[i, width - n:] = torch.tensor(b["labels"])
        answer_len = max(answer_len, sum(1 for t in b["labels"] if t != IGNORE_INDEX))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "keep": min(answer_len + 1, width)}


def response_loss(model, batch: dict, *, reduction: str = "mean"):
    """Cross-entropy on the response tokens only (the loss of the LLM-Adapters recipe without prompt loss).

    reduction="sum" returns (sum of token losses, token count) for exact averages over many batches.
    """
    import torch.nn.functional as F

    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()              # position p predicts token p + 1
    targets = batch["labels"][:, -(keep - 1):]
    flat = logits.reshape(-1, logits.shape[-1])
    if reduction == "sum":
        total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return total, int((targets != IGNORE_INDEX).sum())
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, n_batches: int, seed: int = 0,
                           group: int = 16) -> list[list[int]]:
    """`n_batches` batches of indices in random order, each from items of similar length.

    Items are drawn in a seeded random order (cycling through the set when more are needed), cut into
    groups of `group` batches, sorted by length inside each group and then split: padding stays small
    while every batch is still a random sample of the data (the idea of HF's group_by_length).
    """
    rng = random.Random(seed)
    need = n_batches * batch_size
    order: list[int] = []
    while len(order) < need:
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        order.extend(perm)
    order = order[:need]
    batches = []
    span = batch_size * group
    for start in range(0, need, span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        part = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(part)
        batches.extend(part)
    return batches


# -- evaluation --------------------------------------------------------------------------------------
def generate_responses(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
                       max_new_tokens: int = 10, response_prefix: str = "", progress=None) -> list[str]:
    """Greedy responses, batched with left padding; items sorted by length so padding stays small.

    `response_prefix` is appended to every prompt and returned as the start of every response (e.g.
    "the correct answer is" to score an untuned model that would not follow the answer format).
    """
    import torch

    prompts = [build_prompt(ex) + response_prefix for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     num_beams=1)
                new = gen[:, enc["input_ids"].shape[1]:]
                for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    out[i] = (response_prefix + text).strip()
                if progress is not None:
                    progress(len(chunk))
    finally:
        tokenizer.padding_side = pad_side
    return out  # type: ignore[return-value]


def score(examples: Sequence[Example], responses: Sequence[str]) -> dict:
    """Accuracy plus how many responses named no label at all."""
    preds = [extract_answer(r, ex.labels) for ex, r in zip(examples, responses)]
    correct = sum(p == ex.answer.strip().lower() for p, ex in zip(preds, examples))
    return {"n": len(examples), "correct": correct, "accuracy": correct / max(len(examples), 1),
            "unparsed": sum(p is None for p in preds), "predictions": preds}


# -- the embedded task of the main job ---------------------------------------------------------------
# A rule the base model cannot know: every word belongs to one of four groups named by a compass point
# (animals north, foods south, countries east, jobs west). The untuned model can only guess (chance is
# 25%); a tuned one must learn the rule from the training words and apply it to words it never saw,
# which is what the held-out split holds, so its accuracy measures generalisation, not memorisation.
# Each answer is one token, so scoring compares the four label logits (no free generation).
WORD_GROUPS = {
    "north": """dog cat horse cow pig sheep goat lion tiger bear wolf fox deer rabbit mouse rat elephant giraffe
        zebra monkey gorilla camel kangaroo koala panda squirrel otter beaver whale dolphin shark seal eagle owl
        parrot penguin duck goose chicken frog snake lizard turtle crocodile bee ant spider butterfly""".split(),
    "south": """bread cheese butter rice pasta pizza soup salad apple banana grape lemon cherry strawberry peach pear
        mango pineapple watermelon carrot potato tomato onion garlic cabbage broccoli spinach lettuce cucumber
        pumpkin mushroom bean corn egg bacon sausage ham steak sandwich burger noodle cake cookie pie chocolate
        yogurt honey pancake""".split(),
    "east": """France Germany Italy Spain Portugal Greece Poland Sweden Norway Finland Denmark Ireland Austria
        Switzerland Belgium Netherlands Russia Ukraine Egypt Kenya Nigeria Ghana Morocco Ethiopia India China Japan
        Korea Vietnam Thailand Indonesia Pakistan Iran Iraq Israel Brazil Argentina Chile Peru Colombia Mexico
        Canada Cuba Jamaica Australia Mongolia Nepal Hungary""".split(),
    "west": """teacher doctor nurse lawyer farmer baker butcher plumber carpenter electrician pilot sailor soldier
        firefighter dentist surgeon pharmacist engineer architect scientist chemist programmer accountant banker
        cashier waiter chef driver mechanic painter musician singer actor dancer writer journalist photographer
        librarian judge priest tailor barber gardener fisherman miner secretary janitor clerk""".split(),
}
GROUP_PROMPT = "Group of {word} (north, south, east or west):"  # ~12 tokens: short steps


@dataclass(frozen=True)
class ChoiceItem:
    """A prompt answered by one of `labels`; the answer is the label's token (with its leading space)."""
    prompt: str
    answer: str
    labels: tuple[str, ...]


def word_group_task(held_out_per_group: int = 16, seed: int = 0) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    """(train, held_out): the words of each group split by a seeded shuffle, items interleaved by group.

    Same seed, same split; no word is in both. With the defaults: 128 training and 64 held-out items.
    """
    rng = random.Random(seed)
    labels = tuple(WORD_GROUPS)
    train, held = [], []
    for label, words in WORD_GROUPS.items():
        words = list(words)
        rng.shuffle(words)
        if not 0 < held_out_per_group < len(words):
            raise ValueError(f"held_out_per_group must be in 1..{len(words) - 1}, got {held_out_per_group}")
        held += [ChoiceItem(GROUP_PROMPT.format(word=w), label, labels) for w in words[:held_out_per_group]]
        train += [ChoiceItem(GROUP_PROMPT.format(word=w), label, labels) for w in words[held_out_per_group:]]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The token of " label" for each label; ValueError when one is not a single token."""
    out = []
    for label in labels:
        ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"label {label!r} is {len(ids)} tokens with this tokenizer, not 1")
        out.append(ids[0])
    return out


def encode_choice(tokenizer, item: ChoiceItem) -> dict[str, list[int]]:
    """input_ids/labels of prompt + answer token, the loss on the answer token only (as encode_for_training)."""
    prompt_ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
    answer = label_token_ids(tokenizer, [item.answer])[0]
    return {"input_ids": prompt_ids + [answer], "labels": [IGNORE_INDEX] * len(prompt_ids) + [answer]}


def choice_predictions(last_logits, tokenizer, items: Sequence[ChoiceItem]) -> list[str]:
    """Predicted labels of `items` given `last_logits(list of equal-length id lists) -> [n, vocab]`.

    Items are grouped by prompt length so no batch needs padding or an attention mask: the same
    scorer serves a torch model and an ONNX session that takes input_ids only.
    """
    import numpy as np

    encoded = [tokenizer(it.prompt, add_special_tokens=False)["input_ids"] for it in items]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    preds: list[str | None] = [None] * len(items)
    for idx in by_len.values():
        logits = np.asarray(last_logits([encoded[i] for i in idx]), dtype=np.float32)
        for row, i in zip(logits, idx):
            choices = label_token_ids(tokenizer, items[i].labels)
            preds[i] = items[i].labels[int(np.argmax(row[choices]))]
    return preds  # type: ignore[return-value]


def choice_accuracy(predictions: Sequence[str], items: Sequence[ChoiceItem]) -> float:
    return sum(p == it.answer for p, it in zip(predictions, items)) / max(len(items), 1)


def torch_last_logits(model):
    """A `last_logits` function for choice_predictions from a causal LM (logits of the last position only)."""
    import torch

    def last_logits(ids):
        with torch.inference_mode():
            return model(input_ids=torch.tensor(ids), use_cache=False, logits_to_keep=1).logits[:, -1].float().numpy()

    return last_logits
