"""The msopt command line: configs (round trip, one-line errors, --set), one's own data (txt, glob, JSONL, token
files), the shipped example configs run in a tiny size, generate / eval / export (reloaded by transformers with equal
logits), the metrics logger, and a two-process torchrun launch equal to one process."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msopt.cli import load_run, main, save_final_model
from msopt.config import (
    ConfigError,
    DataSpec,
    apply_override,
    dump_config,
    load_config,
    load_documents,
    parse_config,
    split_for_validation,
    tomllib,
)
from msopt.data import save_tokens, train_tokenizer
from msopt.loggers import MetricsLogger, read_metrics
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig
from msopt.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
TINY = ["--set", "train.progress=false"]


def minimal(**extra) -> dict:
    "A small valid config as a mapping, with `extra` top-level keys."
    return {"data": {"plays": {"corpus": "shakespeare", "max_docs": 2, "max_chars": 3000}},
            "stages": [{"kind": "pretrain", "data": "plays", "steps": 2}], **extra}


# -- configs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_round_trip(path):
    cfg = load_config(path)
    again = parse_config(tomllib.loads(dump_config(cfg)))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert cfg.out == f"runs/{path.stem}"


def test_yaml_config_reads_like_toml(tmp_path):
    yaml = pytest.importorskip("yaml")
    toml_cfg = load_config(CONFIGS[0])
    path = tmp_path / f"{CONFIGS[0].stem}.yaml"
    path.write_text(yaml.safe_dump(tomllib.loads(CONFIGS[0].read_text())))
    assert load_config(path) == toml_cfg


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"kind": "pretrain", "data": "plays", "step": 2}]},
     r"stages\[0\] \(pretrain\): unknown key 'step': did you mean 'steps'\?"),
    ({"stages": [{"kind": "pretrian", "data": "plays"}]}, r"stages\[0\]: unknown stage kind 'pretrian': did you mean"),
    ({"stages": [{"data": "plays"}]}, r"stages\[0\]: missing required key 'kind'"),
    ({"stages": [{"kind": "pretrain"}]}, r"stages\[0\] \(pretrain\): missing required key 'data'"),
    ({"stages": [{"kind": "pretrain", "data": "poems"}]}, r"stages\[0\] \(pretrain\)\.data: there is no data source"),
    ({"stages": []}, r"missing required key 'stages'"),
    ({"model": {"n_layer": "two"}}, r"model: n_layer must be a positive int, got 'two'"),
    ({"model": {"prest": "tiny"}}, r"model: unknown key 'prest': did you mean 'preset'\?"),
    ({"model": {"hf": "gpt2", "n_layer": 2}}, r"model: 'n_layer' would change the architecture of pretrained"),
    ({"data": {"plays": {"corpus": "shakespeare", "max_chars": "lots"}}},
     r"data\.plays\.max_chars must be int \| None, got 'lots'"),
    ({"data": {"plays": {"files": ["a.txt"], "jsonl": "b.jsonl"}}},
     r"data\.plays: give exactly one of .* files and jsonl"),
    ({"data": {"plays": {"corpus": "dickens"}}}, r"data\.plays\.corpus: unknown corpus 'dickens'"),
    ({"data": {"plays": {"files": "*.txt", "label_field": "y"}}}, r"data\.plays\.label_field names a field of jsonl"),
    ({"tokenizer": {"vocab_size": 512.5}}, r"tokenizer\.vocab_size must be int, got 512\.5"),
    ({"train": {"warmup_step": 3}}, r"train: unknown key 'warmup_step': did you mean 'warmup_steps'\?"),
    ({"distributed": "zero3"}, r"distributed: unknown mode 'zero3'"),
    ({"stages": [{"kind": "finetune", "data": "plays"}]}, r"classification needs labels: set label_field"),
    ({"stages": [{"kind": "domain_adapt", "data": "plays", "keywords": 20}]}, r"add keywords_against"),
    ({"seeds": 1}, r"config: unknown key 'seeds': did you mean 'seed'\?"),
])
def test_config_errors_are_one_line_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({**minimal(), **change})
    assert "\n" not in str(info.value)


def test_value_errors_of_a_stage_name_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\] \(pretrain\): TrainConfig.lr must be a positive number"):
        load_config(CONFIGS[0], ["stages.0.lr=-1"])                    # the recipe: checked as the config is read
    cfg = load_config(CONFIGS[0], ["stages.0.objective=clmx"], out=tmp_path)
    from msopt.cli import RunBuilder
    builder = RunBuilder(cfg)
    builder.tokenizer = builder.train_tokenizer()
    with pytest.raises(ConfigError, match=r"stages\[0\] \(pretrain\): unknown objective 'clmx'"):
        builder.stages()                                                # the stage's own: checked as it is built


def test_set_overrides_dotted_keys():
    raw = minimal()
    for assignment in ("stages.0.steps=7", "model.n_layer=3", "out=runs/x", 'data.plays.genres=["comedy"]',
                       "stages.0.lr=1e-3"):
        apply_override(raw, assignment)
    cfg = parse_config(raw)
    assert cfg.stages[0].args == {"steps": 7, "lr": 1e-3} and cfg.model.overrides == {"n_layer": 3}
    assert cfg.out == "runs/x" and cfg.data["plays"].genres == ["comedy"]
    with pytest.raises(ConfigError, match=r"has entries 0\.\.0, not '3'"):
        apply_override(raw, "stages.3.steps=1")
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        apply_override(raw, "steps")


def test_cli_prints_config_errors_in_one_line_with_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data.plays]\ncorpus = "shakespeare"\n\n[[stages]]\nkind = "pretrain"\ndata = "plays"\n'
                   'steps = "ten"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["msopt: config error: stages[0] (pretrain): TrainConfig.steps must be a positive int, got 'ten'"]
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "no config file" in capsys.readouterr().err


# -- one's own data ---------------------------------------------------------------------------------------------------
def test_text_files_and_globs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in [("a.txt", "alpha\n" * 50), ("sub/b.txt", "beta\n" * 50), ("sub/deep/c.txt", "gamma\n" * 50)]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)
    docs = load_documents(DataSpec.from_table({"files": ["a.txt", "sub/**/*.txt", "a.txt"]}, "t"), "t")
    assert [d.id for d in docs] == ["a.txt", "sub/b.txt", "sub/deep/c.txt"]          # each file once
    train, val = split_for_validation(docs, 0.1)                                       # < 10 documents: tails
    assert len(train) == len(val) == 3
    assert all(t.text + v.text == d.text and v.text.startswith(d.text[:5]) for t, v, d in zip(train, val, docs))
    with pytest.raises(ConfigError, match=r"data\.t\.files: 'nope/\*\.txt' matches no file"):
        load_documents(DataSpec.from_table({"files": "nope/*.txt"}, "t"), "t")


def test_jsonl_text_and_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"review": f"text number {i}", "stars": i % 3} for i in range(30)]
    Path("r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = DataSpec.from_table({"jsonl": "r.jsonl", "text_field": "review", "label_field": "stars"}, "r")
    docs = load_documents(spec, "r")
    assert [d.text for d in docs] == [r["review"] for r in rows] and [d.genre for d in docs[:3]] == ["0", "1", "2"]
    from msopt.config import labelled_texts
    train, val = labelled_texts(*split_for_validation(docs, 0.2, labelled=True))
    assert train.names == ["0", "1", "2"] and len(train) + len(val) == 30 and sorted(set(val.labels)) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"r\.jsonl:1 has no field 'text' \(it has review, stars\): set data\.r"):
        load_documents(DataSpec.from_table({"jsonl": "r.jsonl"}, "r"), "r")
    Path("bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 is not JSON"):
        load_documents(DataSpec.from_table({"jsonl": "bad.jsonl"}, "b"), "b")


def test_token_files_are_memory_mapped_and_split_at_the_end(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 97
    save_tokens(tmp_path / "corpus.bin", ids)
    raw = {"data": {"big": {"tokens": str(tmp_path / "corpus.bin"), "val_fraction": 0.2},
                    "text": {"corpus": "shakespeare", "max_docs": 1, "max_chars": 2000}},
           "tokenizer": {"data": "text", "vocab_size": 300},
           "stages": [{"kind": "pretrain", "data": "big", "seq_len": 16, "batch_size": 4, "steps": 1}]}
    from msopt.cli import RunBuilder
    builder = RunBuilder(parse_config(raw))
    train, val = builder.token_ids("big")
    assert isinstance(train, np.memmap) and len(train) == 800 and np.array_equal(val, ids[800:])
    with pytest.raises(ConfigError, match="tokenizer: data 'big' is not text"):
        parse_config({**raw, "tokenizer": {"vocab_size": 300}})
    raw["data"]["big"]["tokens"] = str(tmp_path / "missing.bin")
    with pytest.raises(ConfigError, match=r"data\.big: no token file .*missing\.bin"):
        RunBuilder(parse_config(raw)).token_ids("big")


# -- the shipped configs, run ----------------------------------------------------------------------------------------
def test_book_pipeline_config_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "book"
    sets = ["stages.0.steps=4", "stages.1.steps=2", "stages.2.steps=3", "data.genre.per_class=6",
            "stages.1.keywords=10", "train.progress=false"]
    small = [arg for assignment in sets for arg in ("--set", assignment)]
    assert main(["run", str(ROOT / "configs/book_pipeline.toml"), "--out", str(out), *small]) == 0
    table = capsys.readouterr().out
    assert "| pretrain-clm | 4 |" in table and "| domain-adapt | 2 |" in table and "| finetune-classify | 3 |" in table
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "metrics.jsonl", "metrics.csv", "config.resolved.toml", "tokenizer.json", "model.json",
            "model.safetensors", "classifier.safetensors", "00-pretrain-clm"} <= names
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in rows if r["stage"] == "pretrain-clm"] == [("pretrain-clm", s)
                                                                                         for s in range(5)]
    assert load_config(out / "config.resolved.toml") == load_config(ROOT / "configs/book_pipeline.toml", sets, out)
    assert main(["run", str(ROOT / "configs/book_pipeline.toml"), "--out", str(out), *small]) == 0
    assert capsys.readouterr().out.count("| True |") == 3                              # every stage reused
    assert len(read_metrics(out / "metrics.jsonl")) == len(rows)


def test_own_text_config_then_generate_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from msopt.data import load_corpus
    Path("texts").mkdir()
    for d in load_corpus("shakespeare")[:3]:
        Path("texts", f"{d.id}.txt").write_text(d.text[:6000])
    with open("labelled.jsonl", "w") as f:
        for i, d in enumerate(load_corpus("shakespeare")[:20]):
            f.write(json.dumps({"text": d.text[5000:5300], "label": d.genre}) + "\n")
    small = ["--set", "stages.0.steps=3", "--set", "stages.1.steps=2", "--out", "run"]
    assert main(["run", str(ROOT / "configs/own_text.toml"), *small, *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", "run", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    Path("held.txt").write_text(load_corpus("shakespeare")[-1].text[:3000])
    assert main(["eval", "run", "--text", "held.txt"]) == 0
    lm = json.loads(capsys.readouterr().out)
    assert lm["tokens"] > 100 and math.isclose(lm["ppl"], math.exp(lm["loss"])) and 0 < lm["bpb"] < 10
    assert main(["eval", "run", "--labelled", "labelled.jsonl"]) == 0
    clf = json.loads(capsys.readouterr().out)
    assert clf["n"] == 20 and 0 <= clf["accuracy"] <= 1 and set(clf["f1"]) == {"comedy", "history", "poem", "tragedy"}
    Path("odd.jsonl").write_text(json.dumps({"text": "x", "label": "satire"}) + "\n")
    assert main(["eval", "run", "--labelled", "odd.jsonl"]) == 1
    assert "label 'satire' is not a class of this run" in capsys.readouterr().err


# -- export -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_export_reloads_in_transformers_with_equal_logits(style, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = train_tokenizer(["It is a truth universally acknowledged, that a single man in possession"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    extra = dict(n_kv_head=2, tie_weights=False) if style == "llama" else {}
    gpt = GPT(GPTConfig.tiny(tok.get_vocab_size(), n_layer=2, n_head=4, n_embd=32, block_size=32, style=style, **extra))
    run = tmp_path / "run"
    run.mkdir()
    save_final_model(gpt, None, run)
    tok.save(str(run / "tokenizer.json"))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "a single man in possession of a good fortune"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text).ids and hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"
    assert hf_model.config.eos_token_id == tok.token_to_id("<|endoftext|>")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf_model(x).logits, load_run(run).model(x), atol=1e-4)


# -- metrics ----------------------------------------------------------------------------------------------------------
class FakeWriter:
    "Stands in for tensorboard's SummaryWriter: records what it is given."
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def close(self):
        self.closed = True


def test_metrics_logger_writes_each_step_once_across_a_resume(tmp_path, monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.made = []
    V, T = 32, 8

    def batch(i):
        x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(i))
        return x, torch.roll(x, -1, 1)

    def loss(model, b):
        return clm_loss(model(b[0]), b[1])

    config = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, eval_every=2, ckpt_every=2, progress=False, device="cpu")

    def trainer():
        torch.manual_seed(0)
        model = GPT(GPTConfig.tiny(V, n_layer=1, n_head=2, n_embd=16, block_size=T))
        return Trainer(model, loss, batch, config, val_data=[batch(-1)], out_dir=tmp_path / "ckpt", name="lm",
                       callbacks=[MetricsLogger(tmp_path)])

    trainer().fit(stop_at=3)                                    # checkpoints at steps 2 and 3, rows up to step 3
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    shutil.rmtree(tmp_path / "ckpt/ckpt/step-00000003")       # as if killed before step 3's checkpoint
    trainer().fit()                                             # resumes at step 2: step 3 is logged again, once
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and all(r["stage"] == "lm" for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["stage", "step"] and {"train_loss", "val_loss", "lr"} <= set(header)
    first, second = FakeWriter.made
    assert first.purge_step is None and second.purge_step == 3 and second.closed
    assert ("train_loss", 4) in second.scalars and ("val_loss", 4) in second.scalars


# -- torchrun ---------------------------------------------------------------------------------------------------------
def test_torchrun_two_processes_train_like_one(tmp_path):
    args = ["run", str(ROOT / "configs/pretrain_tiny.toml"), "--set", "stages.0.steps=4", "--set",
            "stages.0.eval_every=2", "--set", "device=cpu", *TINY]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "msopt", *args,
           "--out", str(tmp_path / "two"), "--set", "distributed=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| pretrain-clm |") == 1                       # rank 0 alone reports
    one, two = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert math.isclose(a[key], b[key], rel_tol=1e-4), (a, b)
        assert a["tokens"] == b["tokens"]                                   # the same global batch
    ckpts = sorted(p.name for p in (tmp_path / "two/00-pretrain-clm/ckpt").iterdir())
    assert ckpts == ["step-00000004"]
    one_model, two_model = load_run(tmp_path / "one").model, load_run(tmp_path / "two").model
    for (name, a), b in zip(one_model.state_dict().items(), two_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name                   # the final models agree too


def test_python_m_msopt(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "msopt", "run", str(tmp_path / "none.toml")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
