"""Every command against bad and hostile input, as an attacker would try it.

Each case runs `mtcore ...` in-process and checks what the README promises for a user error:
exit status 2, exactly one stderr line that starts with `error:` (and says what the case expects),
no traceback, and every file that existed before (inputs, earlier outputs, a user's own files) is
byte-identical afterwards. The interrupt cases (slow) send SIGINT or SIGKILL to `mtcore dpo`,
`mtcore train` and `mtcore build-toy` at several points and check that the output is the old one or
the new one, never a mix.
"""

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_world, write_pairs
from mtcore.cli import main

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

NOT_UTF8 = b'{"prompt": "caf\xe9"}\n'


def _edit_config(src: Path, dst: Path, **changes) -> None:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))


def _edit_weights(src: Path, dst: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


HAVE_DATA_EXTRA = all(importlib.util.find_spec(m) for m in ("datasets", "pyarrow"))  # mtcore[data]


def _needs_data_extra(command: str) -> bool:
    return any(k in command for k in (".parquet", "_ds", "nobody-mtcore/"))


def _data_in_other_forms(w: Path) -> None:
    """Parquet files and a saved dataset (mtcore/sources.py): good ones, and Parquet text that is not
    UTF-8 (a lone surrogate's bytes, stored unchecked)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [json.loads(line) for line in (w / "pairs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(pairs), w / "pairs.parquet")
    prompts = [json.loads(line) for line in (w / "prompts.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(prompts), w / "prompts.parquet")
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(prompts),
                          "test": datasets.Dataset.from_list(prompts[:4])}).save_to_disk(str(w / "prompts_ds"))
    text = pa.array([b"sort 2 1", b"sort 2 1 \xed\xa0\x80"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": text}), w / "surrogate.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs good and bad, earlier outputs, and a user's own files, in one directory (made on the
    kernels' torch CPU path, as the tests run: a module fixture runs before their torch_cpu_path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        patch.setenv("MTCORE_CACHE", str(tmp_path_factory.mktemp("mtcore_cache")))
        return _world(tmp_path_factory)


def _world(tmp_path_factory):
    from mtcore import config

    w = tmp_path_factory.mktemp("world")
    policy, reward, prompts = tiny_world(w)
    write_pairs(w / "pairs.jsonl", 6)
    (w / "demos.jsonl").write_text(json.dumps({"prompt": "sort 2 1", "response": "1 2"}) + "\n")
    (w / "scored_in.jsonl").write_text(json.dumps({"prompt": "sort 2 1", "responses": ["1 2", "2 1"]}) + "\n")
    files = {
        "not_utf8.jsonl": NOT_UTF8, "bad_json.jsonl": b'{"prompt": "ok"}\n{"prompt": "unterminated\n',
        "list_row.jsonl": b'[1, 2]\n', "no_prompt.jsonl": b'{"text": "sort 1 2"}\n', "empty.jsonl": b"",
        "no_chosen.jsonl": b'{"prompt": "sort 1 2", "rejected": "1 2"}\n',
        "chosen_int.jsonl": b'{"prompt": "sort 1 2", "chosen": 12, "rejected": "1 2"}\n',
        "bad_margin.jsonl": b'{"prompt": "sort 1 2", "chosen": "1 2", "rejected": "2 1", "margin": "big"}\n',
        "no_response.jsonl": b'{"prompt": "sort 1 2"}\n', "bad_messages.jsonl": b'{"messages": [1, 2]}\n',
        "no_responses.jsonl": b'{"prompt": "sort 1 2"}\n',
        "responses_str.jsonl": b'{"prompt": "sort 1 2", "responses": "1 2"}\n',
        "long_prompt.jsonl": json.dumps({"prompt": "sort " + " ".join("9" * 60)}).encode() + b"\n",
        "bad.toml": b"iters = [\n", "not_utf8.toml": b"iters = 3 # \xff\n", "unknown_key.toml": b"itres = 3\n",
        "wrong_type.toml": b'iters = "3"\n', "notes.txt": b"a user's notes\n", "template_not_utf8.jinja": b"\xff\xfe",
        "user_out.jsonl": b"my own results, not mtcore's\n", "user_out.json": b"not json at all\n",
        # lone surrogates (legal JSON escapes, not text) and a role no chat template knows
        "surrogate_prompts.jsonl": b'{"prompt": "sort 2 1 \\ud800"}\n',
        "surrogate_messages.jsonl": b'{"messages": [{"role": "user", "content": "sort 2 1 \\udfff"}]}\n',
        "surrogate_pairs.jsonl": b'{"prompt": "sort 1 2", "chosen": "1 2\\ud800", "rejected": "2 1"}\n',
        "surrogate_demos.jsonl": b'{"prompt": "sort 2 1", "response": "\\udc00"}\n',
        "surrogate_responses.jsonl": b'{"prompt": "sort 2 1", "responses": ["1 2", "\\ud800"]}\n',
        "wizard.jsonl": b'{"messages": [{"role": "wizard", "content": "sort 2 1"}]}\n',
        "wizard_pairs.jsonl": b'{"messages": [{"role": "wizard", "content": "sort 2 1"}], "chosen": "1 2", '
                              b'"rejected": "2 1"}\n',
        "not_parquet.parquet": b"PAR1, then not Parquet at all\n",
    }
    for name, data in files.items():
        (w / name).write_bytes(data)
    if HAVE_DATA_EXTRA:
        _data_in_other_forms(w)
    for name in ("user_dir", "user_out_dir"):
        (w / name).mkdir()
        (w / name / "notes.txt").write_text("keep me\n")
    # Checkpoints that are wrong in one way each.
    _edit_config(policy, w / "zero_heads", num_attention_heads=0)
    no_factor = {"rope_type": "llama3", "rope_theta": 10000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 32}
    _edit_config(policy, w / "rope_no_factor", rope_parameters=no_factor, rope_scaling=no_factor)
    _edit_config(policy, w / "mistral", model_type="mistral")
    _edit_config(policy, w / "no_vocab", vocab_size=None)
    shutil.copytree(policy, w / "no_config")
    (w / "no_config" / "config.json").unlink()
    shutil.copytree(policy, w / "bad_config_json")
    (w / "bad_config_json" / "config.json").write_text('{"model_type": "llama",')
    shutil.copytree(policy, w / "config_not_utf8")
    (w / "config_not_utf8" / "config.json").write_bytes(b'{"model_type": "\xff"}')
    shutil.copytree(policy, w / "bin_only")
    (w / "bin_only" / "model.safetensors").rename(w / "bin_only" / "pytorch_model.bin")
    shutil.copytree(policy, w / "corrupt_weights")
    (w / "corrupt_weights" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    shutil.copytree(policy, w / "index_missing_shard")
    (w / "index_missing_shard" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    _edit_weights(policy, w / "wrong_shape", lambda s: s.update({"model.norm.weight": torch.ones(7)}))
    _edit_weights(policy, w / "int_weights", lambda s: s.update(
        {"model.norm.weight": s["model.norm.weight"].to(torch.int32)}))
    _edit_weights(policy, w / "nan_weights", lambda s: s["model.norm.weight"].fill_(float("nan")))
    # Earlier outputs: a finished dpo run, a partial directory that is not mtcore's, run directories.
    result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(w / "pairs.jsonl"), "--out",
                                       str(w / "prev_dpo"), "--batch-size", "3", "--micro-batch-tokens", "128"])
    assert result.exit_code == 0, result.output
    (w / "strange_out.partial").mkdir()
    (w / "strange_out.partial" / "data.bin").write_bytes(b"user data")
    toy_identity = config.to_toml(config.identity(config.resolve_config({}, {})))
    for name, state, splits in (("run_other", None, None), ("run_bad_state", "[1, 2]", None),
                                ("run_state_not_json", "{", None), ("run_bad_splits", None, '{"rm": 3}'),
                                ("run_state_empty", "", None), ("run_splits_cut", None, '{"rm": ["sort 1'),
                                ("run_config_empty", None, None), ("run_config_cut", None, None),
                                ("run_new", None, None), ("run_begun", BEGUN_2, None)):
        (w / name).mkdir()
        config = {"run_other": "seed = 5\n", "run_config_empty": "",
                  "run_config_cut": "".join(toy_identity.splitlines(keepends=True)[:5])}.get(name, toy_identity)
        (w / name / "config.toml").write_text(config)
        if state is None and name in ("run_other", "run_config_cut"):  # a stage done: the config is the run's
            state = A_STAGE_DONE
        if state is not None:
            (w / name / "state.json").write_text(state)
        if splits is not None:
            (w / name / "splits.json").write_text(splits)
    # dpo's own partial directory holding a damaged resumable state
    (w / "damaged.partial" / "train_state").mkdir(parents=True)
    (w / "damaged.partial" / ".mtcore-output").write_text('{"command": "dpo"}\n')
    (w / "damaged.partial" / "train_state" / "trainer.json").write_text('{"run": 1}')
    (w / "dcp_damaged.partial" / "train_state").mkdir(parents=True)  # trainer.json whole, the shards gone
    (w / "dcp_damaged.partial" / ".mtcore-output").write_text('{"command": "dpo"}\n')
    (w / "dcp_damaged.partial" / "train_state" / "trainer.json").write_text(
        '{"run": {}, "scheduler": {}, "history": []}')
    (w / "a_file").write_text("a file, not a directory\n")
    return w


P = "--policy {w}/policy"
R = "--reward {w}/reward"
DPO = "dpo --policy {w}/policy --pairs {w}/pairs.jsonl --micro-batch-tokens 256"
RM = "rm --reward {w}/reward --pairs {w}/pairs.jsonl --micro-batch-tokens 256"
SFT = "sft --policy {w}/policy --data {w}/demos.jsonl --micro-batch-tokens 256"
GEN = "generate --policy {w}/policy --prompts {w}/prompts.jsonl --max-new-tokens 2"
SCORE = "score --reward {w}/reward --prompts-with-responses {w}/scored_in.jsonl"
REAL = "train --policy {w}/policy --reward {w}/reward --prompts {w}/prompts.jsonl --selection-size 4 " \
       "--rm-split-size 4 --policy-split-size 8 --iters 1 --max-new-tokens 8"

A_STAGE_DONE = '{"done": ["initial", "iter_1/sample"], "stopped_at": null, "failed": null}'
BEGUN_2 = '{"done": ["initial", "iter_1/sample", "iter_2/sample"], "stopped_at": null, "failed": null}'

# (id, command line with {w} for the world directory, text the error line must hold, [paths that must not appear])
CASES = [
    # mtcore info: checkpoints broken in every way
    ("info-missing", "info {w}/nope", "no such checkpoint directory"),
    ("info-file", "info {w}/notes.txt", "is a file"),
    ("info-no-config", "info {w}/no_config", "config.json: missing"),
    ("info-config-not-json", "info {w}/bad_config_json", "not valid JSON"),
    ("info-config-not-utf8", "info {w}/config_not_utf8", "not UTF-8"),
    ("info-zero-heads", "info {w}/zero_heads", "num_attention_heads must be a positive int"),
    ("info-rope-no-factor", "info {w}/rope_no_factor", "missing key 'factor'"),
    ("info-mistral", "info {w}/mistral", "Llama checkpoints only"),
    ("info-no-vocab", "info {w}/no_vocab", "missing key 'vocab_size'"),
    ("info-bin-only", "info {w}/bin_only", "only pickle weights"),
    ("info-corrupt-weights", "info {w}/corrupt_weights", "not a readable safetensors file"),
    ("info-index-missing-shard", "info {w}/index_missing_shard", "which is missing"),
    ("info-wrong-shape", "info {w}/wrong_shape", "config.json implies"),
    ("info-int-weights", "info {w}/int_weights", "weights must be floating point"),
    ("info-dir-without-anything", "info {w}/user_dir", "config.json: missing"),
    ("info-no-arg", "info", "Missing argument"),
    # mtcore convert
    ("convert-into-src", "convert {w}/policy {w}/policy", "holds the input"),
    ("convert-into-user-dir", "convert {w}/policy {w}/user_dir", "did not write"),
    ("convert-into-file", "convert {w}/policy {w}/notes.txt", "not a directory"),
    ("convert-under-file", "convert {w}/policy {w}/a_file/sub", "is not a directory"),
    ("convert-into-world", "convert {w}/policy {w}", "holds"),
    ("convert-shard-0", "convert {w}/policy {w}/c1 --max-shard-gb 0", "--max-shard-gb", ["c1"]),
    ("convert-shard-nan", "convert {w}/policy {w}/c1 --max-shard-gb nan", "not a finite number", ["c1"]),
    ("convert-shard-neg", "convert {w}/policy {w}/c1 --max-shard-gb -1", "--max-shard-gb", ["c1"]),
    ("convert-dtype", "convert {w}/policy {w}/c1 --dtype int8", "--dtype", ["c1"]),
    ("convert-kind", "convert {w}/policy {w}/c1 --kind critic", "--kind", ["c1"]),
    ("convert-wrong-kind", "convert {w}/policy {w}/c1 --kind reward", "score.weight", ["c1"]),
    ("convert-nan-free-but-int", "convert {w}/int_weights {w}/c1", "floating point", ["c1"]),
    ("convert-strange-partial", "convert {w}/policy {w}/strange_out", "was not written by", ["strange_out"]),
    # mtcore generate
    ("gen-n-0", GEN + " --out {w}/g.jsonl --n 0", "--n", ["g.jsonl"]),
    ("gen-samples-0", GEN + " --out {w}/g.jsonl --samples 0", "--samples", ["g.jsonl"]),
    ("gen-decode-steps-neg", GEN + " --out {w}/g.jsonl --decode-steps -1", "--decode-steps", ["g.jsonl"]),
    ("train-policy-split-size-neg", "train --out {w}/r --policy-split-size -1", "--policy-split-size -1: must be >= 0",
     ["r"]),
    ("train-decode-steps-neg", "train --out {w}/r --decode-steps -1", "--decode-steps -1: must be >= 0", ["r"]),
    ("gen-samples-text", GEN + " --out {w}/g.jsonl --samples two", "--samples", ["g.jsonl"]),
    ("gen-temp-nan", GEN + " --out {w}/g.jsonl --temperature nan", "not a finite number", ["g.jsonl"]),
    ("gen-temp-inf", GEN + " --out {w}/g.jsonl --temperature inf", "not a finite number", ["g.jsonl"]),
    ("gen-temp-neg", GEN + " --out {w}/g.jsonl --temperature -1", "--temperature", ["g.jsonl"]),
    ("gen-top-p-0", GEN + " --out {w}/g.jsonl --top-p 0", "--top-p", ["g.jsonl"]),
    ("gen-top-p-big", GEN + " --out {w}/g.jsonl --top-p 1.5", "--top-p", ["g.jsonl"]),
    ("gen-top-k-neg", GEN + " --out {w}/g.jsonl --top-k -1", "--top-k", ["g.jsonl"]),
    ("gen-new-0", GEN + " --out {w}/g.jsonl --max-new-tokens 0", "--max-new-tokens", ["g.jsonl"]),
    ("gen-slots-0", GEN + " --out {w}/g.jsonl --slots 0", "--slots", ["g.jsonl"]),
    ("gen-kv-0", GEN + " --out {w}/g.jsonl --kv-cache-gb 0", "--kv-cache-gb", ["g.jsonl"]),
    ("gen-kv-neg", GEN + " --out {w}/g.jsonl --kv-cache-gb -2", "--kv-cache-gb", ["g.jsonl"]),
    ("gen-max-len-1", GEN + " --out {w}/g.jsonl --max-len 1", "--max-len", ["g.jsonl"]),
    ("gen-seed-neg", GEN + " --out {w}/g.jsonl --seed -1", "--seed", ["g.jsonl"]),
    ("gen-decode-mode", GEN + " --out {w}/g.jsonl --decode-mode fast", "--decode-mode", ["g.jsonl"]),
    ("gen-n-text", GEN + " --out {w}/g.jsonl --n two", "--n", ["g.jsonl"]),
    ("gen-device-bogus", GEN + " --out {w}/g.jsonl --device toaster", "not a device", ["g.jsonl"]),
    ("gen-device-cuda", GEN + " --out {w}/g.jsonl --device cuda:7", "CUDA devices", ["g.jsonl"]),
    ("gen-device-meta", GEN + " --out {w}/g.jsonl --device meta", "cpu or cuda", ["g.jsonl"]),
    ("gen-prompts-not-utf8", "generate --policy {w}/policy --prompts {w}/not_utf8.jsonl --out {w}/g.jsonl",
     "not_utf8.jsonl:1: not UTF-8", ["g.jsonl"]),
    ("gen-prompts-bad-json", "generate --policy {w}/policy --prompts {w}/bad_json.jsonl --out {w}/g.jsonl",
     "bad_json.jsonl:2: not valid JSON", ["g.jsonl"]),
    ("gen-prompts-list", "generate --policy {w}/policy --prompts {w}/list_row.jsonl --out {w}/g.jsonl",
     "must be a JSON object", ["g.jsonl"]),
    ("gen-prompts-no-prompt", "generate --policy {w}/policy --prompts {w}/no_prompt.jsonl --out {w}/g.jsonl",
     'needs a "prompt"', ["g.jsonl"]),
    ("gen-prompts-bad-messages", "generate --policy {w}/policy --prompts {w}/bad_messages.jsonl --out {w}/g.jsonl",
     "bad_messages.jsonl:1", ["g.jsonl"]),
    ("gen-prompts-empty", "generate --policy {w}/policy --prompts {w}/empty.jsonl --out {w}/g.jsonl", "no prompts",
     ["g.jsonl"]),
    ("gen-prompts-missing", "generate --policy {w}/policy --prompts {w}/nope.jsonl --out {w}/g.jsonl",
     "cannot read", ["g.jsonl"]),
    ("gen-prompts-dir", "generate --policy {w}/policy --prompts {w}/user_dir --out {w}/g.jsonl", "user_dir",
     ["g.jsonl"]),
    ("gen-out-is-input", "generate --policy {w}/policy --prompts {w}/prompts.jsonl --out {w}/prompts.jsonl",
     "is also an input"),
    ("gen-out-user-file", GEN + " --out {w}/user_out.jsonl", "does not look like this command's output"),
    ("gen-out-dir", GEN + " --out {w}/user_dir", "user_dir"),
    ("gen-out-under-file", GEN + " --out {w}/a_file/g.jsonl", "is not a directory"),
    ("gen-overlong", "generate --policy {w}/policy --prompts {w}/long_prompt.jsonl --out {w}/g.jsonl --max-len 8",
     "long_prompt.jsonl:1: the prompt has", ["g.jsonl"]),
    ("gen-template-missing", GEN + " --out {w}/g.jsonl --chat-template {w}/nope.jinja", "--chat-template",
     ["g.jsonl"]),
    ("gen-template-not-utf8", GEN + " --out {w}/g.jsonl --chat-template {w}/template_not_utf8.jinja", "UTF-8",
     ["g.jsonl"]),
    ("gen-policy-is-rm", "generate --policy {w}/reward --prompts {w}/prompts.jsonl --out {w}/g.jsonl",
     "looks like a reward model", ["g.jsonl"]),
    ("gen-policy-zero-heads", "generate --policy {w}/zero_heads --prompts {w}/prompts.jsonl --out {w}/g.jsonl",
     "num_attention_heads", ["g.jsonl"]),
    ("gen-no-policy", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl", "Missing option", ["g.jsonl"]),
    ("gen-surrogate", "generate {P} --prompts {w}/surrogate_prompts.jsonl --out {w}/g.jsonl",
     'surrogate_prompts.jsonl:1: "prompt" holds a lone surrogate', ["g.jsonl"]),
    ("gen-surrogate-messages", "generate {P} --prompts {w}/surrogate_messages.jsonl --out {w}/g.jsonl",
     'surrogate_messages.jsonl:1: "messages[0].content" holds a lone surrogate', ["g.jsonl"]),
    ("gen-role-wizard", "generate {P} --prompts {w}/wizard.jsonl --out {w}/g.jsonl",
     "wizard.jsonl:1: message 0 has the role 'wizard'; roles are system, user, assistant", ["g.jsonl"]),
    # data in other forms: Parquet, saved datasets, hub ids (mtcore/sources.py)
    ("gen-hub-not-cached", "generate {P} --prompts nobody-mtcore/no-such-dataset --out {w}/g.jsonl",
     "nobody-mtcore/no-such-dataset: no such file, and no such dataset in the Hugging Face cache", ["g.jsonl"]),
    ("gen-not-parquet", "generate {P} --prompts {w}/not_parquet.parquet --out {w}/g.jsonl",
     "not_parquet.parquet: not a readable Parquet file", ["g.jsonl"]),
    ("gen-parquet-surrogate", "generate {P} --prompts {w}/surrogate.parquet --out {w}/g.jsonl",
     'surrogate.parquet row 1: "prompt" holds bytes that are not UTF-8 text', ["g.jsonl"]),
    ("gen-parquet-no-column", "generate {P} --prompts {w}/prompts.parquet --prompt-field question --out {w}/g.jsonl",
     "no column 'question' (its columns: prompt, id); name the column with --prompt-field", ["g.jsonl"]),
    ("gen-split-missing", "generate {P} --prompts {w}/prompts_ds --prompts-split dev --out {w}/g.jsonl",
     "--prompts-split dev: ", ["g.jsonl"]),
    ("gen-split-names-them", "generate {P} --prompts {w}/prompts_ds --prompts-split dev --out {w}/g.jsonl",
     "has no such split; its splits are train, test", ["g.jsonl"]),
    ("gen-split-needed", "generate {P} --prompts {w}/prompts_ds --out {w}/g.jsonl",
     "has the splits train, test; choose one with --prompts-split", ["g.jsonl"]),
    ("gen-split-of-jsonl", "generate {P} --prompts {w}/prompts.jsonl --prompts-split train --out {w}/g.jsonl",
     "is JSONL, which has no splits", ["g.jsonl"]),
    ("dpo-parquet-no-column", "dpo {P} --pairs {w}/pairs.parquet --chosen-field good --out {w}/o",
     "no column 'good'", ["o", "o.partial"]),
    ("rm-parquet-no-column-option", "rm {R} --pairs {w}/pairs.parquet --rejected-field bad --out {w}/o",
     "name the column with --rejected-field", ["o", "o.partial"]),
    ("eval-pairs-split-needed", "eval {R} --pairs {w}/prompts_ds --out {w}/e.json",
     "choose one with --pairs-split", ["e.json"]),
    ("train-prompts-no-column", "train {P} {R} --prompts {w}/prompts.parquet --prompt-field q --out {w}/r",
     "no column 'q'", ["r"]),
    ("train-prompts-split-missing", "train {P} {R} --prompts {w}/prompts_ds --prompts-split dev --out {w}/r",
     "its splits are train, test", ["r"]),
    ("train-toy-prompts-split", "train --out {w}/r --prompts-split test", "the toy world has none", ["r"]),
    # mtcore score
    ("score-no-responses", "score {R} --prompts-with-responses {w}/no_responses.jsonl --out {w}/s.jsonl",
     'needs "responses"', ["s.jsonl"]),
    ("score-responses-str", "score {R} --prompts-with-responses {w}/responses_str.jsonl --out {w}/s.jsonl",
     'needs "responses"', ["s.jsonl"]),
    ("score-micro-small", SCORE + " --out {w}/s.jsonl --max-length 64 --micro-batch-tokens 4", "does not fit",
     ["s.jsonl"]),
    ("score-max-length-1", SCORE + " --out {w}/s.jsonl --max-length 1", "--max-length", ["s.jsonl"]),
    ("score-reward-is-policy", "score --reward {w}/policy --prompts-with-responses {w}/scored_in.jsonl "
                               "--out {w}/s.jsonl", "score.weight", ["s.jsonl"]),
    ("score-out-is-input", SCORE + " --out {w}/scored_in.jsonl", "is also an input"),
    ("score-not-utf8", "score {R} --prompts-with-responses {w}/not_utf8.jsonl --out {w}/s.jsonl", "not UTF-8",
     ["s.jsonl"]),
    ("score-out-user-file", SCORE + " --out {w}/user_out.jsonl", "does not look like"),
    ("score-device", SCORE + " --out {w}/s.jsonl --device gpu0", "not a device", ["s.jsonl"]),
    ("score-surrogate", "score {R} --prompts-with-responses {w}/surrogate_responses.jsonl --out {w}/s.jsonl",
     'surrogate_responses.jsonl:1: "responses[1]" holds a lone surrogate', ["s.jsonl"]),
    ("score-role-wizard", "score {R} --prompts-with-responses {w}/wizard.jsonl --out {w}/s.jsonl", "role 'wizard'",
     ["s.jsonl"]),
    # mtcore eval
    ("eval-pairs-no-reward", "eval --pairs {w}/pairs.jsonl --out {w}/e.json", "--pairs needs --reward", ["e.json"]),
    ("eval-prompts-no-policy", "eval --prompts {w}/prompts.jsonl --out {w}/e.json", "--prompts needs --policy",
     ["e.json"]),
    ("eval-samples-0", "eval --samples 0 --out {w}/e.json", "--samples", ["e.json"]),
    ("eval-temp-nan", "eval --temperature nan --out {w}/e.json", "not a finite number", ["e.json"]),
    ("eval-new-0", "eval --max-new-tokens 0 --out {w}/e.json", "--max-new-tokens", ["e.json"]),
    ("eval-out-is-input", "eval {R} --pairs {w}/pairs.jsonl --out {w}/pairs.jsonl", "is also an input"),
    ("eval-out-user-file", "eval --out {w}/user_out.json", "does not look like"),
    ("eval-seed-neg", "eval --seed -3 --out {w}/e.json", "--seed", ["e.json"]),
    ("eval-pairs-no-chosen", "eval {R} --pairs {w}/no_chosen.jsonl --out {w}/e.json", "no_chosen.jsonl:1", ["e.json"]),
    ("eval-pairs-not-utf8", "eval {R} --pairs {w}/not_utf8.jsonl --out {w}/e.json", "not UTF-8", ["e.json"]),
    ("eval-pairs-surrogate", "eval {R} --pairs {w}/surrogate_pairs.jsonl --out {w}/e.json",
     'surrogate_pairs.jsonl:1: "chosen" holds a lone surrogate', ["e.json"]),
    ("eval-prompts-surrogate", "eval {P} --prompts {w}/surrogate_messages.jsonl --out {w}/e.json",
     '"messages[0].content" holds a lone surrogate', ["e.json"]),
    ("eval-pairs-role-wizard", "eval {R} --pairs {w}/wizard_pairs.jsonl --out {w}/e.json", "role 'wizard'",
     ["e.json"]),
    # mtcore dpo / rm / sft: --out
    ("dpo-out-user-dir", DPO + " --out {w}/user_dir", "did not write"),
    ("dpo-out-policy", DPO + " --out {w}/policy", "holds the input"),
    ("dpo-out-holds-pairs", DPO + " --out {w}", "holds"),
    ("dpo-out-cwd", DPO + " --out .", "current directory"),
    ("dpo-out-file", DPO + " --out {w}/notes.txt", "is a file"),
    ("dpo-out-under-file", DPO + " --out {w}/a_file/o", "is not a directory"),
    ("dpo-out-strange-partial", DPO + " --out {w}/strange_out", "was not written by", ["strange_out"]),
    ("dpo-over-rm-output", RM.replace("rm ", "dpo ", 1).replace("--reward", "--policy") + " --out {w}/prev_dpo",
     "looks like a reward model"),
    ("rm-over-dpo-output", RM + " --out {w}/prev_dpo", "did not write"),
    # ranges, each naming its option
    ("dpo-lr-0", DPO + " --out {w}/o --lr 0", "--lr 0.0: must be > 0", ["o", "o.partial"]),
    ("dpo-lr-nan", DPO + " --out {w}/o --lr nan", "not a finite number", ["o", "o.partial"]),
    ("dpo-lr-neg", DPO + " --out {w}/o --lr -1e-5", "--lr", ["o", "o.partial"]),
    ("dpo-batch-0", DPO + " --out {w}/o --batch-size 0", "--batch-size 0: must be >= 1", ["o", "o.partial"]),
    ("dpo-epochs-0", DPO + " --out {w}/o --epochs 0", "--epochs", ["o", "o.partial"]),
    ("dpo-warmup-1", DPO + " --out {w}/o --warmup-ratio 1", "--warmup-ratio", ["o", "o.partial"]),
    ("dpo-micro-0", DPO + " --out {w}/o --micro-batch-tokens 0", "--micro-batch-tokens", ["o", "o.partial"]),
    ("dpo-micro-small", DPO + " --out {w}/o --micro-batch-tokens 8", "pairs.jsonl:1:", ["o", "o.partial"]),
    ("dpo-max-length-1", DPO + " --out {w}/o --max-length 1", "--max-length", ["o", "o.partial"]),
    ("dpo-all-dropped", DPO + " --out {w}/o --max-length 4", "every example was dropped", ["o", "o.partial"]),
    ("dpo-beta-0", DPO + " --out {w}/o --beta 0", "--beta", ["o", "o.partial"]),
    ("dpo-smoothing-half", DPO + " --out {w}/o --label-smoothing 0.5", "--label-smoothing", ["o", "o.partial"]),
    ("dpo-state-every-neg", DPO + " --out {w}/o --save-state-every -1", "--save-state-every", ["o", "o.partial"]),
    ("dpo-clip-neg", DPO + " --out {w}/o --max-grad-norm -1", "--max-grad-norm", ["o", "o.partial"]),
    ("dpo-loss-type", DPO + " --out {w}/o --loss-type kto", "--loss-type", ["o", "o.partial"]),
    ("dpo-seed-huge", DPO + " --out {w}/o --seed 99999999999999999999", "--seed", ["o", "o.partial"]),
    ("dpo-device", DPO + " --out {w}/o --device cuda", "CUDA devices", ["o", "o.partial"]),
    # dpo / rm / sft: data and models
    ("dpo-pairs-not-utf8", "dpo {P} --pairs {w}/not_utf8.jsonl --out {w}/o", "not UTF-8", ["o", "o.partial"]),
    ("dpo-pairs-no-chosen", "dpo {P} --pairs {w}/no_chosen.jsonl --out {w}/o", "chosen", ["o", "o.partial"]),
    ("dpo-pairs-chosen-int", "dpo {P} --pairs {w}/chosen_int.jsonl --out {w}/o", "chosen", ["o", "o.partial"]),
    ("dpo-pairs-empty", "dpo {P} --pairs {w}/empty.jsonl --out {w}/o", "empty.jsonl", ["o", "o.partial"]),
    ("dpo-pairs-missing", "dpo {P} --pairs {w}/nope.jsonl --out {w}/o", "cannot read", ["o", "o.partial"]),
    ("dpo-logging-dir-a-file", DPO + " --out {w}/o --report-to tensorboard --logging-dir {w}/a_file", "a_file",
     ["o"]),
    ("dpo-cache-dir-a-file", DPO + " --out {w}/o --cache-dir {w}/a_file", "--cache-dir", ["o", "o.partial"]),
    ("dpo-ref-missing", DPO + " --out {w}/o --ref {w}/nope", "no such checkpoint directory", ["o", "o.partial"]),
    ("dpo-policy-nan", "dpo --policy {w}/nan_weights --pairs {w}/pairs.jsonl --out {w}/o",
     "holds NaN or inf values", ["o", "o.partial"]),
    ("dpo-policy-zero-heads", "dpo --policy {w}/zero_heads --pairs {w}/pairs.jsonl --out {w}/o",
     "num_attention_heads", ["o", "o.partial"]),
    ("dpo-policy-rope", "dpo --policy {w}/rope_no_factor --pairs {w}/pairs.jsonl --out {w}/o", "'factor'",
     ["o", "o.partial"]),
    ("dpo-damaged-state", DPO + " --out {w}/damaged --save-state-every 1", "trainer.json", ["damaged"]),
    ("dpo-damaged-shards", DPO + " --out {w}/dcp_damaged --save-state-every 1", "unreadable training state",
     ["dcp_damaged"]),
    ("dpo-no-pairs-option", "dpo {P} --out {w}/o", "Missing option '--pairs'", ["o", "o.partial"]),
    ("dpo-surrogate", "dpo {P} --pairs {w}/surrogate_pairs.jsonl --out {w}/o",
     'surrogate_pairs.jsonl:1: "chosen" holds a lone surrogate', ["o", "o.partial"]),
    ("dpo-role-wizard", "dpo {P} --pairs {w}/wizard_pairs.jsonl --out {w}/o", "role 'wizard'", ["o", "o.partial"]),
    ("rm-surrogate", "rm {R} --pairs {w}/surrogate_pairs.jsonl --out {w}/o", '"chosen" holds a lone surrogate',
     ["o", "o.partial"]),
    ("sft-surrogate", "sft {P} --data {w}/surrogate_demos.jsonl --out {w}/o",
     'surrogate_demos.jsonl:1: "response" holds a lone surrogate', ["o", "o.partial"]),
    ("rm-reward-is-policy", "rm --reward {w}/policy --pairs {w}/pairs.jsonl --out {w}/o", "score.weight",
     ["o", "o.partial"]),
    ("rm-bad-margin", "rm {R} --pairs {w}/bad_margin.jsonl --out {w}/o", "margin", ["o", "o.partial"]),
    ("rm-weight-decay-neg", RM + " --out {w}/o --weight-decay -1", "--weight-decay", ["o", "o.partial"]),
    ("rm-center-neg", RM + " --out {w}/o --center-coef -1", "--center-coef", ["o", "o.partial"]),
    ("sft-no-response", "sft {P} --data {w}/no_response.jsonl --out {w}/o", "response", ["o", "o.partial"]),
    ("sft-seed-neg", SFT + " --out {w}/o --seed -5", "--seed", ["o", "o.partial"]),
    ("sft-out-user-dir", SFT + " --out {w}/user_out_dir", "did not write"),
    # mtcore train: nothing written for a refused value, so the corrected rerun is not refused
    ("train-top-p-0", "train --out {w}/r --top-p 0", "--top-p 0.0: must be in (0, 1]", ["r"]),
    ("train-dpo-batch-0", "train --out {w}/r --dpo-batch-size 0", "--dpo-batch-size", ["r"]),
    ("train-iters-0", "train --out {w}/r --iters 0", "--iters", ["r"]),
    ("train-samples-1", "train --out {w}/r --samples 1", "--samples", ["r"]),
    ("train-tau-2", "train --out {w}/r --tau 2", "--tau", ["r"]),
    ("train-temp-nan", "train --out {w}/r --temperature nan", "not a finite number", ["r"]),
    ("train-kv-neg", "train --out {w}/r --kv-cache-gb -1", "--kv-cache-gb", ["r"]),
    ("train-decode-mode", "train --out {w}/r --decode-mode fast", "--decode-mode", ["r"]),
    ("train-pair-rule", "train --out {w}/r --pair-rule shortest", "--pair-rule", ["r"]),
    ("train-rm-data", "train --out {w}/r --rm-data some", "--rm-data", ["r"]),
    ("train-rm-data-no-m-step", "train --out {w}/r --rm-data all --no-m-step", "--rm-data all", ["r"]),
    ("train-graphs-cpu", "train --out {w}/r --decode-mode graphs --device cpu", "needs a CUDA device", ["r"]),
    ("train-micro-small", "train --out {w}/r --micro-batch-tokens 100", "cannot hold a pair", ["r"]),
    ("train-invariant-compile", "train --out {w}/r --batch-invariant --decode-mode compile",
     "--batch-invariant decodes one eager step at a time; leave out --decode-mode compile", ["r"]),
    ("train-invariant-steps", "train --out {w}/r --batch-invariant --decode-steps 4",
     "eager step at a time; leave out --decode-steps 4", ["r"]),
    ("train-device", "train --out {w}/r --device tpu", "not a device", ["r"]),
    ("train-too-few-prompts", "train {P} {R} --prompts {w}/prompts.jsonl --out {w}/r", "too few", ["r"]),
    ("train-reward-is-policy", "train --policy {w}/policy --reward {w}/policy --prompts {w}/prompts.jsonl "
                               "--selection-size 4 --rm-split-size 4 --iters 1 --out {w}/r", "score.weight", ["r"]),
    ("train-policy-is-rm", REAL.replace("--policy {w}/policy", "--policy {w}/reward") + " --out {w}/r",
     "looks like a reward model", ["r"]),
    ("train-split-sizes-fit", REAL + " --policy-split-size 500 --out {w}/r",
     "1 iterations (--iters) of 500 prompts (--policy-split-size): 508 in all; sizes that fit: --policy-split-size 16",
     ["r"]),
    ("train-split-sizes-fit-all", REAL + " --selection-size 20 --rm-split-size 20 --out {w}/r",
     "sizes that fit: --selection-size 10 --rm-split-size 10 --policy-split-size 4", ["r"]),
    ("train-reward-template-missing", REAL + " --reward-chat-template {w}/nope.jinja --out {w}/r",
     "--reward-chat-template", ["r"]),
    ("train-max-new-tokens-context", REAL.replace("--max-new-tokens 8", "--max-new-tokens 500") + " --out {w}/r",
     "--max-new-tokens 500 does not fit the policy's context of 128 tokens (max_position_embeddings), not even "
     "after the shortest prompt", ["r"]),
    ("train-iters-below-begun", "train --out {w}/run_begun --iters 1", "has already begun iteration 2; give --iters 2"),
    ("train-reward-only", "train {R} --out {w}/r", "without --policy", ["r"]),
    ("train-no-prompts", "train {P} --out {w}/r", "--policy needs --prompts", ["r"]),
    ("train-prompts-not-utf8", "train {P} {R} --prompts {w}/not_utf8.jsonl --out {w}/r", "not UTF-8", ["r"]),
    ("train-prompts-surrogate", "train {P} {R} --prompts {w}/surrogate_prompts.jsonl --out {w}/r",
     '"prompt" holds a lone surrogate', ["r"]),
    ("train-prompts-role-wizard", "train {P} {R} --prompts {w}/wizard.jsonl --out {w}/r", "role 'wizard'", ["r"]),
    ("train-rm-eval-surrogate", "train --out {w}/r --rm-eval {w}/surrogate_pairs.jsonl",
     '"chosen" holds a lone surrogate', ["r"]),
    ("train-config-bad", "train --config {w}/bad.toml --out {w}/r", "not valid TOML", ["r"]),
    ("train-config-not-utf8", "train --config {w}/not_utf8.toml --out {w}/r", "not UTF-8", ["r"]),
    ("train-config-unknown", "train --config {w}/unknown_key.toml --out {w}/r", "unknown config key", ["r"]),
    ("train-config-type", "train --config {w}/wrong_type.toml --out {w}/r", "expected int", ["r"]),
    ("train-config-missing", "train --config {w}/nope.toml --out {w}/r", "cannot read", ["r"]),
    ("train-config-mistyped", "train --config smal --out {w}/r",
     "--config smal: no such file, and not a built-in config (those are paper, small", ["r"]),
    ("train-out-user-dir", "train --out {w}/user_dir", "holds no mtcore run"),
    ("train-out-file", "train --out {w}/notes.txt", "is a file"),
    ("train-other-config", "train --out {w}/run_other", "another config"),
    ("train-bad-state", "train --out {w}/run_bad_state", "state.json: not a run state"),
    ("train-state-not-json", "train --out {w}/run_state_not_json", "not valid JSON"),
    ("train-bad-splits", "train --out {w}/run_bad_splits", "splits.json: not the prompt splits"),
    ("train-state-empty", "train --out {w}/run_state_empty", "state.json: empty; state.json is damaged: restore it, "
                                                             "or delete it to run every stage again"),
    ("train-state-not-json-advice", "train --out {w}/run_state_not_json", "is damaged: restore it, or delete it"),
    ("train-splits-cut", "train --out {w}/run_splits_cut", "not valid JSON (Unterminated string starting at); "
                                                           "splits.json is damaged: restore it"),
    ("train-config-empty", "train --out {w}/run_config_empty", "config.toml: empty; config.toml is damaged"),
    ("train-config-cut", "train --out {w}/run_config_cut", "(cut short, or written by another version of mtcore)"),
    ("train-redo-not-done", "train --out {w}/run_new --redo iter_1/dpo", "holds no finished stage yet",
     ["run_new/state.json"]),
    ("train-redo-new-run", "train --out {w}/r --redo iter_1/dpo", "holds no finished stage yet", ["r"]),
    ("train-rm-eval-missing", "train --out {w}/r --rm-eval {w}/nope.jsonl", "cannot read", ["r"]),
    ("train-rm-eval-bad", "train --out {w}/r --rm-eval {w}/no_chosen.jsonl", "no_chosen.jsonl:1", ["r"]),
    ("train-bool-value", "train --out {w}/r --m-step maybe", "unexpected extra argument", ["r"]),
    ("train-report-to-unknown", "train --out {w}/r --report-to mlflow", "--report-to 'mlflow': 'mlflow' is not one of "
                                "tensorboard, wandb", ["r"]),
    ("train-log-every-neg", "train --out {w}/r --log-every -1", "--log-every", ["r"]),
    ("dpo-report-to-unknown", DPO + " --out {w}/o --report-to tensorboard,comet", "'comet' is not one of",
     ["o", "o.partial"]),
    ("sft-log-every-nan", SFT + " --out {w}/o --log-every nan", "not a finite number", ["o", "o.partial"]),
    ("gen-log-every-neg", GEN + " --out {w}/g.jsonl --log-every -1", "--log-every", ["g.jsonl"]),
    # mtcore build-toy and the command line itself
    ("toy-out-user-dir", "build-toy --out {w}/user_dir", "did not write"),
    ("toy-out-file", "build-toy --out {w}/notes.txt", "is a file"),
    ("toy-out-cwd", "build-toy --out .", "current directory"),
    ("toy-base-rm", "build-toy --base-rm mixed --out {w}/t", "--base-rm", ["t"]),
    ("toy-demo-errors", "build-toy --demo-errors drop --out {w}/t", "--demo-errors", ["t"]),
    ("toy-p-error", "build-toy --p-error 1.5 --out {w}/t", "--p-error", ["t"]),
    ("toy-p-error-nan", "build-toy --p-error nan --out {w}/t", "--p-error", ["t"]),
    ("toy-seed-neg", "build-toy --seed -1 --out {w}/t", "--seed", ["t"]),
    ("toy-digits-order", "build-toy --min-digits 9 --max-digits 8 --out {w}/t", "min_digits <= max_digits", ["t"]),
    ("toy-digits-few", "build-toy --min-digits 4 --max-digits 4 --out {w}/t", "give a wider range", ["t"]),
    ("toy-digits-long", "build-toy --max-digits 13 --out {w}/t", "--max-digits", ["t"]),
    ("toy-length-bias", "build-toy --length-bias 2 --out {w}/t", "--length-bias", ["t"]),
    ("toy-length-bias-onpolicy", "build-toy --base-rm onpolicy --length-bias 0.5 --out {w}/t", "--base-rm offpolicy",
     ["t"]),
    ("unknown-command", "frobnicate", "No such command"),
    ("unknown-option", "dpo --frobnicate", "No such option"),
    ("extra-argument", "info {w}/policy {w}/reward", "unexpected extra argument"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case, monkeypatch):
    _, command, expected, *rest = case
    if _needs_data_extra(command) and not HAVE_DATA_EXTRA:
        pytest.skip("mtcore[data] (datasets, pyarrow) is not installed")
    absent = rest[0] if rest else []
    monkeypatch.chdir(world)  # `--out .` is the world directory, which holds the inputs
    args = [a.format(w=world) for a in shlex.split(command.replace("{P}", P).replace("{R}", R))]
    before = snapshot(world)
    result = CliRunner().invoke(main, args)
    after = snapshot(world)
    stderr = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output[-2000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], stderr
    assert expected in errors[0], errors[0]
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"
    assert not [name for name in absent if (world / name).exists()], "written despite the error"


@pytest.mark.parametrize("command", ["train --out {w}/r", RM + " --out {w}/o"])
def test_report_to_wandb_without_wandb_names_the_extra(world, command, monkeypatch):
    """--report-to wandb where wandb cannot be imported: one line naming the extra to install, before any work."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = [a.format(w=world) for a in shlex.split(command)] + ["--report-to", "wandb"]
    before = snapshot(world)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr
    assert "--report-to wandb" in errors[0] and "pip install 'mtcore[wandb]'" in errors[0], errors[0]
    assert snapshot(world) == before and not (world / "r").exists() and not (world / "o.partial").exists()


def test_the_table_covers_every_command_and_at_least_100_cases():
    commands = {shlex.split(c[1].replace("{P}", P).replace("{R}", R))[0] for c in CASES}
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
    assert {"info", "convert", "generate", "score", "eval", "dpo", "rm", "sft", "train", "build-toy"} <= commands


def test_a_refused_value_leaves_the_run_directory_free(world, tmp_path):
    """The issue's lock: a bad value refused, then the corrected command runs in the same directory."""
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), "--top-p", "0"]).exit_code == 2
    assert not out.exists()
    from mtcore import toy
    from mtcore.config import resolve_config
    from mtcore.rundir import Run
    run = Run(out, resolve_config({}, {"top_p": 0.9, "iters": 1}), toy.world())
    assert (out / "config.toml").exists() and run.splits["policy_1"]


