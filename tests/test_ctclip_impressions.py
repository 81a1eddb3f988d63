"""scripts/ctclip_impressions.py end to end on a tiny randomly initialised Llama built here (no network).

The transformers backend runs for real; vLLM is not installed, so its backend is checked against a
fake `vllm` module (the real vLLM path is not exercised by this suite).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ctclip.data.impressions import (
    INSTRUCTION,
    ExamplePool,
    Report,
    build_prompt,
    clean_generation,
    fit_prompt,
    read_records,
    scan_key,
)
from ctclip.data.reports import load_reports
from ctclip.run.impressions_backends import STOP_MARKERS, TransformersBackend
from scripts.ctclip_impressions import main

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")
# (VolumeName, Findings_EN, Impressions_EN)
ROWS = [
    ("valid_1_a_1.nii.gz", "No pleural effusion.", "Normal chest CT."),
    ("valid_2_a_1.nii.gz", "Heart size is normal. No pleural effusion.", "No acute findings."),
    ("valid_3_a_1.nii.gz", "Emphysema in both upper lobes. Small nodule in the right lower lobe.",
     "Emphysema. Right lower lobe nodule."),
    ("valid_4_a_1.nii.gz", "Bilateral pleural effusion with atelectasis in the lower lobes. Heart size is increased. "
     "Pericardial effusion is present.", "Bilateral pleural effusion. Cardiomegaly. Pericardial effusion."),
    ("valid_5_a_1.nii.gz", "Consolidation in the left lower lobe. Mediastinal lymph nodes are enlarged. Coronary artery "
     "calcification. Arterial wall calcification in the aorta. No pleural effusion. Heart size is normal.",
     "Left lower lobe consolidation, pneumonia. Lymphadenopathy. Coronary artery calcification."),
    ("valid_6_a_1.nii.gz", "Ground glass opacity in both lungs. Interlobular septal thickening. Bronchiectasis in the "
     "lower lobes. Peribronchial thickening. Mosaic attenuation pattern. Hiatal hernia. Heart size is normal. "
     "No pleural effusion. No lymph nodes of pathological size.",
     "Findings of interstitial lung disease. Bronchiectasis. Hiatal hernia."),
    ("valid_7_b_1.nii.gz", "Nodule in the left upper lobe.", "Left upper lobe nodule."),
    ("valid_8_a_1.nii.gz", "Atelectasis in the right lower lobe. Heart size is normal.", "Right lower lobe atelectasis."),
    # missing impressions
    ("valid_8_a_2.nii.gz", "Atelectasis in the right lower lobe, heart size is normal.", NAN),  # same scan as valid_8_a_1
    ("valid_9_a_1.nii.gz", "Nodule in the left upper lobe.", "Not given."),  # same findings as valid_7_b_1
    ("valid_10_a_1.nii.gz", "Emphysema in both lungs. Pleural effusion on the right.", "   "),
    ("valid_11_a_1.nii.gz", "Heart size is increased. Pericardial effusion.", NAN),
    ("valid_12_a_1.nii.gz", NAN, NAN),  # nothing to complete from
    ("valid_13_a_1.nii.gz", "Not given.", "Not given."),
]
TARGETS = ["valid_8_a_2.nii.gz", "valid_9_a_1.nii.gz", "valid_10_a_1.nii.gz", "valid_11_a_1.nii.gz"]
NO_FINDINGS = ["valid_12_a_1.nii.gz", "valid_13_a_1.nii.gz"]
COMPLETE = [r[0] for r in ROWS[:8]]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant{% endif %}")


def write_reports(path: Path, rows=ROWS) -> Path:
    df = pd.DataFrame(rows, columns=["VolumeName", "Findings_EN", "Impressions_EN"])
    df.insert(1, "ClinicalInformation_EN", "Not given.")
    df.insert(2, "Technique_EN", "Non-contrast chest CT, 1 mm slices.")
    df = df[["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]]
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is too small to share out: with two threads on a busy 2-core machine every step
    waits on a thread barrier (1.5 s per generate call instead of 10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer trained on the report words and a 2-layer Llama with random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    texts = [t for row in ROWS for t in row[1:] if isinstance(t, str)]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    # no pad token on purpose: the backend must fall back to eos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # special tokens never win a greedy step: every generation has words in it
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_chat_lm(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_chat_lm") / "model"
    shutil.copytree(tiny_lm, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def reports_csv(tmp_path: Path) -> Path:
    return write_reports(tmp_path / "reports.csv")


def args(csv: Path, out: Path, model: Path, *extra: str, **flags: object) -> list[str]:
    """The command line of a quick run; `flags` override the defaults below (None leaves a flag out)."""
    flags = {"num_examples": 3, "max_new_tokens": 6, "batch_size": 2, "device": "cpu", **flags}
    argv = ["--target_file", str(csv), "--output_file", str(out), "--model", str(model)]
    for k, v in flags.items():
        argv += [] if v is None else [f"--{k}", str(v)]
    return argv + list(extra)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every prompt batch the transformers backend generates for (the real generate still runs)."""
    calls: list[list[str]] = []
    real = TransformersBackend.generate

    def counting(self, prompts, add_special_tokens):
        calls.append([p for p in prompts])
        return real(self, prompts, add_special_tokens)

    monkeypatch.setattr(TransformersBackend, "generate", counting)
    return calls


