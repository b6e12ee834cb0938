"""The language-model arm: answer extraction, response-only labels, a tiny LLaMA trained and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import doran
import doran.training
from doran.data import commonsense as cs
from doran.results import read_json
from doran.training import ByteTokenizer, CausalLMModule, CommonsenseData, evaluate_tasks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"

TINY = dict(name="random-llama", kwargs=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512))

RECORDS = {
    "boolq": {"instruction": "Please answer the following question with true or false, question: is the "
                             "sky blue?\n\nAnswer format: true/false", "input": "",
              "output": "the correct answer is true", "answer": "true"},
    "piqa": {"instruction": "Please choose the correct solution to the question: How to open a jar?\n\n"
                            "Solution1: twist the lid\n\nSolution2: freeze it\n\nAnswer format: "
                            "solution1/solution2", "input": "", "output": "the correct answer is solution1",
             "answer": "solution1"},
}


@pytest.mark.parametrize("task, generated, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "The correct answer is False.", "false"),  # casing
    ("boolq", "I think it is TRUE, because the sky scatters blue light", "true"),  # extra words
    ("boolq", "I do not know", ""),  # no answer
    ("boolq", "true or false? the correct answer is false", "true"),  # several: the first counts
    ("piqa", "the correct answer is solution2</s>", "solution2"),
    ("social_i_qa", "The correct answer is Answer3", "answer3"),
    ("ARC-Challenge", "answer4. Answer1 is wrong", "answer4"),
    ("hellaswag", "the correct answer is ending2", "ending2"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("openbookqa", "answer 2", ""),  # "answer 2" is not a valid answer token
    ("boolq", "### Instruction:\nanswer true/false\n\n### Response:\nthe correct answer is false", "false"),
])
def test_extract_answer(task, generated, expected):
    assert cs.extract_answer(task, generated) == expected


def test_unknown_task_and_missing_file_errors(tmp_path):
    with pytest.raises(cs.CommonsenseDataError, match="unknown task"):
        cs.extract_answer("mmlu", "x")
    with pytest.raises(cs.CommonsenseDataError, match="no commonsense data at .*instruction"):
        cs.load_records(tmp_path / "missing.json")
    bad = tmp_path / "boolq" / "test.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([RECORDS["boolq"], {"instruction": "q", "input": ""}]))
    with pytest.raises(cs.CommonsenseDataError, match="record 1 has no 'output'"):
        cs.load_records(bad)
    with pytest.raises(cs.CommonsenseDataError, match="cannot tell the task"):
        cs.task_of(tmp_path / "mmlu" / "test.json")


def test_labels_cover_the_response_only():
    tok = ByteTokenizer()
    ex = cs.tokenize_for_training(RECORDS["boolq"], tok, cutoff=512)
    prompt_len = len(tok(cs.prompt(RECORDS["boolq"]))["input_ids"])
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    target = [t for t in ex["labels"] if t != -100]
    assert tok.batch_decode([target])[0] == "the correct answer is true"
    assert target[-1] == tok.eos_token_id == ex["input_ids"][-1]
    short = cs.tokenize_for_training(RECORDS["boolq"], tok, cutoff=prompt_len + 5)
    assert len(short["input_ids"]) == prompt_len + 5  # truncated at the cutoff, no EOS


def write_task(root: Path, task: str, n: int) -> Path:
    path = root / task / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([RECORDS[task]] * n))
    return path


def test_tiny_llama_trains_two_steps_and_is_evaluated(tmp_path):
    train = write_task(tmp_path / "train", "boolq", 12)
    tests = [write_task(tmp_path, "boolq", 3), write_task(tmp_path, "piqa", 2)]
    torch.manual_seed(0)
    module = CausalLMModule(lm=TINY, method="doran", adapter=dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
                            lr=1e-2, warmup_steps=0, gradient_checkpointing=True)
    data = CommonsenseData(module.tokenizer, train_paths=[str(train)], val_size=2, batch_size=4, cutoff=400)
    before = {n: p.detach().clone() for n, p, _ in doran.named_adapter_parameters(module.model)}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    moved = [n for n, p, _ in doran.named_adapter_parameters(module.model) if not torch.equal(p, before[n])]
    assert moved  # the adapters trained
    assert doran.is_packed(module.model)  # packed in setup: the trainable tensors by their unpacked names
    assert all(".doran." in n for n in doran.packing.trainable_names(module.model))
    result = evaluate_tasks(module.model, module.tokenizer, tests, batch_size=2, max_new_tokens=4)
    assert set(result["tasks"]) == {"boolq", "piqa"}
    assert result["tasks"]["boolq"]["n"] == 3 and result["tasks"]["piqa"]["n"] == 2
    assert 0.0 <= result["average"] <= 1.0


def test_real_test_sets_parse_and_extract(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("shared commonsense data absent")
    for test in sorted(SHARED.glob("*/test.json")):
        task = cs.task_of(test)
        records = cs.load_records(test, require_answer=True)
        # the gold output, generated verbatim, extracts to the gold answer on every record
        assert all(cs.extract_answer(task, r["output"]) == r["answer"] for r in records), task


def _run_lm(tmp_path, *overrides, check=True, config="experiments/configs/lm_smoke.yaml"):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "experiments.run_lm", "--config", str(config),
           f"out={tmp_path / 'out'}", "runtime.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_run_lm_end_to_end_on_real_format_files(tmp_path):
    from doran.results import read_result

    train = write_task(tmp_path / "train", "boolq", 16)
    tests = [write_task(tmp_path, "boolq", 4), write_task(tmp_path, "piqa", 2)]
    import yaml

    smoke = yaml.safe_load(Path("experiments/configs/lm_smoke.yaml").read_text())
    smoke["data"] = {"train_paths": [str(train)], "test_paths": [str(t) for t in tests], "val_size": 4,
                     "cutoff": 400}
    config = tmp_path / "real_format.yaml"
    config.write_text(yaml.safe_dump(smoke))
    _run_lm(tmp_path, config=config)
    [path] = (tmp_path / "out").glob("*.json.gz")
    result = read_result(path)
    assert result["status"] == "completed"
    assert set(result["evaluation"]["tasks"]) == {"boolq", "piqa"}
    assert result["metrics"]["test/acc"] == result["evaluation"]["average"]
    assert len(result["curves"]["steps"]["loss"]) == result["steps"] == 3  # 12 training records, batch 4
    assert result["tau"]["tau"], "tau trajectories are recorded"
    fresh = doran.training.build_causal_lm(**{"name": "random-llama", "kwargs": TINY["kwargs"]})[0]
    doran.load_adapter(fresh, result["artifacts"]["adapter"])  # the adapter loads into a fresh model


def test_run_lm_missing_file_is_a_clear_error(tmp_path):
    proc = _run_lm(tmp_path, f"data.train_paths=[{tmp_path / 'nope.json'}]", check=False)
    assert proc.returncode == 2
    assert "nope.json does not exist" in proc.stderr and "commonsense-170k format" in proc.stderr
    proc = _run_lm(tmp_path, "model.name=/no/such/llama", check=False)
    assert proc.returncode == 2 and "from_pretrained folder" in proc.stderr


def test_ddp_two_cpu_processes_give_identical_adapters(tmp_path):
    from safetensors.torch import load_file

    _run_lm(tmp_path, "train.devices=2", "train.strategy=ddp", "train.max_steps=2",
            "runtime.save_rank_adapters=true")
    [run_dir] = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    rank0 = load_file(run_dir / "adapter.rank0.safetensors")
    rank1 = load_file(run_dir / "adapter.rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    merged = load_file(run_dir / "adapter.safetensors")
    assert all(torch.equal(merged[n], rank0[n]) for n in rank0)
    result = read_json(next((tmp_path / "out").glob("*.json.gz")))
    assert result["world_size"] == 2 and result["steps"] == 2


def test_ddp_loss_curve_matches_one_process_with_the_same_global_batch(tmp_path):
    import yaml

    smoke = yaml.safe_load(Path("experiments/configs/lm_smoke.yaml").read_text())
    smoke["data"]["synthetic"] = {"n": 64, "length": 32, "shuffle": False}
    smoke["adapter"]["dropout"] = 0.0
    config = tmp_path / "paired.yaml"
    config.write_text(yaml.safe_dump(smoke))
    _run_lm(tmp_path, "train.max_steps=3", "train.batch_size=8", config=config)
    _run_lm(tmp_path, "train.max_steps=3", "train.batch_size=4", "train.devices=2", "train.strategy=ddp",
            config=config)
    runs = {r["world_size"]: r for r in (read_json(p) for p in (tmp_path / "out").glob("*.json.gz"))}
    one, two = runs[1]["curves"]["steps"]["loss"], runs[2]["curves"]["steps"]["loss"]
    assert len(one) == len(two) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