def test_replacing_an_own_output_and_overwrite(world, tmp_path):
    """Rerunning into an output of the same command replaces it (old or new, nothing mixed); --overwrite
    replaces a directory of other files; an input is refused even with --overwrite."""
    from mtcore.outputs import MARKER

    args = ["dpo", "--policy", str(world / "policy"), "--pairs", str(world / "pairs.jsonl"), "--batch-size", "3",
            "--micro-batch-tokens", "256"]
    out = tmp_path / "o"
    assert CliRunner().invoke(main, args + ["--out", str(out)]).exit_code == 0
    (out / "stale.txt").write_text("from a hand edit")
    assert CliRunner().invoke(main, args + ["--out", str(out), "--lr", "1e-4"]).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).exists() and not (tmp_path / "o.partial").exists()
    assert json.loads((out / "summary.json").read_text())["config"]["lr"] == 1e-4
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    assert CliRunner().invoke(main, args + ["--out", str(other)]).exit_code == 2
    assert CliRunner().invoke(main, args + ["--out", str(other), "--overwrite"]).exit_code == 0
    assert not (other / "x.txt").exists() and (other / "summary.json").exists()
    result = CliRunner().invoke(main, args + ["--out", str(world / "policy"), "--overwrite"])
    assert result.exit_code == 2 and "holds the input" in result.stderr