def test_completes_only_missing_rows(tiny_lm, reports_csv, tmp_path, generate_calls, capsys):
    config = tmp_path / "impressions.yaml"
    config.write_text("num_examples: 2\nmax_new_tokens: 5\n")
    out = tmp_path / "out" / "completed.jsonl"
    assert main(["--config", str(config), *args(reports_csv, out, tiny_lm, num_examples=None, max_new_tokens=None,
                                                 batch_size=3)]) == 0
    recs = records(out)
    assert [r["VolumeName"] for r in recs] == TARGETS
    assert [len(c) for c in generate_calls] == [3, 1]
    for r in recs:
        assert r["model"] == str(tiny_lm.resolve()) and r["backend"] == "transformers"
        assert r["prompt_sha256"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
        assert r["settings"] == {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 42, "num_examples": 2}
        assert r["prompt_style"] == "plain" and r["prompt"].startswith(INSTRUCTION)
        assert r["generated"] and r["generated"] == clean_generation(r["raw"])
        assert len(r["examples"]) == 2 and r["prompt_tokens"] > 0
    summary = json.loads((tmp_path / "out" / "completed.summary.json").read_text())
    assert {k: summary[k] for k in ("reports", "missing_impressions", "generated", "already_present",
                                    "skipped_no_findings", "failed", "examples_pool")} == \
        {"reports": 14, "missing_impressions": 6, "generated": 4, "already_present": 0,
         "skipped_no_findings": 2, "failed": 0, "examples_pool": 8}
    errors = pd.read_csv(tmp_path / "out" / "completed.errors.csv")
    assert list(errors["VolumeName"]) == NO_FINDINGS and errors["reason"].str.contains("findings empty").all()
    assert (tmp_path / "out" / "completed.config.yaml").is_file()
    assert "4 done, 2 skipped (no findings), 0 already present, 0 failed" in capsys.readouterr().out


def test_examples_are_deterministic_diverse_and_never_the_target(reports_csv, tiny_lm, tmp_path):
    reports = load_reports(reports_csv)
    pool = ExamplePool(reports)
    assert [r.volume_name for r in pool.reports] == sorted(COMPLETE, key=lambda v: (len(reports.loc[v, "Findings_EN"]), v))
    target = Report("valid_8_a_2.nii.gz", reports.loc["valid_8_a_2.nii.gz", "Findings_EN"])
    every = pool.select(target, 8)
    assert "valid_8_a_1.nii.gz" not in {r.volume_name for r in every} and len(every) == 7  # same scan left out
    same_text = Report("valid_9_a_1.nii.gz", "Nodule in the  left upper lobe.")
    assert "valid_7_b_1.nii.gz" not in {r.volume_name for r in pool.select(same_text, 8)}
    three = pool.select(target, 3)
    assert three == pool.select(target, 3)  # deterministic
    lengths = [len(r.findings) for r in pool.reports if r.volume_name != "valid_8_a_1.nii.gz"]
    assert [len(r.findings) for r in three] == [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
    assert scan_key("valid_8_a_2.nii.gz") == scan_key("valid_8_a_1.nii.gz") == "valid_8_a"
    assert pool.select(target, 0) == []
    # ties in length are broken by VolumeName
    tied = ExamplePool(pd.DataFrame({"VolumeName": ["b", "a"], "Findings_EN": ["x", "y"], "Impressions_EN": ["i", "j"]}))
    assert [r.volume_name for r in tied.reports] == ["a", "b"]
    # end to end: the records name their examples; none is the target's scan or findings twin
    out = tmp_path / "o.jsonl"
    assert main(args(reports_csv, out, tiny_lm, num_examples=8, max_new_tokens=2, batch_size=4)) == 0
    by_name = {r["VolumeName"]: r for r in records(out)}
    assert "valid_8_a_1.nii.gz" not in by_name["valid_8_a_2.nii.gz"]["examples"]
    assert "valid_7_b_1.nii.gz" not in by_name["valid_9_a_1.nii.gz"]["examples"]
    assert len(by_name["valid_10_a_1.nii.gz"]["examples"]) == 8


def test_resume_after_a_kill_does_not_regenerate(tiny_lm, reports_csv, tmp_path, monkeypatch, generate_calls):
    out = tmp_path / "completed.jsonl"
    real = TransformersBackend.generate  # the counting wrapper

    class Killed(Exception):
        pass

    def dies_after_one_batch(self, prompts, special):
        if generate_calls:
            raise Killed
        return real(self, prompts, special)

    monkeypatch.setattr(TransformersBackend, "generate", dies_after_one_batch)
    with pytest.raises(Killed):
        main(args(reports_csv, out, tiny_lm))
    assert [r["VolumeName"] for r in records(out)] == TARGETS[:2]
    with out.open("a") as f:  # a record cut by the kill
        f.write('{"VolumeName": "valid_10_a_1.nii.gz", "generated": "Pleu')
    monkeypatch.setattr(TransformersBackend, "generate", real)
    generate_calls.clear()
    assert main(args(reports_csv, out, tiny_lm)) == 0
    assert [len(c) for c in generate_calls] == [2]  # only the two rows not done
    assert [r["VolumeName"] for r in records(out)] == TARGETS
    summary = json.loads(out.with_name("completed.summary.json").read_text())
    assert summary["generated"] == 2 and summary["already_present"] == 2
    # a third run has nothing to do and does not even load the model
    monkeypatch.setattr(TransformersBackend, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    assert main(args(reports_csv, out, tiny_lm)) == 0
    assert len(records(out)) == 4


def test_limit_then_resume(tiny_lm, reports_csv, tmp_path, generate_calls, capsys):
    out = tmp_path / "completed.jsonl"
    assert main(args(reports_csv, out, tiny_lm, "--limit", "3")) == 0
    assert len(records(out)) == 3 and "1 left for a later run" in capsys.readouterr().out
    # a last record complete but for its newline must not swallow the next one
    out.write_text(out.read_text().rstrip("\n"))
    assert read_records(out)[0].keys() == set(TARGETS[:3])
    generate_calls.clear()
    assert main(args(reports_csv, out, tiny_lm)) == 0
    assert sum(map(len, generate_calls)) == 1
    assert [r["VolumeName"] for r in records(out)] == TARGETS


def test_sampling_is_seeded(tiny_lm, reports_csv, tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        out = tmp_path / name
        assert main(args(reports_csv, out, tiny_lm, "--temperature", "1.5", "--seed", "7", "--top_p", "0.9")) == 0
        outs.append([r["generated"] for r in records(out)])
        assert records(out)[0]["settings"]["temperature"] == 1.5
    assert outs[0] == outs[1]


def test_merge_into_fills_only_missing_rows(tiny_lm, reports_csv, tmp_path):
    out, merged_csv = tmp_path / "completed.jsonl", tmp_path / "merged" / "reports_completed.csv"
    assert main(args(reports_csv, out, tiny_lm, "--merge_into", str(merged_csv))) == 0
    original = pd.read_csv(reports_csv, dtype=str, keep_default_na=False).set_index("VolumeName")
    merged = pd.read_csv(merged_csv, dtype=str, keep_default_na=False).set_index("VolumeName")
    assert list(merged.columns) == [*original.columns, "Impressions_source"]
    pd.testing.assert_frame_equal(merged.loc[COMPLETE, original.columns], original.loc[COMPLETE])
    assert (merged.loc[COMPLETE, "Impressions_source"] == "original").all()
    generated = {r["VolumeName"]: r["generated"] for r in records(out)}
    assert merged.loc[TARGETS, "Impressions_EN"].to_dict() == generated
    assert (merged.loc[TARGETS, "Impressions_source"] == f"generated:{tiny_lm.resolve()}").all()
    assert (merged.loc[NO_FINDINGS, "Impressions_source"] == "missing").all()
    pd.testing.assert_frame_equal(merged.loc[NO_FINDINGS, original.columns], original.loc[NO_FINDINGS])
    summary = json.loads(out.with_name("completed.summary.json").read_text())
    assert summary["merge"] == {"original": 8, "generated": 4, "missing": 2}
    # merging again from the finished output regenerates nothing and gives the same file
    before = merged_csv.read_bytes()
    assert main(args(reports_csv, out, tiny_lm, "--merge_into", str(merged_csv))) == 0
    assert merged_csv.read_bytes() == before
    assert main(args(reports_csv, out, tiny_lm, "--merge_into", str(reports_csv))) == 2


def test_output_of_another_model_is_refused(tiny_lm, tiny_chat_lm, reports_csv, tmp_path, caplog):
    out = tmp_path / "completed.jsonl"
    assert main(args(reports_csv, out, tiny_lm, "--limit", "1")) == 0
    before = out.read_bytes()
    assert main(args(reports_csv, out, tiny_chat_lm)) == 2
    assert f"holds impressions from model {tiny_lm.resolve()}" in caplog.text and str(tiny_chat_lm.resolve()) in caplog.text
    assert out.read_bytes() == before


def test_chat_template_prompts(tiny_lm, tiny_chat_lm, reports_csv, tmp_path, caplog):
    out = tmp_path / "chat.jsonl"
    assert main(args(reports_csv, out, tiny_chat_lm)) == 0
    rec = records(out)[0]
    assert rec["prompt_style"] == "chat"
    assert rec["prompt"].startswith(f"<s>system {INSTRUCTION}\n<s>user Findings: ") and rec["prompt"].endswith("<s>assistant")
    assert main(args(reports_csv, tmp_path / "plain.jsonl", tiny_chat_lm, "--prompt_style", "plain")) == 0
    assert records(tmp_path / "plain.jsonl")[0]["prompt_style"] == "plain"
    assert main(args(reports_csv, tmp_path / "x.jsonl", tiny_lm, "--prompt_style", "chat")) == 2
    assert "has no chat template" in caplog.text


def test_chat_template_without_system_role():
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = template
    prompt = build_prompt([Report("e", "F1.", "I1.")], Report("t", "F2."), "chat", tok)
    assert prompt == f"[user] {INSTRUCTION}\n\nFindings: F1. [assistant] I1. [user] Findings: F2. "


def test_long_prompts_drop_the_longest_examples():
    examples = [Report(f"v{i}", "w " * n, "i " * m) for i, (n, m) in enumerate([(2, 1), (5, 1), (9, 9), (20, 1)])]
    target = Report("t", "a b c")

    def build(ex):
        return build_prompt(ex, target, "plain")

    def words(p):
        return len(p.split())

    base = words(build([]))
    block = [2 + 1 + len(e.findings.split()) + len(e.impression.split()) for e in examples]  # labels + "###" + words
    prompt, kept, n = fit_prompt(examples, target, build, words, base + block[0] + block[1] + 4, max_new_tokens=4)
    assert [e.volume_name for e in kept] == ["v0", "v1"] and n == words(prompt) == base + block[0] + block[1]
    assert fit_prompt(examples, target, build, words, None, 4)[1] == examples
    assert fit_prompt(examples, target, build, words, base + 3, max_new_tokens=4) is None


def test_prompt_too_long_fails_the_row_with_exit_3(tiny_lm, reports_csv, tmp_path):
    from transformers import AutoTokenizer

    tokenizer, reports = AutoTokenizer.from_pretrained(tiny_lm), load_reports(reports_csv)
    alone = {t: len(tokenizer(build_prompt([], Report(t, reports.loc[t, "Findings_EN"]), "plain"))["input_ids"])
             for t in TARGETS}
    context = max(alone.values()) + 6 - 1  # the longest target cannot fit even without examples
    out = tmp_path / "completed.jsonl"
    assert main(args(reports_csv, out, tiny_lm, num_examples=8, max_model_len=context)) == 3
    recs = records(out)
    assert {r["VolumeName"] for r in recs} == {t for t in TARGETS if alone[t] + 6 <= context}
    assert all(r["prompt_tokens"] + 6 <= context for r in recs) and any(len(r["examples"]) < 7 for r in recs)
    errors = pd.read_csv(tmp_path / "completed.errors.csv")
    assert set(errors["VolumeName"]) - set(NO_FINDINGS) == {t for t in TARGETS if alone[t] + 6 > context}
    assert errors["reason"].str.contains(f"{context}-token context").any()


def test_empty_generation_is_reported(tiny_lm, reports_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(TransformersBackend, "generate", lambda self, prompts, special: ["### Findings: x"] * len(prompts))
    out = tmp_path / "completed.jsonl"
    assert main(args(reports_csv, out, tiny_lm)) == 3
    assert all(r["generated"] == "" for r in records(out))
    errors = pd.read_csv(tmp_path / "completed.errors.csv")
    assert set(errors["VolumeName"]) == set(TARGETS + NO_FINDINGS)


def test_clean_generation():
    assert clean_generation(" Impression: Bilateral effusion.\n\n###\n\nFindings: more") == "Bilateral effusion."
    assert clean_generation("**Impression:** Normal chest CT.\nFindings: x") == "Normal chest CT."
    assert clean_generation("1. Emphysema.\n2. Nodule.\n\nTechnique: ...") == "1. Emphysema.\n2. Nodule."
    assert clean_generation("Findings: only an echo") == ""
    assert all(clean_generation(f"ok {m} more") == "ok" for m in STOP_MARKERS)


@pytest.mark.parametrize("case, message", [
    ("missing_file", "no such file"),
    ("empty_file", "not a readable CSV"),
    ("header_only", "has no rows"),
    ("missing_column", "missing column(s) 'Impressions_EN'"),
    ("bad_model", "cannot load model"),
    ("no_model", "--model is required"),
    ("bad_batch_size", "--batch_size must be >= 1"),
    ("no_examples", "no complete report"),
])
def test_bad_inputs_exit_2(case, message, tiny_lm, tmp_path, caplog):
    csv, model = tmp_path / "reports.csv", tiny_lm
    if case == "empty_file":
        csv.write_text("")
    elif case == "header_only":
        write_reports(csv, rows=[])
    elif case == "missing_column":
        write_reports(csv)
        pd.read_csv(csv).drop(columns="Impressions_EN").to_csv(csv, index=False)
    elif case == "bad_model":
        write_reports(csv)
        model = tmp_path / "no_such_model"
    elif case == "no_examples":
        write_reports(csv, rows=[r for r in ROWS if r[0] not in COMPLETE])
    elif case in ("no_model", "bad_batch_size"):
        write_reports(csv)
    argv = args(csv, tmp_path / "out.jsonl", model, batch_size=0 if case == "bad_batch_size" else 2)
    if case == "no_model":
        argv = argv[:4] + argv[6:]
    assert main(argv) == 2
    assert message in caplog.text
    named = {"bad_model": str(model), "no_examples": str(csv), "no_model": "", "bad_batch_size": ""}
    assert named.get(case, str(csv)) in caplog.text


def test_examples_from_another_file(tiny_lm, reports_csv, tmp_path):
    examples_csv = write_reports(tmp_path / "train_reports.csv", rows=[
        ("train_1_a_1.nii.gz", "Small nodule in the right lower lobe.", "Right lower lobe nodule."),
        ("train_2_a_1.nii.gz", "No pleural effusion.", "Not given."),  # not a complete report
        ("valid_8_a_1.nii.gz", "Heart size is normal.", "Normal heart."),  # the target's own scan
    ])
    out = tmp_path / "completed.jsonl"
    assert main(args(reports_csv, out, tiny_lm, examples_file=examples_csv)) == 0
    examples = {r["VolumeName"]: r["examples"] for r in records(out)}
    assert examples["valid_8_a_2.nii.gz"] == ["train_1_a_1.nii.gz"]
    assert examples["valid_9_a_1.nii.gz"] == ["valid_8_a_1.nii.gz", "train_1_a_1.nii.gz"]  # shortest first


def test_vllm_missing_gives_install_message(reports_csv, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, even where it is installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args(reports_csv, tmp_path / "out.jsonl", tmp_path, "--backend", "vllm")) == 2
    assert "uv sync --extra llm" in caplog.text


def test_vllm_backend_with_a_fake_engine(tiny_lm, reports_csv, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    engines = []

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class FakeLLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=1024))
            engines.append(self)

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_lm)

        def generate(self, inputs, params, use_tqdm=True):
            self.calls.append((inputs, params))
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"Impression: fake {len(x['prompt_token_ids'])}.\n"
                                                                  "### Findings: next")]) for x in inputs]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "vllm.jsonl"
    assert main(args(reports_csv, out, tiny_lm, "--backend", "vllm", "--temperature", "0.7", "--seed", "5",
                     "--top_p", "0.9", "--tensor_parallel_size", "2", device=None)) == 0
    (engine,) = engines
    assert engine.kwargs == {"model": str(tiny_lm), "seed": 5, "tensor_parallel_size": 2}
    assert [len(inputs) for inputs, _ in engine.calls] == [2, 2]
    assert engine.calls[0][1].kwargs == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 6, "seed": 5,
                                         "stop": list(STOP_MARKERS)}
    ids = engine.calls[0][0][0]["prompt_token_ids"]
    assert all(isinstance(i, int) for i in ids)
    recs = records(out)
    assert [r["VolumeName"] for r in recs] == TARGETS and {r["backend"] for r in recs} == {"vllm"}
    assert recs[0]["generated"] == f"fake {len(ids)}." and recs[0]["prompt_tokens"] == len(ids)


def test_no_module_imports_vllm_or_crosses_packages():
    """vllm only inside the vLLM backend; ctclip never imports hemorrhage."""
    offenders = []
    for path in [*REPO.glob("ctclip/**/*.py"), *REPO.glob("ctcore/**/*.py"), *REPO.glob("scripts/*.py"),
                 *REPO.glob("hemorrhage/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                root = name.split(".")[0]
                rel = path.relative_to(REPO).as_posix()
                if root == "vllm" and rel != "ctclip/run/impressions_backends.py":
                    offenders.append((rel, name))
                if root == "hemorrhage" and rel.startswith("ctclip/"):
                    offenders.append((rel, name))
    assert offenders == []
