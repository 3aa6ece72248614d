"""The experiment gins train on the data they name: phi-1 / phi-1-small / the CPU demo, each as a
pretraining run on the CodeTextbook mixture (gin/data/codetextbook.gin) and a fine-tuning run on
CodeExercises from that pretraining's export (gin/data/codeexercises.gin). Each is composed as it is,
with a nano model and a few steps on real shards written here; without its data macros, or with a
data path that does not exist, it stops with one error line naming it before MODEL_DIR is made."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from phijax import train
from phijax.data import vocab as vocab_lib

tfds.display_progress_bar(False)

PRETRAIN = ["phi1_pretrain", "phi1_small_pretrain", "cpu_demo_pretrain"]
FINETUNE = {"phi1_finetune": "phi1_pretrain", "phi1_small_finetune": "phi1_small_pretrain",
            "cpu_demo_finetune": "cpu_demo_pretrain"}
DATA_MACROS = {"pretrain": ["CODE_SOURCES", "TEXTBOOK_SOURCES", "TOKENIZER"],
               "finetune": ["EXERCISES", "TOKENIZER", "PRETRAINED"]}
VOCAB = 384  # the tokenizer trained below; the nano model's table is resized to it

# Tiny run settings on top of an experiment (its data, optimizer, dtype and eval settings stay).
# BATCH_SIZE 8: the test session has 8 CPU devices and the experiments shard FSDP over all of them.
TINY = ["--gin_file=gin/models/nano.gin", f"--gin_param=phijax.PhiConfig.vocab_size = {VOCAB}",
        "--gin_param=phijax.PhiConfig.max_len = 512",  # room for a HumanEval prompt in this small vocabulary
        "--gin_param=phijax.PhiConfig.scan_unroll = 1", "--gin_param=phijax.PhiConfig.loss_chunk = 32",
        "--gin_param=TRAIN_STEPS = 2", "--gin_param=BATCH_SIZE = 8", "--gin_param=SEQ_LEN = 64",
        "--gin_param=MICROBATCHES = 1", "--gin_param=train.export_dtype = 'float32'",
        "--gin_param=train.log_every = 1"]
# HumanEval during fine-tuning: on, but one problem and 8 new tokens.
TINY_EVAL = ["--gin_param=PeriodicEval.limit = 1", "--gin_param=PeriodicEval.max_new_tokens = 8",
             "--gin_param=PeriodicEval.batch_size = 8", "--gin_param=PeriodicEval.timeout_s = 5.0"]

CODE = [f'def add_{i}(a, b):\n    """Return a + b + {i}."""\n    return a + b + {i}\n\n\n'
        f'class Box{i}:\n    def __init__(self, x):\n        self.x = x * {i}\n' for i in range(60)]
PAGES = [f"# Lesson {i}\n\nA function returns a value. For example:\n\n    def square(x):\n        return x * x\n\n"
         f"square({i}) is {i * i}.\n" for i in range(60)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real shards: code JSONL (The Stack-style {"content", ...}), textbook JSONL shards
    ({"text", ...}), CodeExercises JSONL ({"prompt", "solution", "tests"}), a BPE tokenizer.json."""
    d = tmp_path_factory.mktemp("experiments")
    (d / "code").mkdir()
    with open(d / "code" / "part-0.jsonl", "w") as f:
        for i, text in enumerate(CODE):
            f.write(json.dumps({"content": text, "path": f"pkg/mod_{i}.py", "repo": "me/pkg", "license": "mit"}) + "\n")
    (d / "textbook").mkdir()
    for shard in range(2):
        with open(d / "textbook" / f"part-{shard}.jsonl", "w") as f:
            for page in PAGES[shard::2]:
                f.write(json.dumps({"text": page, "topic": "functions"}) + "\n")
    exercises = d / "exercises.jsonl"
    with open(exercises, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f'def add_{i}(a, b):\n    """Return a + b + {i}."""\n',
                                "solution": f"    return a + b + {i}\n",
                                "tests": [f"assert add_{i}(1, 2) == {3 + i}"]}) + "\n")
    tok = vocab_lib.train_bpe(CODE + PAGES, VOCAB, d / "tokenizer.json")
    assert vocab_lib.BPETokenizer(tok).vocab_size <= VOCAB
    return {"dir": d, "code": d / "code", "textbook": d / "textbook", "exercises": exercises, "tokenizer": tok,
            "cache": d / "cache", "pretrained": {}}


def _pretrain_params(data):
    return [f"--gin_param=CODE_SOURCES = ['{data['code']}']",
            f"--gin_param=TEXTBOOK_SOURCES = ['{data['textbook']}']",
            f"--gin_param=TOKENIZER = '{data['tokenizer']}'",
            f"--gin_param=phijax.tasks.register_codetextbook.cache_dir = '{data['cache']}'",
            f"--gin_param=data_source.cache_dir = '{data['cache']}'"]


def _finetune_params(data, pretrained):
    return [f"--gin_param=EXERCISES = '{data['exercises']}'", f"--gin_param=TOKENIZER = '{data['tokenizer']}'",
            f"--gin_param=PRETRAINED = '{pretrained}'", f"--gin_param=data_source.cache_dir = '{data['cache']}'"]


def _train(capsys, experiment, model_dir, *params):
    rc = train.main([f"--gin_file=gin/experiments/{experiment}.gin", *TINY, f"--gin_param=MODEL_DIR = '{model_dir}'",
                     *params])
    out = capsys.readouterr()
    assert rc == 0, out.err[-4000:]
    return out


