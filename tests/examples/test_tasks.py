"""examples/tasks.py: prompt, label sets, answer extraction, data loading, training tensors (no pretrained model)."""
from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import finetune  # noqa: E402
import tasks  # noqa: E402

BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sky blue?"
                        "\n\nAnswer format: true/false",
         "input": "", "output": "the correct answer is true", "answer": "true"}
ARC = {"instruction": "Please choose the correct answer to the question: Which is a planet?\n\nAnswer1: Moon "
                      "Answer2: Mars Answer3: Sun\n\nAnswer format: answer1/answer2/answer3",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
PIQA = {"instruction": "Please choose the correct solution to the question: dry hair\n\nSolution1: towel\n\n"
                       "Solution2: water\n\nAnswer format: solution1/solution2",
        "input": "", "output": "the correct answer is solution1", "answer": "solution1"}


def write_zip(folder: Path, name: str, members: dict[str, list[dict]]) -> Path:
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for member, records in members.items():
            zf.writestr(member, json.dumps(records))
    return path


# -- prompt and labels -------------------------------------------------------------------------------
def test_prompt_is_the_llm_adapters_template():
    ex = tasks.Example(**BOOLQ)
    assert tasks.build_prompt(ex) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n" + BOOLQ["instruction"] + "\n\n### Response:\n")


def test_prompt_with_input_has_its_own_block():
    prompt = tasks.build_prompt(tasks.Example("Add the numbers.", " 2 and 3 ", "5", "5"))
    assert prompt.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")


def test_label_set_comes_from_the_answer_format_line():
    assert tasks.Example(**BOOLQ).labels == ("true", "false")
    assert tasks.Example(**ARC).labels == ("answer1", "answer2", "answer3")
    assert tasks.label_set("Pick one.", "winogrande") == ("option1", "option2")
    with pytest.raises(ValueError):
        tasks.label_set("Pick one.", "unknown-task")


# -- answers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, labels, expected", [
    ("the correct answer is true", ("true", "false"), "true"),
    ("The correct answer is False.", ("true", "false"), "false"),
    ("It is not true that... the correct answer is false", ("true", "false"), "false"),  # the cue wins
    ("false", ("true", "false"), "false"),                                                 # no cue: first label
    ("the correct answer is Solution 2", ("solution1", "solution2"), "solution2"),          # spaced label
    ("the correct answer is answer12", ("answer1", "answer2"), None),                       # whole words only
    ("the correct answer is answer5", ("answer1", "answer2", "answer3", "answer4", "answer5"), "answer5"),
    ("I don't know", ("true", "false"), None),
    ("", ("option1", "option2"), None),
])
def test_extract_answer(response, labels, expected):
    assert tasks.extract_answer(response, labels) == expected


def test_score_counts_correct_and_unparsed():
    exs = [tasks.Example(**BOOLQ), tasks.Example(**ARC), tasks.Example(**PIQA)]
    sc = tasks.score(exs, ["the correct answer is true", "the correct answer is answer1", "no idea"])
    assert (sc["n"], sc["correct"], sc["unparsed"]) == (3, 1, 1)
    assert sc["predictions"] == ["true", "answer1", None]


# -- data --------------------------------------------------------------------------------------------
def test_load_task_reads_the_zip_in_place(tmp_path):
    write_zip(tmp_path, "mini", {"train.json": [BOOLQ, ARC], "test.json": [PIQA]})
    train = tasks.load_task("mini", "train", tmp_path)
    assert [e.answer for e in train] == ["true", "answer2"] and train[0].task == "mini"
    assert tasks.load_task("mini", "test", tmp_path)[0].labels == ("solution1", "solution2")
    with pytest.raises(FileNotFoundError, match="validation"):
        tasks.load_task("mini", "validation", tmp_path)
    with pytest.raises(FileNotFoundError, match="have: mini"):
        tasks.load_task("absent", "test", tmp_path)


def test_load_task_full_set_as_train_and_bad_records(tmp_path):
    write_zip(tmp_path, "whole", {"whole.json": [BOOLQ]})
    assert len(tasks.load_task("whole", "train", tmp_path)) == 1
    write_zip(tmp_path, "broken", {"test.json": [{"instruction": "x"}]})
    with pytest.raises(ValueError, match="record 0"):
        tasks.load_task("broken", "test", tmp_path)


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROADA_DATA", str(tmp_path))
    assert tasks.default_data_dir() == tmp_path
    monkeypatch.delenv("NEUROADA_DATA")
    assert tasks.default_data_dir() == ROOT.parent / "shared" / "data" / "llm-adapters"


