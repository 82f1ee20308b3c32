"""The README's Python examples run as written, in order, on a tiny model (nothing downloaded).

A newcomer copies these first; an example that drifted from the API loses them in their first hour. Each
```python block is executed in one namespace, in a scratch folder, with the README's placeholders pointed at
real files: "path/to/model" is a tiny Llama saved with save_pretrained, "model.Q4_1.gguf" a Q4_1 GGUF of the
same weights. Only what a block leaves undefined on purpose (the training data, the weight `W` of the format
examples) is given, and a block that starts from a fresh model gets one.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402

import neuroada_format as naf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "converters"))
from test_gguf import hf_arrays, write_gguf  # noqa: E402  (the tiny GGUF generator)

README = os.path.join(os.path.dirname(HERE), "README.md")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def command(prefix: str) -> list[str]:
    """The README's shell command that starts with `prefix`, comment dropped, split as a shell would."""
    with open(README, encoding="utf-8") as f:
        line = next(ln for ln in f if ln.startswith(prefix))
    return shlex.split(line, comments=True)


def plain_model(gguf_path):
    """The GGUF's de-quantized weights in a plain model (what the README's train_on_grid example starts from)."""
    read = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path) or ".",
                                                             gguf_file=os.path.basename(gguf_path),
                                                             dtype=torch.float32)
    config = copy.deepcopy(read.config)
    del config.quantization_config
    plain = type(read)(config).eval()
    plain.load_state_dict(read.state_dict())
    return plain


def token_data(n=8, seq=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, seq), generator=g)]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 6, "a README example was added or removed: give it its setting below"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    gguf_path = write_gguf(tmp_path / "model.Q4_1.gguf", hf_arrays(), QT.Q4_1).name
    plain_model(gguf_path).save_pretrained("hf-model")
    places = {"path/to/model": "hf-model", "path/to/hf-model-folder": "hf-model"}
    ns: dict = {"__name__": "readme"}

    def run(i: int, **given) -> dict:
        src = blocks[i]
        for placeholder, real in places.items():
            src = src.replace(placeholder, real)
        ns.update(given)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' and torch's own notes about tiny models
            exec(compile(src, f"README.md python block {i + 1}", "exec"), ns)
        return ns

    # 1. attach, count, save a folder and a file
    run(0)
    assert os.path.isfile("task-adapter/neuroada_config.json") and os.path.isfile("task.safetensors")
    assert naf.load("task.safetensors").targets

    # 2. Trainer: train, save, load the result onto a fresh base
    run(1, data=token_data())
    assert os.path.isfile("runs/x/final/neuroada_model.safetensors")
    served = ns["served"]
    assert any(p.abs().sum() > 0 for n, p in served.named_parameters() if "neuroada_val" in n)  # it trained

    # 3. training on the GGUF's grid, with a Trainer built around the fresh de-quantized model
    model = plain_model(gguf_path)
    args = transformers.TrainingArguments("runs/grid", max_steps=2, report_to=[], use_cpu=True)
    run(2, model=model, trainer=transformers.Trainer(model=model, args=args, train_dataset=token_data()))
    assert os.path.isfile("out/neuroada_model.safetensors")

    # 4. the format, numpy only: load, validate against the base folder, merge (5, building one, comes last)
    W = np.asarray(transformers.AutoModelForCausalLM.from_pretrained("hf-model").state_dict()[
        "model.layers.0.self_attn.q_proj.weight"].numpy())
    run(3, W=W)
    assert ns["report"].ok and ns["merged"].shape == W.shape
    # 6. PEFT loads the folder the README's `neuroada-pack --to peft` command writes from the quickstart's
    # task.safetensors, by the README's Python (run before block 5, which writes another task.safetensors)
    # Both lines of the README's block run in order, as a reader pastes them: the import back once wrote over the
    # adapter the export had just read ('output already exists', exit 2)
    bin_dir = os.path.dirname(sys.executable)
    for prefix in ("neuroada-pack --to peft task.safetensors", "neuroada-pack --from-peft task-peft/"):
        argv = [a.replace("path/to/model", "hf-model") for a in command(prefix)]
        proc = subprocess.run([os.path.join(bin_dir, argv[0]), *argv[1:]], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (prefix, proc.stdout + proc.stderr)
    back, sent = naf.load(argv[argv.index("-o") + 1]), naf.load("task.safetensors")
    assert back.targets.keys() == sent.targets.keys()
    for name, t in sent.targets.items():  # ("exactly", as the README says)
        assert np.array_equal(back.targets[name].indices, t.indices)
        v = back.targets[name].values
        assert v.dtype == t.values.dtype and v.tobytes() == t.values.tobytes()
    run(5)
    import peft
    # --base set task_type from the folder's config, so PEFT wraps it as a causal LM
    assert type(ns["model"]) is peft.PeftModelForCausalLM
    assert ns["model"].peft_config["default"].peft_type == "SUPERTUNING"

    run(4, values=np.zeros((W.shape[0], 20), dtype=np.float32))  # builds an adapter for one weight, saved over it
    saved = naf.load("task.safetensors")
    assert saved.targets.keys() == {"model.layers.0.mlp.down_proj.weight"}
    assert saved.targets["model.layers.0.mlp.down_proj.weight"].value_dtype == "BF16"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_of_the_docs_leads_somewhere():
    """The README is short and sends readers to docs/ for the details: a link that leads nowhere strands them."""
    root = os.path.dirname(HERE)
    pages = [README, os.path.join(root, "bench", "README.md")]
    pages += sorted(os.path.join(root, "docs", n) for n in os.listdir(os.path.join(root, "docs")) if n.endswith(".md"))
    checked = 0
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # (code blocks hold no links)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # (an absolute URL: not checked offline)
            path, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(where), f"{os.path.relpath(page, root)}: link to {target!r} leads nowhere"
            if anchor:
                with open(where, encoding="utf-8") as f:
                    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", f.read(), flags=re.M)}
                assert anchor in anchors, f"{os.path.relpath(page, root)}: no heading for {target!r}"
            checked += 1
    assert checked >= 15  # (the README's table of pages alone has 8)