def _records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _pretrained(capsys, data, experiment):
    """The export of `experiment` (a pretraining gin), trained once per module."""
    if experiment not in data["pretrained"]:
        model_dir = data["dir"] / "runs" / experiment
        _train(capsys, experiment, model_dir, *_pretrain_params(data))
        data["pretrained"][experiment] = model_dir
    return data["pretrained"][experiment]


@pytest.mark.parametrize("experiment", PRETRAIN)
def test_pretrain_experiment_trains_on_the_codetextbook_mixture(capsys, data, experiment):
    model_dir = _pretrained(capsys, data, experiment)
    losses = [r["loss"] for r in _records(model_dir) if "loss" in r]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    operative = (model_dir / "operative_config.gin").read_text()
    assert "data_source.task_name = @phijax.tasks.register_codetextbook()" in operative
    assert "register_codetextbook.code = %CODE_SOURCES" in operative
    assert "register_codetextbook.textbook = %TEXTBOOK_SOURCES" in operative
    assert "DATA_SOURCE = 'task'" in operative
    info = json.loads((model_dir / "export" / "export_info.json").read_text())
    assert info["config"]["vocab_size"] == VOCAB
    assert (model_dir / "export" / "tokenizer.json").exists()  # the mixture's tokenizer, for decoding


@pytest.mark.parametrize("experiment", sorted(FINETUNE))
def test_finetune_experiment_trains_on_exercises_from_the_pretraining_export(capsys, caplog, data, experiment):
    pretrained = _pretrained(capsys, data, FINETUNE[experiment]) / "export"
    model_dir = data["dir"] / "runs" / experiment
    caplog.set_level("INFO", logger="phijax.train")
    _train(capsys, experiment, model_dir, *_finetune_params(data, pretrained), *TINY_EVAL)
    assert f"initialised parameters from {pretrained}" in caplog.text
    records = _records(model_dir)
    assert len([r for r in records if "loss" in r]) == 2
    # HumanEval at the final step (every 1000 / 50 steps, and the last), the best kept.
    assert [r["step"] for r in records if "eval/humaneval/pass@1" in r] == [2]
    best = json.loads((model_dir / "best.json").read_text())
    assert best["step"] == 2 and best["benchmark"] == "humaneval" and os.path.isdir(best["export"])
    operative = (model_dir / "operative_config.gin").read_text()
    assert "DATA_SOURCE = 'exercises'" in operative and "data_source.data_path = %EXERCISES" in operative


@pytest.mark.parametrize("experiment", [*PRETRAIN, *sorted(FINETUNE)])
def test_experiment_without_its_data_names_the_missing_macro_before_any_work(capsys, tmp_path, experiment):
    kind = "pretrain" if experiment in PRETRAIN else "finetune"
    model_dir = tmp_path / "run"
    rc = train.main([f"--gin_file=gin/experiments/{experiment}.gin", f"--gin_param=MODEL_DIR = '{model_dir}'"])
    err = capsys.readouterr().err
    first = DATA_MACROS[kind][0]
    assert rc == 2 and f"error: required gin macro {first} is not set" in err, err
    assert not model_dir.exists()
    # Every data macro is required: each one left out is named.
    given = {"CODE_SOURCES": "['/a']", "TEXTBOOK_SOURCES": "['/b']", "TOKENIZER": "'/t.json'",
             "EXERCISES": "'/e.jsonl'", "PRETRAINED": "'/p'"}
    for missing in DATA_MACROS[kind]:
        params = [f"--gin_param={m} = {given[m]}" for m in DATA_MACROS[kind] if m != missing]
        rc = train.main([f"--gin_file=gin/experiments/{experiment}.gin", f"--gin_param=MODEL_DIR = '{model_dir}'",
                         *params])
        err = capsys.readouterr().err
        assert rc == 2 and f"required gin macro {missing} is not set" in err, err
    assert not model_dir.exists()


@pytest.mark.parametrize("experiment", ["phi1_pretrain", "cpu_demo_finetune"])
def test_a_data_path_that_does_not_exist_is_refused_naming_it(capsys, data, tmp_path, experiment):
    model_dir = tmp_path / "run"
    if experiment in PRETRAIN:
        params = [f"--gin_param=CODE_SOURCES = ['{data['code']}', '{tmp_path / 'no_code'}']",
                  f"--gin_param=TEXTBOOK_SOURCES = ['{tmp_path / 'no_book'}']",
                  f"--gin_param=TOKENIZER = '{data['tokenizer']}'"]
        missing = {"CODE_SOURCES": tmp_path / "no_code", "TEXTBOOK_SOURCES": tmp_path / "no_book"}
    else:
        params = [f"--gin_param=EXERCISES = '{tmp_path / 'no.jsonl'}'",
                  f"--gin_param=TOKENIZER = '{tmp_path / 'no_tok.json'}'",
                  f"--gin_param=PRETRAINED = '{data['dir']}'"]  # a directory, but not an export
        missing = {"EXERCISES": tmp_path / "no.jsonl", "TOKENIZER": tmp_path / "no_tok.json"}
    rc = train.main([f"--gin_file=gin/experiments/{experiment}.gin", f"--gin_param=MODEL_DIR = '{model_dir}'",
                     *params])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: "), err
    for macro, path in missing.items():
        assert f"{macro}: '{path}' does not exist" in err, err
    if experiment not in PRETRAIN:
        assert "PRETRAINED" in err and "neither a phijax export" in err
    assert str(data["code"]) not in err  # the sources that exist are not named
    assert not model_dir.exists()