@pytest.mark.skipif(not (tasks.default_data_dir() / "boolq.zip").is_file(), reason="shared task data absent")
def test_real_records_parse_and_answer_themselves():
    for name in ("boolq", "piqa", "ARC-Easy"):
        exs = tasks.subset(tasks.load_task(name, "test"), 20, seed=0)
        assert len(exs) == 20
        assert all(tasks.is_correct(e, e.output) for e in exs), name  # the gold output scores as correct


def test_subset_is_fixed_and_ordered():
    items = list(range(100))
    a, b = tasks.subset(items, 10, seed=0), tasks.subset(items, 10, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert tasks.subset(items, 10, seed=1) != a
    assert tasks.subset(items, None) == items and tasks.subset(items, 500) == items


def test_length_grouped_batches_cover_the_requested_steps():
    lengths = [i % 37 for i in range(50)]
    batches = tasks.length_grouped_batches(lengths, 4, 30, seed=0, group=4)
    assert len(batches) == 30 and all(len(b) == 4 for b in batches)
    assert all(0 <= i < 50 for b in batches for i in b)
    assert batches == tasks.length_grouped_batches(lengths, 4, 30, seed=0, group=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < sum(36 for _ in batches) / 2  # grouping keeps items of a batch close in length


# -- training tensors --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """A real word-level fast tokenizer built in memory (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in (BOOLQ, ARC, PIQA) for w in (r["instruction"] + " " + r["output"]).split()}
                   | set(tasks.PROMPT_HEADER.split()) | {"###", "Instruction:", "Response:"})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_encode_masks_the_prompt_and_ends_with_eos(tokenizer):
    enc = tasks.encode_for_training(tokenizer, tasks.Example(**ARC))
    answer = tokenizer(ARC["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(answer)
    assert enc["input_ids"][-n:] == answer and enc["labels"][-n:] == answer
    assert set(enc["labels"][:-n]) == {tasks.IGNORE_INDEX}
    short = tasks.encode_for_training(tokenizer, tasks.Example(**ARC), max_len=n + 3)
    assert len(short["input_ids"]) == n + 3 and short["labels"][-n:] == answer  # prompt cut, answer kept
    with pytest.raises(ValueError):
        tasks.encode_for_training(tokenizer, tasks.Example(**ARC), max_len=n)


def test_left_padded_loss_equals_the_unpadded_loss(tokenizer):
    """The logits_to_keep slice lines up with the labels, and left padding changes nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0)).eval()
    encs = [tasks.encode_for_training(tokenizer, tasks.Example(**r)) for r in (BOOLQ, ARC, PIQA)]
    batch = tasks.collate(encs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(e["input_ids"]) for e in encs)
    assert (batch["position_ids"][batch["attention_mask"] == 1].min()) == 0
    with torch.no_grad():
        total, count = tasks.response_loss(model, batch, reduction="sum")
        ref_total = ref_count = 0.0
        for e in encs:  # HF's own shifted loss on each sequence alone, no padding, every logit kept
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            n = int((labels != tasks.IGNORE_INDEX).sum())
            ref_total += float(model(input_ids=ids, labels=labels).loss) * n
            ref_count += n
    assert count == ref_count
    assert float(total) == pytest.approx(ref_total, rel=1e-4)


# -- results section ---------------------------------------------------------------------------------
def test_results_section_replaces_only_itself(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\na\n\n" + finetune.SECTION + "\n\nold\n\n## B\n\nb\n")
    finetune._replace_section(path, finetune.SECTION + "\n\nnew\n")
    text = path.read_text()
    assert "old" not in text and "new" in text and "## A\n\na\n" in text and text.endswith("## B\n\nb\n")
    path.write_text("# Benchmark results\n\n## A\n\na\n")
    finetune._replace_section(path, finetune.SECTION + "\n\nnew\n")
    assert path.read_text() == "# Benchmark results\n\n## A\n\na\n\n" + finetune.SECTION + "\n\nnew\n"


def test_finetune_help_states_each_default_once(capsys):
    """Every option with a default says it once; none says "(default: None)" after wording its own default."""
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in ("--steps STEPS optimizer steps (default: 100)", "--val VAL", "(default: 0)",
                   "--batch BATCH training items a step (default: 8)"):
        assert option in text
    for segment in re.split(r" (?=--?[a-z])", text.split("options:", 1)[1]):
        assert segment.count("default") <= 1, segment