def test_exchange_swaps_directories_atomically(tmp_path):
    """replace_dir's rename exchange: the old directory ends up in tmp's place, then removed."""
    from mtcore.files import _exchange
    from mtcore.files import replace_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "new").write_text("new")
    (b / "old").write_text("old")
    if _exchange(a, b):
        assert (b / "new").exists() and (a / "old").exists()
        _exchange(a, b)
    replace_dir(a, b)
    assert (b / "new").read_text() == "new" and not (b / "old").exists() and not a.exists()


def test_an_interrupted_marker_write_leaves_the_work_directory_reusable(tmp_path, monkeypatch):
    """OUT.partial's marker appears whole or not at all: stopped just before its rename, the new
    OUT.partial is still empty, and the next run takes it (a truncated marker had made it refuse)."""
    import mtcore.outputs as outputs

    out = tmp_path / "o"

    def killed(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.open_partial(out, "dpo")
    assert outputs.partial_dir(out).is_dir() and not any(outputs.partial_dir(out).iterdir())
    monkeypatch.undo()
    assert outputs.check_out_dir(out, "dpo") == out
    partial = outputs.open_partial(out, "dpo")
    assert outputs.written_by(partial, "dpo") and [p.name for p in partial.iterdir()] == [outputs.MARKER]


def test_a_write_error_of_safetensors_is_one_line(world, tmp_path, monkeypatch):
    """safetensors' own error (not an OSError) while writing weights: one line, and no output."""
    from safetensors import SafetensorError

    import mtcore.checkpoint

    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mtcore.checkpoint, "save_file", fail)
    result = CliRunner().invoke(main, ["convert", str(world / "policy"), str(tmp_path / "c")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "No space left" in result.stderr
    assert not (tmp_path / "c").exists()


def test_nan_json_is_null(tmp_path):
    from mtcore.outputs import write_json_file

    write_json_file(tmp_path / "e.json", {"accuracy": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads((tmp_path / "e.json").read_text()) == {"accuracy": None, "rows": [1.0, None]}


# --- interrupts: old or new, never both ---

def _wait_for(proc, path: Path, timeout=900.0) -> bool:
    """Whether `path` (a glob pattern in its last part) appeared while proc ran."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if any(path.parent.glob(path.name)):
            return True
        time.sleep(0.002)
    return False


def _interrupt(args, env, watch: Path, sig, required: bool = True) -> bool:
    """Run `mtcore args`, send `sig` once `watch` exists, wait for the end; whether it was sent. With
    required=False a command that ends before `watch` is seen is no failure (a moment too short to
    catch every time). stderr goes to a file (a pipe left unread would fill and stall the command)."""
    fd, name = tempfile.mkstemp(suffix=".stderr")
    log = Path(name)
    with os.fdopen(fd, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "mtcore", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err_file)
        appeared = False
        try:
            appeared = _wait_for(proc, watch)
            if appeared:
                proc.send_signal(sig)
        finally:
            if not appeared and proc.poll() is None:
                proc.kill()
            proc.wait(timeout=120)
    err = log.read_text(errors="replace")
    log.unlink()
    assert appeared or (not required and proc.returncode == 0), f"{watch} never appeared: {err[-2000:]}"
    assert "Traceback" not in err or sig == signal.SIGKILL, err[-2000:]
    return appeared


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["TRITON_INTERPRET"] = "0"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("point", ["partial", "metrics", "model"])
def test_interrupted_dpo_leaves_the_old_output(world, tmp_path, sig, point):
    """A finished dpo output, then a second run into it killed while it trains or saves: OUT is the
    first run's, byte for byte; a rerun then completes."""
    out = tmp_path / "o"
    shutil.copytree(world / "prev_dpo", out)
    before = snapshot(out)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 " * (1 + i % 4),
                                         "rejected": "3 1"}) + "\n" for i in range(64)))
    args = ["dpo", "--policy", world / "policy", "--pairs", pairs, "--out", out, "--batch-size", "2",
            "--micro-batch-tokens", "256", "--epochs", "4"]
    # the moment the work directory appears, mid-training, and while the final model is saved (its
    # temp directory) or saved but not yet swapped in: a moment of milliseconds, so a run that ends
    # before it is seen must have left the complete new output
    watch = {"partial": tmp_path / "o.partial", "metrics": tmp_path / "o.partial" / "metrics.jsonl",
             "model": tmp_path / "o.partial" / "*model*"}[point]
    sent = _interrupt(args, _env(), watch, sig, required=point != "model")
    new = (out / ".mtcore-output").exists() and json.loads((out / "summary.json").read_text())["steps"] == 128
    assert snapshot(out) == before or new
    assert sent or new
    assert subprocess.run([sys.executable, "-m", "mtcore", *map(str, args[:-2]), "--epochs", "1"], env=_env(),
                          capture_output=True).returncode == 0
    assert json.loads((out / "summary.json").read_text())["pairs"] == str(pairs)


@pytest.mark.slow
@pytest.mark.parametrize("sig,point", [(signal.SIGINT, "tokenizer"), (signal.SIGKILL, "tokenizer"),
                                       (signal.SIGKILL, "policy")], ids=["sigint-tokenizer", "sigkill-tokenizer",
                                                                          "sigkill-policy"])
def test_interrupted_build_toy_leaves_the_old_assets(tmp_path, sig, point):
    """build-toy killed after it wrote a new tokenizer, or a new policy: the old asset set stays whole."""
    from mtcore import toy

    out = tmp_path / "assets"
    shutil.copytree(toy.ASSETS, out)
    before = snapshot(out)
    _interrupt(["build-toy", "--out", out], _env(), tmp_path / "assets.partial" / point / "tokenizer.json"
               if point == "policy" else tmp_path / "assets.partial" / "tokenizer" / "tokenizer.json", sig)
    assert snapshot(out) == before


@pytest.mark.slow
def test_loop_nan_keeps_last_good_and_a_lower_lr_redoes_the_stage(tmp_path):
    """A NaN in the loop's DPO stage keeps iter_1/last_good; the same command with a lower --dpo-lr is
    accepted (the change is recorded) and finishes the iteration."""
    from mtcore import load_model

    out = tmp_path / "run"
    bad = CliRunner().invoke(main, ["train", "--iters", "1", "--dpo-lr", "1e30", "--out", str(out)])
    assert bad.exit_code == 2 and "last_good" in bad.stderr, bad.output[-3000:]
    assert all(torch.isfinite(p).all() for p in load_model(out / "iter_1" / "last_good").parameters())
    again = CliRunner().invoke(main, ["train", "--iters", "1", "--out", str(out)])
    assert again.exit_code == 0, again.output[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert state["failed"] is None and state["config_changes"][0]["changed"]["dpo_lr"] == [1e30, 1e-5]
    assert "iter_1/dpo" in state["done"] and (out / "iter_1" / "policy").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,stage", [(signal.SIGINT, "samples.jsonl"), (signal.SIGKILL, "ref_logps.safetensors")],
                         ids=["sigint-sample", "sigkill-dpo"])
def test_interrupted_train_leaves_whole_files_and_resumes(tmp_path, sig, stage):
    """mtcore train killed inside iteration 1: every file it left is whole (state.json lists only stages
    whose outputs exist), and the rerun completes."""
    from mtcore.rundir import read_state

    out = tmp_path / "run"
    args = ["train", "--iters", "1", "--out", out]
    _interrupt(args, _env(), out / "iter_1" / stage, sig)
    state = read_state(out / "state.json")
    for key in state["done"]:
        if key.startswith("iter_"):
            assert (out / f"{key}.json").exists()
    for f in (f for f in out.rglob("*.json*") if not f.name.startswith(".")):  # temp files aside
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            [json.loads(line) for line in f.read_text().splitlines()]
    rerun = subprocess.run([sys.executable, "-m", "mtcore", *map(str, args)], env=_env(), capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert json.loads((out / "metrics.json").read_text())["iterations"]
